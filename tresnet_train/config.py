"""One typed config tree, loaded from YAML with dotted command-line overrides.

Defaults live here with a one-line comment each (units included). Loading is strict: an unknown key,
a wrong type, an invalid choice or a bad value raises `ConfigError` naming the key and what is valid,
and the entry points turn that into exit code 2 before any data or GPU work. YAML is read with
a safe loader, so a `!!python/object` tag is refused; numbers like `5e-5` are floats (YAML 1.2),
not the strings YAML 1.1 makes of them. A config may extend another with
`base: other.yaml` (resolved relative to the file that names it; cycles are an error).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads `5e-5`, `1E4` (no dot) as floats, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _safe_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A config problem the user can fix; the message names the file, key or value."""


# The allowed values of each choice key, beside the dataclass holding it: config validation
# (CHOICES), the command lines' `choices=` and their error messages all read these lists.
NORMS = ("auto", "bn", "iabn")  # model.norm


@dataclass
class ModelConfig:
    name: str = "tresnet_m"  # a registered name (see `list_models()`) or timm/<name>
    num_classes: int = 1000  # must equal the number of class folders in data.root
    pretrained: str | None = None  # checkpoint path loaded into the model before training (any format)
    init_from: str | None = None  # fine-tuning: model (or EMA) weights of a checkpoint; optimizer starts fresh
    norm: str = "auto"  # NORMS: auto | bn | iabn (InPlace-ABN; auto = iabn on CUDA when installed)
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks
    drop_block_rate: float = 0.0  # DropBlock in the last two stages (ResNeSt only), ramped linearly over epochs
    channels_last: bool = False  # NHWC memory format (measure per model: it can be slower)
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute each residual block in backward: less memory, ~1 more forward
    sync_bn: bool = False  # batch statistics over all processes (per process is the published recipes' way)


SOURCES = ("folder", "digits", "synthetic")  # data.source
DECODERS = ("dali", "torch")  # the data backends themselves
BACKENDS = ("auto", *DECODERS)  # data.backend
TRAIN_INTERPOLATIONS = ("", "bilinear", "bicubic", "random")  # data.train_interpolation
AUTOAUGMENT_POLICIES = ("", "original")  # data.autoaugment


@dataclass
class DataConfig:
    source: str = "folder"  # folder (data.root, ImageFolder) | digits (built offline) | synthetic
    root: str = ""  # folder with train/ and val/ in ImageFolder layout
    backend: str = "auto"  # auto | dali | torch (auto = DALI when installed)
    img_size: int = 224  # train crop size, pixels
    val_img_size: int = 0  # eval crop size, pixels (0 = img_size)
    crop_pct: float = 0.0  # eval center-crop fraction (0 = the model's data config)
    batch_size: int = 64  # images per process per step
    val_batch_size: int = 0  # images per process per eval step (0 = batch_size)
    workers: int = 8  # loader worker processes (torch) or threads (DALI) per process
    strict: bool = False  # undecodable images are an error instead of skipped and reported
    max_bad_fraction: float = 0.001  # share of files failing mid-run (deleted, unreadable) that ends a run
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range
    hflip: float = 0.5  # horizontal flip probability
    train_interpolation: str = ""  # train resize filter: "" (the model's) | bilinear | bicubic | random
    randaugment: str = ""  # timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1 ("" = off)
    autoaugment: str = ""  # AutoAugment policy: original (Cubuk et al.'s ImageNet policy) | "" (off)
    color_jitter: float = 0.0  # brightness, contrast, saturation factors from [1 - x, 1 + x] (0 = off)
    pca_lighting: float = 0.0  # AlexNet PCA lighting noise, std of its 3 coefficients (0 = off)
    random_erasing: float = 0.0  # probability, applied on the batch after the loader
    mixup: float = 0.0  # mixup alpha (0 = off)
    cutmix: float = 0.0  # cutmix alpha (0 = off)
    repeated_aug: int = 0  # repeated augmentation count per image (0 or 1 = off; DeiT uses 3)
    synthetic_size: int = 1024  # images per epoch for source=synthetic


