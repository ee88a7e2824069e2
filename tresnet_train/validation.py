"""`validate.py`: top-1/top-5/loss of a checkpoint on an ImageFolder validation split.

    resolve (checkpoint, model, classes, preprocessing: seconds, no GPU) -> distributed world
    -> model -> val loader -> `engine.evaluate` (the trainer's own eval loop) -> table, JSON, CSV

Checkpoints: ours (written by the trainer: model name, data config and the training config are read
from it, so no config file is needed), timm-format state dicts and the official TResNet release
format (these two need `--model NAME`). Every file is read with `torch.load(weights_only=True)`: a
pickle that would run code is refused before anything in it runs.

`--onnx model.onnx` evaluates a file from scripts/export.py instead: ONNX Runtime runs it inside the
same eval loop and loaders, with the classes and preprocessing of the JSON written beside it.

Preprocessing defaults to what the trainer validated with (the checkpoint's data.val_img_size or
data.img_size, data.crop_pct or the model's crop_pct), so validating `best.pth` reproduces the
top-1 the trainer logged. That is the crop protocol (timm's: resize the short side to
size / crop_pct, center crop); `--resize squash` is the official TResNet protocol at 448 (the whole
image resized to size x size, no crop), under which the paper's 448 numbers were measured. Under
torchrun every rank reads a round-robin shard padded with target -1 samples, which the evaluator
ignores: each image counts exactly once.

Exit codes: 0 done; 2 a problem the user can fix (usage, unreadable or refused checkpoint, class
count mismatch, unknown model, bad data folder), reported as one line on stderr.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .config import AMP_MODES, BACKENDS, DEVICES, Config, ConfigError, from_dict
from .data.transforms import VAL_RESIZE_MODES
from .distributed import World, barrier, cleanup, gather_objects, init_distributed, world_from_env
from .engine import evaluate
from .host_memory import keep_host_memory
from .precision import Precision, PrecisionError

log = logging.getLogger("tresnet_train")

EXIT_OK, EXIT_USAGE = 0, 2


class ValidationError(ValueError):
    """A problem the user can fix; the message names the file or flag and what to do."""


# ---- command line ---------------------------------------------------------------------------------
def add_weights_args(p: argparse.ArgumentParser, verb: str) -> None:
    """--model, --ema/--no-ema, --img-size, --crop-pct: which weights, at what size (validate.py and
    scripts/export.py read checkpoints alike)."""
    p.add_argument("--model", default=None,
                   help="model name (registered or timm/<name>); default: read from our checkpoints")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ema", dest="ema", action="store_true", default=None,
                         help=f"{verb} the checkpoint's EMA weights")
    weights.add_argument("--no-ema", dest="ema", action="store_false",
                         help=f"{verb} the model weights (default: the weights the run reported, its "
                              "train.report)")
    p.add_argument("--img-size", type=int, default=None,
                   help="eval crop, pixels (default: the size the checkpoint was validated at, else "
                        "the model's)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="center-crop fraction: resize the short side to img_size / crop_pct first "
                        "(default: the checkpoint's, else the model's, 0.875 for TResNet)")


def check_size_args(args: argparse.Namespace) -> None:
    if args.img_size is not None and args.img_size <= 0:
        raise ValidationError(f"--img-size must be > 0, got {args.img_size}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise ValidationError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="validate.py",
        description="Top-1/top-5 of a checkpoint on an ImageFolder validation split "
                    "(also under torchrun: every image is counted once).",
        epilog="Example: python validate.py --ckpt runs/tresnet_m/best.pth --data /data/imagenet")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt",
                        help="checkpoint: ours (train.py output), a timm state dict or an official "
                             "TResNet file (the last two need --model)")
    source.add_argument("--onnx", metavar="FILE",
                        help="an ONNX file from scripts/export.py, run by ONNX Runtime with the "
                             "preprocessing in the JSON beside it")
    p.add_argument("--data", required=True,
                   help="ImageFolder root holding val/, or the val/ folder itself (one folder per class)")
    add_weights_args(p, "evaluate")
    p.add_argument("--resize", choices=VAL_RESIZE_MODES, default=None,
                   help="eval protocol (default crop; with --onnx the exported one): crop = resize the "
                        "short side to img_size / crop_pct, then center crop (timm's, the "
                        "trainer's); squash = resize the whole image to img_size x img_size, "
                        "aspect not kept, no crop (the official TResNet "
                        "evaluation at 448, the paper's 448 numbers)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per process per step (default: the checkpoint's val batch, else 64)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="decoder: auto = DALI when installed, else torchvision")
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="autocast dtype (auto = bf16 on GPU, none on CPU)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers (torch) or threads (DALI) per process (default: the "
                        "checkpoint's data.workers, else 8)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    p.add_argument("--predictions", default=None, metavar="CSV",
                   help="write one row per image: path,label,pred,prob (class folder names; prob is "
                        "the softmax probability of pred)")
    return p


def check_args(args: argparse.Namespace) -> None:
    check_size_args(args)
    if args.batch_size is not None and args.batch_size <= 0:
        raise ValidationError(f"--batch-size must be > 0, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise ValidationError(f"--workers must be >= 0, got {args.workers}")
    if args.crop_pct is not None and args.resize == "squash":
        raise ValidationError("--crop-pct applies to --resize crop; --resize squash crops nothing")
    if args.onnx:
        fixed = [flag for flag, value in (("--model", args.model), ("--ema/--no-ema", args.ema),
                                          ("--img-size", args.img_size), ("--crop-pct", args.crop_pct))
                 if value is not None]
        if fixed:
            raise ValidationError(f"{', '.join(fixed)}: fixed in the ONNX file and its JSON at export; "
                                  f"pass them to scripts/export.py instead")


# ---- what to evaluate -------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything resolved before any GPU or decoding work."""
    model: nn.Module  # on the CPU, weights loaded
    model_name: str
    weights: str  # model | ema (our checkpoints, a timm/official file's "ema") | state_dict
    fmt: str  # tresnet-train | timm | official
    cfg: Config  # the checkpoint's config (defaults for other formats) with this run's settings
    data_config: dict  # the model's preprocessing facts (interpolation, mean, std, ...)
    val_dir: Path
    classes: list[str]
    trainer_val: dict  # the trainer's last validation before the checkpoint was saved (ours only)
    resize_mode: str  # eval protocol, --resize: crop | squash


