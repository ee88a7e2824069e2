"""Export a checkpoint to ONNX with a JSON of its preprocessing beside it.

    python scripts/export.py --ckpt runs/tresnet_m/best.pth --format onnx --out model.onnx
    python scripts/export.py --ckpt tresnet_m_official.pth --model tresnet_m --out m.onnx

Options: `python scripts/export.py --help`; the behaviour is documented in tresnet_train/export.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from tresnet_train.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
