"""Convert a checkpoint (ours, timm, or official TResNet) to a timm-format state dict.

    python scripts/convert_checkpoint.py runs/m/last.pth m_timm.pth --ema --verify-timm-model tresnet_m

The result loads with `timm.create_model(name).load_state_dict(torch.load(path), strict=True)`.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from tresnet_train.models.checkpoints import convert_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("src", help="checkpoint to read (any supported format)")
    parser.add_argument("dst", help="where to write the timm state dict")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights of our checkpoint")
    parser.add_argument("--verify-timm-model", metavar="NAME",
                        help="check that the result loads strictly into timm.create_model(NAME)")
    args = parser.parse_args()
    state_dict = convert_checkpoint(args.src, args.dst, use_ema=args.ema,
                                    verify_timm_model=args.verify_timm_model)
    print(f"wrote {len(state_dict)} tensors to {args.dst}")


if __name__ == "__main__":
    main()