def val_folder(data: str | Path) -> Path:
    """`data` is an ImageFolder root (use its val/) or the val folder itself."""
    data = Path(data).expanduser()
    if not data.is_dir():
        raise ValidationError(f"--data {data}: folder not found (give an ImageFolder root holding "
                              f"val/, or the val/ folder itself)")
    if (data / "val").is_dir():
        return data / "val"
    if (data / "train").is_dir():
        raise ValidationError(f"--data {data} has train/ but no val/: give the folder that holds "
                              f"val/, or the val/ folder itself")
    return data


@dataclass
class Weights:
    """The weights a checkpoint file holds, chosen and in timm/our key layout, with what came along."""
    path: str
    model_name: str
    ours: bool  # ours (trainer checkpoint or ONNX export): model name, config and classes inside
    weights: str  # model | ema | state_dict
    fmt: str  # tresnet-train | timm | official
    cfg: Config  # the checkpoint's config (ours), else the defaults with model.name set
    data_config: dict  # the model's preprocessing facts (the checkpoint's copy for ours)
    state_dict: dict
    classes: list[str] | None  # class folder names the checkpoint was trained on (ours)
    trainer_val: dict  # the trainer's last validation before the checkpoint was saved (ours)
    resize_mode: str = "crop"  # the eval protocol it comes with (an ONNX export's JSON)
    onnx_model: nn.Module | None = None  # an exported file, run by ONNX Runtime (--onnx)


