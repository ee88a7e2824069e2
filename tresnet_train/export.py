"""`scripts/export.py`: a checkpoint -> an ONNX file and a JSON beside it, usable without this package.

    python scripts/export.py --ckpt runs/tresnet_m/best.pth --format onnx --out model.onnx

- Weights: `validation.read_weights`, so model vs EMA is chosen as validate.py chooses (whichever the
  trainer found best; --ema/--no-ema), and timm or official TResNet files work with `--model`.
- Norms: the model is built with BatchNorm (checkpoints of InPlace-ABN runs hold BatchNorm-convention
  weights, models/inplace_abn_norm.py) and exported in eval mode, where torch's exporter folds every
  BatchNorm that directly follows a convolution into that convolution's weight and bias. The count of
  norms left in the graph is printed (0 for every registered model).
- Input: the resolution and crop the checkpoint was validated at (`validation.set_eval_size`), a
  dynamic batch axis, float32 NCHW RGB. SpaceToDepth exports as Reshape/Transpose, the anti-alias
  blur as a reflect Pad and a depthwise Conv: standard ONNX operators only, no custom domain.
- Check: ONNX Runtime (CPU) runs the file on random images and its logits are compared with the
  PyTorch model's; a gap above 1e-4 of the largest logit (at least 1e-4) fails the export (exit 1).
- JSON (`model.json` beside `model.onnx`): class names, input name/shape, resize and crop, interpolation,
  mean/std (null when the model takes RGB in [0, 1] unnormalised, as TResNet does).

Exporter: torch's TorchScript-based `torch.onnx.export(dynamo=False)` by default: it exported
TResNet-M in 7 s where the torch.export-based one (`--dynamo`) took 72 s on a shared 2-core CPU,
and both folded every norm and matched PyTorch's logits within 5e-5.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError
from .data.transforms import VAL_RESIZE_MODES, Preprocess
from .models.registry import TIMM_PREFIX
from .validation import (ValidationError, Weights, add_weights_args, build_model,
                         check_size_args, checkpoint_num_classes, read_weights, set_eval_size)

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
INSTALL_HINT = "pip install onnx onnxruntime (the 'export' extra: pip install -e '.[export]')"


def sidecar_path(onnx_path: str | Path) -> Path:
    """The JSON that travels with an ONNX file: same name, `.json`."""
    return Path(onnx_path).with_suffix(".json")


def _import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ValidationError(f"ONNX export needs onnx and onnxruntime ({e.name} is missing): "
                              f"{INSTALL_HINT}") from None
    return onnx, onnxruntime


def ort_providers() -> list[str]:
    """ONNX Runtime's CUDA provider when it is installed (onnxruntime-gpu), and the CPU one."""
    _, ort = _import_onnx()
    cuda = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else []
    return cuda + ["CPUExecutionProvider"]


class OnnxModel(nn.Module):
    """An ONNX file behind an nn.Module call: float32 NCHW images in, logits out on the input's
    device. Lets the trainer's eval loop (`engine.evaluate`) run an exported file unchanged."""

    def __init__(self, path: str | Path, providers: list[str] | None = None):
        super().__init__()
        _, ort = _import_onnx()
        self.session = ort.InferenceSession(str(path), providers=providers or ort_providers())
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)  # (N, num_classes)


def export_onnx(model: nn.Module, path: str | Path, img_size: int, opset: int = OPSET,
                dynamo: bool = False) -> None:
    """Write `model` (eval mode, fp32, CPU) as ONNX taking (batch, 3, img_size, img_size).

    dynamo=False: torch's TorchScript-based exporter (deprecated since torch 2.9 but shipped up to
    the torch this package supports); True: the torch.export-based one (needs onnxscript).
    """
    onnx, _ = _import_onnx()
    model = model.float().cpu().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(1, 3, img_size, img_size)
    names = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    if dynamo:
        batch = {0: torch.export.Dim("batch", min=1)}
        torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=(batch,),
                          optimize=True, external_data=False,  # one file; the optimizer folds norms
                          **names)
    else:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notes
            torch.onnx.export(model, (example,), str(path), dynamo=False,
                              do_constant_folding=True,  # folds eval-mode BatchNorm into the convs
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              **names)
    onnx.checker.check_model(str(path))


