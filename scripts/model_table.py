"""Print the model table for the README: parameters and GMACs at 224 and 448 per model.

    python scripts/model_table.py [--models tresnet_m timm/resnet50 ...]

MACs are counted with torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls; norms,
activations and pooling are not counted) on the meta device, so no arithmetic runs; MACs = FLOPs / 2.
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from tresnet_train.models import create_model, list_models  # noqa: E402


def gmacs(model: torch.nn.Module, size: int) -> float:
    x = torch.empty(1, 3, size, size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list_models() + ["timm/resnet50"])
    args = parser.parse_args()
    print("| model | params (M) | GMACs @224 | GMACs @448 |")
    print("|---|---:|---:|---:|")
    for name in args.models:
        with torch.device("meta"):
            model = create_model(name, norm="bn").eval()
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params / 1e6:.2f} | {gmacs(model, 224):.2f} | {gmacs(model, 448):.2f} |")


if __name__ == "__main__":
    main()