def read_weights(path: str | Path, model: str | None = None, ema: bool | None = None) -> Weights:
    """Read a checkpoint (ours, timm or official) and pick its weights as validate.py does: `ema`
    True/False forces EMA/model weights; None takes the weights the run reported (ours: its
    train.report) or the plain state dict. `model` names the architecture (timm, official files)."""
    from .models import UnknownModelError, check_model_name, get_data_config
    from .models.weights import (detect_format, read_checkpoint, select_state_dict,
                                     strip_wrapper_prefixes, to_timm_layout)

    try:
        state = read_checkpoint(path)  # weights_only: a pickle that would run code is refused here
    except ValueError as e:
        raise ValidationError(str(e)) from None
    ours = "model_name" in state and isinstance(state.get("config"), dict)
    name = model or (state["model_name"] if ours else None)
    if name is None:
        raise ValidationError(f"{path} is not a tresnet-train checkpoint (no model name inside): "
                              f"pass --model NAME (e.g. --model tresnet_m, or timm/<name>)")
    try:
        check_model_name(name)
    except UnknownModelError as e:
        raise ValidationError(f"--model: {e}") from None

    if ours:
        try:
            cfg = from_dict(state["config"])
        except ConfigError as e:
            raise ValidationError(f"{path}: its stored config is not valid here ({e})") from None
        weights = "ema" if (ema if ema is not None else state.get("best_source") == "ema") else "model"
        fmt, raw = "tresnet-train", state.get(weights)
        data_config = dict(state.get("data_config") or get_data_config(name))
    else:
        cfg, data_config = Config(), get_data_config(name)
        cfg.model.name = name
        weights = "ema" if ema else "state_dict"
        try:
            raw = select_state_dict(state, use_ema=bool(ema), source=str(path))
        except ValueError as e:
            raise ValidationError(str(e)) from None
        fmt = detect_format(strip_wrapper_prefixes(raw))
    if not isinstance(raw, dict):
        raise ValidationError(f"{path} holds no {weights} weights (EMA is absent when trained "
                              f"with train.ema=false): use --no-ema")
    return Weights(path=str(path), model_name=name, ours=ours, weights=weights, fmt=fmt, cfg=cfg,
                   data_config=data_config, state_dict=to_timm_layout(raw),
                   classes=list(state["classes"]) if ours and state.get("classes") else None,
                   trainer_val=dict(state.get("val") or {}) if ours else {})


def read_onnx(path: str | Path) -> Weights:
    """An exported ONNX file as `Weights`: ONNX Runtime runs it, the JSON beside it gives the
    classes and the preprocessing it was exported with (scripts/export.py)."""
    from .export import OnnxModel, read_sidecar
    info = read_sidecar(path)
    cfg = Config()
    cfg.model.name, cfg.model.num_classes = info["model"], int(info["num_classes"])
    cfg.data.val_img_size = int(info["input_size"][-1])
    cfg.data.crop_pct = info.get("crop_pct")
    data_config = {"input_size": tuple(info["input_size"]), "crop_pct": info.get("crop_pct") or 0.875,
                   "interpolation": info["interpolation"], "mean": info.get("mean") or (0.0, 0.0, 0.0),
                   "std": info.get("std") or (1.0, 1.0, 1.0)}
    return Weights(path=str(path), model_name=info["model"], ours=True, weights=info.get("weights", "?"),
                   fmt="onnx", cfg=cfg, data_config=data_config, state_dict={},
                   classes=info.get("classes"), trainer_val={}, resize_mode=info["resize_mode"],
                   onnx_model=OnnxModel(path))


def checkpoint_num_classes(w: Weights) -> int | None:
    """The classes the weights were trained on: our config's, else the classifier's rows (None for
    a file without a classifier)."""
    if w.ours:
        return w.cfg.model.num_classes
    from .models import create_model
    from .models.weights import classifier_rows
    with torch.device("meta"):  # only the classifier's name is needed: nothing is allocated
        return classifier_rows(w.state_dict, create_model(w.model_name, norm="bn"))


def build_model(w: Weights, num_classes: int) -> nn.Module:
    """The model with `w`'s weights (CPU, eval mode), BatchNorm whatever the run trained with:
    checkpoints hold BatchNorm-convention weights, also from InPlace-ABN runs
    (models/inplace_abn_norm.py), and evaluation gains nothing from InPlace-ABN."""
    from .models import create_model
    from .models.weights import load_state_dict_strict
    model = create_model(w.model_name, num_classes=num_classes, norm="bn")
    try:
        load_state_dict_strict(model, w.state_dict, f"{w.path} ({w.weights} weights)")
    except ValueError as e:
        raise ValidationError(f"{e} (--model {w.model_name})") from None
    return model.eval()


