"""Convert a checkpoint (ours, timm, or official TResNet) to a timm-format state dict.

    python scripts/convert_checkpoint.py runs/m/last.pth m_timm.pth --ema --verify-timm-model tresnet_m

The result loads with `timm.create_model(name, num_classes=N).load_state_dict(torch.load(path))`
(strict). After writing, the script prints that exact call and, for our checkpoints, the input the
trainer validated at (crop size, crop_pct, resize, interpolation, mean/std): validate the converted
file with those, not with timm's 224 px defaults.
"""
import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from tresnet_train.models.weights import (classifier_rows, convert_checkpoint,  # noqa: E402
                                              read_checkpoint)
from tresnet_train.models.registry import TIMM_PREFIX  # noqa: E402


def usage_lines(src: str, dst: str, state_dict: dict, verified: str | None) -> list[str]:
    """How to load `dst` in timm, and the preprocessing `src` was validated with (ours only)."""
    meta = read_checkpoint(src)
    ours = isinstance(meta.get("config"), dict) and "model_name" in meta
    num_classes = meta["config"]["model"]["num_classes"] if ours else classifier_rows(state_dict)
    name = verified or (meta["model_name"] if ours else None)
    if name and name.startswith(TIMM_PREFIX):
        name = name[len(TIMM_PREFIX):]
    import timm
    in_timm = bool(name) and timm.is_model(name)
    classes = f", num_classes={num_classes}" if num_classes is not None else ""
    if in_timm or not name:
        call = f"timm.create_model({name or 'NAME'!r}{classes})"
    else:  # one of ours that timm lacks (e.g. tresnet_tiny): same layout, our constructor
        call = f"tresnet_train.models.create_model({name!r}{classes}, norm='bn')  # not in timm"
    lines = ["load it with:",
             f"  model = {call}",
             f"  model.load_state_dict(torch.load({str(dst)!r}, weights_only=True))"
             + ("  # checked: loads strictly" if verified else "")]
    if not name:
        lines.append("  (NAME: the timm architecture of these weights; --verify-timm-model NAME checks it)")
    if not ours:
        lines.append("validate at: the file records no input size; use the model's own data config")
        return lines
    data, dc = meta["config"]["data"], meta.get("data_config") or {}
    size = data.get("val_img_size") or data["img_size"]
    crop_pct = data.get("crop_pct") or float(dc.get("crop_pct", 0.875))
    interp, mean, std = dc.get("interpolation", "bilinear"), dc.get("mean", (0, 0, 0)), dc.get("std", (1, 1, 1))
    lines.append(f"validate at: {size} px (crop_pct {crop_pct:g}: resize the short side to "
                 f"{math.floor(size / crop_pct)}, center crop {size}), {interp}, "
                 f"mean {tuple(mean)} std {tuple(std)} on RGB in [0, 1]")
    lines.append(f"  e.g. python validate.py --ckpt {dst} --model {meta['model_name']} --data DIR "
                 f"--img-size {size} --crop-pct {crop_pct:g}")
    return lines


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
    print("\n".join(usage_lines(args.src, args.dst, state_dict, args.verify_timm_model)))


if __name__ == "__main__":
    main()