def graph_ops(path: str | Path) -> dict[str, int]:
    """Operator counts of an ONNX file, keyed `op_type` (standard domain) or `domain::op_type`."""
    onnx, _ = _import_onnx()
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def max_logit_gap(model: nn.Module, onnx_model: OnnxModel, img_size: int, batch: int = 2,
                  seed: int = 0) -> tuple[float, float]:
    """(max |ONNX - PyTorch| logit, max |PyTorch logit|) on `batch` random images in [0, 1]."""
    x = torch.rand(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model.float().cpu().eval()(x)
    return (onnx_model(x) - ref).abs().max().item(), ref.abs().max().item()


def class_names(w: Weights, num_classes: int) -> tuple[list[str] | None, list[str] | None]:
    """(names, descriptions): our checkpoints' class folder names; for a 1000-class timm or official
    file, ImageNet-1k's synsets (the sorted folder names of ImageNet's train/) and their words."""
    if w.classes:
        return list(w.classes), None
    if not w.ours and num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return list(info.label_names()), list(info.label_descriptions())
    return None, None


def deploy_info(w: Weights, pre: Preprocess, num_classes: int, onnx_path: Path, opset: int) -> dict:
    """What a user of the ONNX file needs, as plain JSON."""
    import onnx
    identity = tuple(pre.mean) == (0.0, 0.0, 0.0) and tuple(pre.std) == (1.0, 1.0, 1.0)
    names, descriptions = class_names(w, num_classes)
    size = pre.val_img_size
    info = {
        "file": onnx_path.name,
        "model": w.model_name,
        "weights": w.weights,  # model | ema | state_dict
        "checkpoint": w.path,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32",
                  "layout": "NCHW", "channels": "RGB",
                  "values": "pixel / 255, then (x - mean) / std per channel when mean/std are given"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", num_classes],
                   "meaning": "logits; softmax gives class probabilities"},
        "input_size": [3, size, size],
        "resize_mode": pre.val_resize_mode,
        "resize": pre.val_resize,
        "crop_pct": pre.crop_pct if pre.val_resize_mode == "crop" else None,
        "interpolation": pre.interpolation,
        "mean": None if identity else list(pre.mean),
        "std": None if identity else list(pre.std),
        "num_classes": num_classes,
        "classes": names,
        "opset": opset,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
    }
    if descriptions:
        info["class_descriptions"] = descriptions
    if pre.val_resize_mode == "crop":
        info["preprocess"] = (f"resize the shorter side to {pre.val_resize} ({pre.interpolation}), "
                              f"center-crop {size}x{size}")
    else:
        info["preprocess"] = f"resize the whole image to {size}x{size} ({pre.interpolation}), no crop"
    return info


def read_sidecar(onnx_path: str | Path) -> dict:
    """The JSON written beside an exported ONNX file; a clear error when it is missing or broken."""
    path = sidecar_path(onnx_path)
    if not Path(onnx_path).is_file():
        raise ValidationError(f"--onnx {onnx_path}: file not found")
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValidationError(f"--onnx {onnx_path}: no {path.name} beside it (scripts/export.py "
                              f"writes it with the input size and preprocessing); export again") from None
    except json.JSONDecodeError as e:
        raise ValidationError(f"{path}: not valid JSON ({e}); export again") from None
    missing = [k for k in ("input_size", "resize_mode", "interpolation", "num_classes") if k not in info]
    if missing:
        raise ValidationError(f"{path} lacks {missing}: export again with scripts/export.py")
    return info


# ---- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export.py",
        description="Export a checkpoint to ONNX (dynamic batch, norms folded into the convolutions) "
                    "with a JSON beside it: class names, input size, resize and crop, mean/std.",
        epilog="Example: python scripts/export.py --ckpt runs/tresnet_m/best.pth --format onnx "
               "--out model.onnx")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint: ours (train.py output), a timm state dict or an official TResNet "
                        "file (the last two need --model)")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="output format")
    p.add_argument("--out", required=True, help="the ONNX file to write; the JSON goes beside it")
    add_weights_args(p, "export")
    p.add_argument("--resize", choices=VAL_RESIZE_MODES, default="crop",
                   help="preprocessing recorded in the JSON: crop (resize the short side to "
                        "img_size / crop_pct, center crop) or squash (resize to img_size x img_size)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--dynamo", action="store_true",
                   help="use torch's torch.export-based exporter (needs onnxscript; about 10x slower "
                        "on a CPU) instead of the TorchScript-based one")
    return p


def run(args: argparse.Namespace) -> int:
    check_size_args(args)
    _import_onnx()
    w = read_weights(args.ckpt, args.model, args.ema)
    num_classes = checkpoint_num_classes(w)
    if num_classes is None:
        raise ValidationError(f"{args.ckpt} has no classifier weights for {w.model_name}: "
                              f"is --model right?")
    set_eval_size(w, args.img_size, args.crop_pct)
    pre = replace(Preprocess.from_config(w.cfg.data, w.data_config), val_resize_mode=args.resize)
    size = pre.val_img_size
    if size % 32 and not w.model_name.startswith(TIMM_PREFIX):
        raise ValidationError(f"--img-size {size}: must be a multiple of 32 (the model's total stride)")
    model = build_model(w, num_classes)

    out = Path(args.out)
    export_onnx(model, out, size, args.opset, args.dynamo)
    gap, scale = max_logit_gap(model, OnnxModel(out, ["CPUExecutionProvider"]), size)
    info = deploy_info(w, pre, num_classes, out, args.opset)
    sidecar_path(out).write_text(json.dumps(info, indent=2) + "\n")

    ops = graph_ops(out)
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    custom = sorted(k for k in ops if "::" in k)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, opset {args.opset}) and "
          f"{sidecar_path(out).name}")
    norm = f"mean {info['mean']}, std {info['std']}" if info["mean"] else "no mean/std (RGB in [0, 1])"
    print(f"  {w.model_name}, {w.weights} weights, {num_classes} classes; input (batch, 3, {size}, "
          f"{size}); {info['preprocess']}; {norm}")
    print(f"  norms: {norms - ops.get('BatchNormalization', 0)} of {norms} folded into convolutions; "
          f"{sum(ops.values())} nodes, custom ops: {custom or 'none'}")
    tolerance = 1e-4 * max(1.0, scale)
    print(f"  ONNX Runtime vs PyTorch (CPU, fp32, 2 random images): max |logit gap| {gap:.2e} "
          f"(largest logit {scale:.2f}, tolerance {tolerance:.1e})")
    if not math.isfinite(gap) or gap > tolerance:
        print(f"export.py: error: {out}: ONNX Runtime's logits differ from PyTorch's by {gap:.2e}",
              file=sys.stderr)
        return EXIT_MISMATCH
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValidationError, ConfigError) as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