def set_eval_size(w: Weights, img_size: int | None = None, crop_pct: float | None = None) -> None:
    """Eval crop size and crop_pct into `w.cfg.data`: the given ones, else what the trainer validated
    at (ours: data.val_img_size or data.img_size, data.crop_pct or the model's), else the model's."""
    d = w.cfg.data
    if img_size is not None:
        d.val_img_size = img_size
    elif not w.ours:
        d.val_img_size = int(w.data_config["input_size"][-1])
    if crop_pct is not None:
        d.crop_pct = crop_pct


def resolve(args: argparse.Namespace) -> Plan:
    """Read the checkpoint, check the classes, build the model with its weights (CPU), and settle
    the preprocessing. Identical on every rank, so an error surfaces before any collective."""
    from .data import DataError, index_images

    w = read_onnx(args.onnx) if args.onnx else read_weights(args.ckpt, args.model, args.ema)
    cfg, data_config = w.cfg, w.data_config

    # the classes: the folder's count must be the model's
    val_dir = val_folder(args.data)
    try:
        classes = index_images(val_dir, verify=False).classes
    except DataError as e:
        raise ValidationError(f"--data: {e}") from None
    num_classes = checkpoint_num_classes(w)
    if num_classes is not None and num_classes != len(classes):
        raise ValidationError(
            f"class count mismatch: {w.path} was trained on {num_classes} classes but "
            f"{val_dir} has {len(classes)} class folders; validate on the dataset the "
            f"checkpoint was trained on")
    if w.classes and w.classes != classes:
        log.warning("warning: the class folder names in %s differ from the ones %s was trained on "
                    "(same count, %d): labels follow the sorted folder names", val_dir, w.path,
                    len(classes))
    model = w.onnx_model if args.onnx else build_model(w, len(classes))

    # this run's settings on top of what the trainer used (ours) or the defaults (other formats)
    set_eval_size(w, args.img_size, args.crop_pct)
    d = cfg.data
    d.source, d.root, d.backend = "folder", str(val_dir), args.backend
    d.val_batch_size = args.batch_size or d.val_batch_size or d.batch_size
    if args.workers is not None:
        d.workers = args.workers
    cfg.train.amp, cfg.run.device = ("none" if args.onnx else args.amp), args.device
    return Plan(model=model, model_name=w.model_name, weights=w.weights, fmt=w.fmt, cfg=cfg,
                data_config=data_config, val_dir=val_dir, classes=classes,
                trainer_val=w.trainer_val, resize_mode=args.resize or w.resize_mode)


def build_val_loader(plan: Plan, world: World, device: torch.device):
    """The trainer's val loader (same preprocessing, plan and padding) for a lone val folder.

    `data.build_loaders` needs train/ beside val/; here only the val folder is required.
    Returns (loader, split, preprocess, backend name).
    """
    from .data import Preprocess, index_images, resolve_backend
    from .data.build import build_val_loader as build_split_loader
    from .data.build import index_threads

    d = plan.cfg.data
    pre = replace(Preprocess.from_config(d, plan.data_config), val_resize_mode=plan.resize_mode)
    backend = resolve_backend(d.backend)
    split = index_images(plan.val_dir, plan.classes, strict=d.strict,
                         threads=index_threads(d.workers))
    return build_split_loader(split, d, pre, backend, world, device), split, pre, backend


class Predictions:
    """Per-image (pred, prob, label) kept on the device during the loop; read once at the end."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.parts: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if self.enabled:
            prob, pred = logits.softmax(dim=1).max(dim=1)
            self.parts.append(torch.stack([pred.double(), prob.double(), targets.double()], dim=1))

    def rows(self, indices) -> list[tuple[int, int, float, int]]:
        """This rank's (sample index, pred, prob, label) for real images, in loader order."""
        if not self.parts:
            return []
        table = torch.cat(self.parts).cpu().tolist()  # host sync: after the loop
        return [(int(i), int(p), prob, int(t)) for i, (p, prob, t) in zip(indices, table) if t >= 0]


def write_predictions(path: str | Path, rows, split, classes: list[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "pred", "prob"])
        for i, pred, prob, label in sorted(rows):
            w.writerow([split.samples[i][0], classes[label], classes[pred], f"{prob:.6f}"])