OPTIMIZERS = ("sgd", "adamw", "lamb")  # optim.name
WITH_BETAS = ("adamw", "lamb")  # the optimizers that take optim.betas and keep two moments
SCHEDULES = ("cosine", "onecycle", "step")  # optim.schedule


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (Nesterov) | adamw | lamb, timm's implementations
    lr: float = 0.1  # peak learning rate per 256 images; scaled by the global batch
    weight_decay: float = 1e-4  # applied to weights with ndim > 1 only (never to norms or biases)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # SGD Nesterov momentum
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW/LAMB betas
    schedule: str = "cosine"  # cosine | onecycle | step, a pure function of the global step
    warmup_epochs: float = 5.0  # linear warm-up from warmup_lr_ratio * lr (cosine and step)
    warmup_lr_ratio: float = 0.0  # warm-up starts at this fraction of the peak lr
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of the peak lr
    cooldown_epochs: int = 0  # cosine: the last N of train.epochs stay at the floor (timm's cool-down)
    lr_per_epoch: bool = False  # cosine: one lr per epoch, timm's scheduler (false: a new lr every step)
    onecycle_pct_start: float = 0.2  # fraction of steps spent rising (one-cycle)
    step_milestones: list[float] = field(default_factory=lambda: [30.0, 60.0, 90.0])  # epochs (step)
    step_gamma: float = 0.1  # lr factor at each milestone (step)
    clip_grad: float = 0.0  # max global grad norm (0 = off)
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimizer step


AMP_MODES = ("auto", "bf16", "fp16", "none")  # train.amp
LOSSES = ("ce", "bce")  # train.loss
REPORT_SOURCES = ("auto", "model", "ema")  # train.report


@dataclass
class TrainConfig:
    epochs: int = 300  # total epochs
    amp: str = "auto"  # auto (bf16 on GPU, none on CPU) | bf16 | fp16 (with GradScaler) | none
    loss: str = "ce"  # ce (label-smoothed, soft targets under mixup) | bce (target threshold)
    label_smoothing: float = 0.1  # for ce and bce
    bce_target_thresh: float = 0.0  # bce: targets above this become 1 (0 = keep soft)
    ema: bool = True  # keep an exponential moving average of the weights
    ema_decay: float = 0.9997  # EMA decay per optimizer step
    report: str = "auto"  # headline weights: model | ema | auto (ema when train.ema): best.pth, summary
    val_every: int = 1  # validate every N epochs (and always after the last)
    steps_per_epoch: int = 0  # cap on steps per epoch, for smoke runs (0 = the whole loader)


DEVICES = ("auto", "cuda", "cpu")  # run.device


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # run folder: config, checkpoints, logs, TensorBoard
    resume: str = "auto"  # auto (newest valid checkpoint in output_dir) | <path> | none
    seed: int = 0  # every random stream derives from it: see data/plan.py
    device: str = "auto"  # auto | cuda | cpu
    keep_top_k: int = 3  # checkpoints kept by validation top-1, besides last and best
    ckpt_every_steps: int = 0  # also checkpoint every N optimizer steps mid-epoch (0 = epoch ends only)
    log_every: int = 20  # steps between progress updates (the only host syncs in the loop)
    tensorboard: bool = True  # write TensorBoard scalars under output_dir/tb
    tf32: bool = True  # allow TF32 matmul/conv on Ampere and newer
    dist_timeout_min: float = 60.0  # collective timeout, minutes: must cover rank 0 writing checkpoints


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.norm": NORMS,
    "data.source": SOURCES,
    "data.backend": BACKENDS,
    "optim.name": OPTIMIZERS,
    "optim.schedule": SCHEDULES,
    "train.amp": AMP_MODES,
    "train.loss": LOSSES,
    "train.report": REPORT_SOURCES,
    "data.train_interpolation": TRAIN_INTERPOLATIONS,
    "data.autoaugment": AUTOAUGMENT_POLICIES,
    "run.device": DEVICES,
}

# Keys whose value must be > 0 (or >= 0), checked after loading so a typo costs seconds.
POSITIVE = ("model.num_classes", "data.img_size", "data.batch_size", "optim.lr", "train.epochs",
            "optim.accum_steps", "train.val_every", "run.log_every", "data.synthetic_size",
            "run.dist_timeout_min")
NON_NEGATIVE = ("data.workers", "data.val_img_size", "data.val_batch_size", "data.crop_pct",
                "data.random_erasing", "data.mixup", "data.color_jitter", "data.pca_lighting",
                "data.cutmix", "data.repeated_aug",
                "optim.weight_decay", "optim.momentum", "optim.warmup_epochs", "optim.clip_grad",
                "optim.cooldown_epochs",
                "model.drop_path_rate", "model.drop_block_rate", "train.label_smoothing", "train.ema_decay",
                "train.steps_per_epoch", "run.keep_top_k", "run.ckpt_every_steps")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else tp.__name__


def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, str) and value.lower() == "none" and type(None) in typing.get_args(tp):
            return None  # `key=none` on the command line clears an optional path
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} "
                      f"({type(value).__name__})")