def describe_preprocess(r: dict) -> str:
    """The eval protocol in words: `crop: resize 256, center crop 224 (crop_pct 0.875), bilinear, dali
    backend` or `squash: resize to 448x448, no crop, bilinear, dali backend`."""
    if r["resize_mode"] == "squash":
        size = f"squash: resize to {r['img_size']}x{r['img_size']}, no crop"
    else:
        size = (f"crop: resize {r['resize']}, center crop {r['img_size']} "
                f"(crop_pct {r['crop_pct']:g})")
    return f"{size}, {r['interpolation']}, {r['backend']} backend"


def report(result: dict) -> str:
    """The short human table."""
    r = result
    lines = [
        ("model", f"{r['model']} ({r['weights']} weights, {r['format']} format)"),
        ("checkpoint", r["checkpoint"]),
        ("data", f"{r['data']} ({r['num_images']} images, {r['num_classes']} classes)"),
        ("preprocess", describe_preprocess(r)),
        ("top-1", f"{r['top1']:.3f} %"),
        ("top-5", f"{r['top5']:.3f} %"),
        ("loss", f"{r['loss']:.4f}"),
        ("throughput", f"{r['images_per_s']:,.0f} img/s ({r['world_size']} process(es) on "
                       f"{r['device']}, amp {r['amp']}, batch {r['batch_size']} per process)"),
    ]
    if "trainer_val_top1" in r:
        lines.append(("trainer", f"top-1 {r['trainer_val_top1']:.3f} % at its last validation "
                                 f"before saving (its own img size and crop)"))
    return "\n".join(f"{k:<12}{v}" for k, v in lines)


# ---- the run --------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    """Validate as the arguments say; returns the result dict (the same on every rank)."""
    plan = resolve(args)  # cheap and identical on every rank: errors surface before any collective
    world, device = init_distributed(plan.cfg.run.device, plan.cfg.run.dist_timeout_min)
    from .logs import setup_console
    setup_console(world)
    model = plan.model.to(device).eval()
    loader, split, pre, backend = build_val_loader(plan, world, device)
    precision = Precision(plan.cfg.train.amp, device)
    predictions = Predictions(args.predictions is not None)

    barrier()
    t0 = time.perf_counter()
    metrics = evaluate(model, loader, precision, device, on_batch=predictions)  # syncs at its end
    elapsed = max(gather_objects(time.perf_counter() - t0))  # the slowest rank's loop

    result = {
        "model": plan.model_name, "checkpoint": str(args.onnx or args.ckpt), "weights": plan.weights,
        "format": plan.fmt, **metrics, "num_classes": len(plan.classes), "img_size": pre.val_img_size,
        "resize_mode": pre.val_resize_mode, "resize": pre.val_resize,
        "crop_pct": pre.crop_pct if pre.val_resize_mode == "crop" else None,
        "interpolation": pre.interpolation,
        "backend": backend, "amp": precision.amp, "batch_size": plan.cfg.data.val_batch_size,
        "world_size": world.world_size, "device": str(device), "data": str(plan.val_dir),
        "skipped_images": len(split.skipped), "eval_seconds": elapsed,
        "images_per_s": metrics["num_images"] / max(elapsed, 1e-9),
    }
    if f"{plan.weights}_top1" in plan.trainer_val:
        result["trainer_val_top1"] = plan.trainer_val[f"{plan.weights}_top1"]

    if args.predictions is not None:
        indices, _ = loader.plan.rank_indices()  # the order this rank's loader read the images in
        rows = [r for part in gather_objects(predictions.rows(indices.tolist())) for r in part]
        if world.is_main:
            write_predictions(args.predictions, rows, split, plan.classes)
    if world.is_main:
        print(report(result), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a usage error exits 2 with argparse's message
    keep_host_memory()  # before the first tensor: PyTorch reads its huge-page setting once
    from .data import DataError
    ok = False
    try:
        check_args(args)
        run(args)
        ok = True
        return EXIT_OK
    except (ValidationError, ConfigError, DataError, PrecisionError) as e:
        if world_from_env().is_main:
            print(f"validate.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        cleanup(failed=not ok)