def _merge(node, data: dict, prefix: str) -> None:
    """Write the plain dict `data` into the dataclass `node`, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, "
                          f"got {data!r}")
    types_ = _field_types(type(node))
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in types_:
            close = difflib.get_close_matches(str(key), types_, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint} "
                              f"(valid keys here: {', '.join(types_)})")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, dotted + ".")
        else:
            setattr(node, key, _coerce(value, types_[key], dotted))


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict:
    """Read a YAML config and the chain of `base:` files below it, bases first."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config 'base:' cycle: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid (safe) YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    data.pop("published", None)  # each recipe's record of its source (tresnet_train.recipes)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: 'base' must be a file name, got {base!r}")
    return _deep_update(_read_yaml(path.parent / base, (*seen, path)), data)


def _deep_update(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=0.3` -> ("optim.lr", 0.3); the value is read as YAML (so `none`, lists, ints work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    try:
        value = _safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML: {e}") from None
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def validate(cfg: Config) -> Config:
    """Value checks that types alone cannot express; raises ConfigError naming the key."""
    flat = to_dict(cfg)

    def get(dotted):
        node = flat
        for part in dotted.split("."):
            node = node[part]
        return node

    for key, valid in CHOICES.items():
        if get(key) not in valid:
            raise ConfigError(f"config key '{key}': invalid value {get(key)!r} "
                              f"(valid: {', '.join(valid)})")
    for key in POSITIVE:
        if get(key) <= 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {get(key)!r}")
    for key in NON_NEGATIVE:
        if get(key) < 0:
            raise ConfigError(f"config key '{key}': must be >= 0, got {get(key)!r}")
    lo, hi = (cfg.data.scale + [None, None])[:2]
    if len(cfg.data.scale) != 2 or not 0 < lo <= hi <= 1:
        raise ConfigError(f"config key 'data.scale': expected [min, max] with 0 < min <= max <= 1, "
                          f"got {cfg.data.scale}")
    if cfg.model.drop_block_rate and not cfg.model.name.startswith("resnest"):
        raise ConfigError(f"config key 'model.drop_block_rate': DropBlock is built into the ResNeSt "
                          f"models only, not {cfg.model.name}; set model.drop_block_rate=0")
    if cfg.data.randaugment and cfg.data.autoaugment:
        raise ConfigError(f"config keys 'data.randaugment' ({cfg.data.randaugment}) and "
                          f"'data.autoaugment' ({cfg.data.autoaugment}) are both set: keep one")
    if cfg.train.report == "ema" and not cfg.train.ema:
        raise ConfigError("config key 'train.report' is ema but train.ema is false: set "
                          "train.report=model, or train.ema=true")
    if cfg.optim.lr_per_epoch and cfg.optim.schedule != "cosine":
        raise ConfigError(f"config key 'optim.lr_per_epoch' is true but optim.schedule is "
                          f"{cfg.optim.schedule}: it applies to cosine only; set optim.lr_per_epoch=false")
    if cfg.optim.cooldown_epochs >= cfg.train.epochs:
        raise ConfigError(f"config key 'optim.cooldown_epochs' is {cfg.optim.cooldown_epochs}, not "
                          f"shorter than train.epochs={cfg.train.epochs}: lower it")
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError(f"config key 'data.max_bad_fraction': expected a fraction within 0..1 "
                          f"(0.001 = 0.1%), got {cfg.data.max_bad_fraction!r}")
    if cfg.data.source == "folder" and not cfg.data.root:
        raise ConfigError("config key 'data.root' is empty: set it to a folder with train/ and val/ "
                          "(e.g. data.root=/data/imagenet), or use data.source=digits for the demo")
    if cfg.run.resume not in ("auto", "none") and not Path(cfg.run.resume).is_file():
        raise ConfigError(f"config key 'run.resume': checkpoint file not found: {cfg.run.resume} "
                          "(use auto, none or an existing path)")
    for key in ("model.pretrained", "model.init_from"):
        path = get(key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"config key '{key}': checkpoint file not found: {path} "
                              f"(train that run first, or set {key}=PATH to an existing checkpoint)")
    return cfg


def report_source(cfg: Config) -> str:
    """The weights whose top-1 is the run's headline number: "ema" or "model" (train.report)."""
    if cfg.train.report == "auto":
        return "ema" if cfg.train.ema else "model"
    return cfg.train.report


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (and its bases) <- dotted overrides, then validated."""
    cfg = Config()
    if path is not None:
        _merge(cfg, _read_yaml(Path(path), ()), "")
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value), "")
    return validate(cfg)


def from_dict(data: dict) -> Config:
    """Rebuild a Config from the plain data stored in a checkpoint (same strictness)."""
    cfg = Config()
    _merge(cfg, data, "")
    return cfg


def to_dict(cfg) -> dict:
    """Plain data (dicts, lists, str, numbers, None): safe in YAML and in weights_only checkpoints."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
