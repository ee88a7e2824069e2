"""Our model registry: `create_model`, `list_models`, `get_data_config`.

Registered names are ours (tresnet_*, resnest*). Any timm model is reachable as `timm/<name>`, built by
`timm.create_model`. We never register into timm's registry, where our `tresnet_m` would shadow theirs.
Each model carries its preprocessing facts (`model.data_config`), which the data pipeline reads.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Callable

from torch import nn

TIMM_PREFIX = "timm/"
DATA_CONFIG_KEYS = ("input_size", "crop_pct", "interpolation", "mean", "std")

# TResNet reads RGB scaled to [0, 1] with no mean/std normalisation (paper, section 3; timm's cfg).
TRESNET_DATA_CONFIG = dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bilinear",
                           mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownModelError(ValueError):
    """A model name that is neither registered here nor a `timm/<name>` that timm knows."""


@dataclass(frozen=True)
class ModelEntry:
    constructor: Callable[..., nn.Module]
    data_config: dict


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(data_config: dict) -> Callable:
    """Decorator: register a constructor under its function name, with its data config."""
    missing = set(DATA_CONFIG_KEYS) - set(data_config)
    if missing:
        raise ValueError(f"data config lacks {sorted(missing)}")

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[fn.__name__] = ModelEntry(fn, dict(data_config))
        return fn

    return decorator


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style `pattern` (timm models: prefix `timm/`)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def is_known_model(name: str) -> bool:
    """True for a registered name, or for `timm/<x>` where timm knows `x`."""
    if name.startswith(TIMM_PREFIX):
        import timm
        return timm.is_model(name[len(TIMM_PREFIX):])
    return name in _REGISTRY


def check_model_name(name: str) -> None:
    """Raise UnknownModelError (with close matches) unless `name` is known; builds nothing."""
    if not is_known_model(name):
        raise _unknown(name)


def _unknown(name: str) -> UnknownModelError:
    if name.startswith(TIMM_PREFIX):
        import timm
        candidates = [TIMM_PREFIX + n for n in timm.list_models()]
    else:
        candidates = list(_REGISTRY)
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownModelError(
        f"Unknown model {name!r}.{hint} See tresnet_train.models.list_models() for registered "
        f"names; any timm model is available as 'timm/<name>' (timm.list_models()).")


def create_model(name: str, num_classes: int = 1000, pretrained: str | None = None,
                 norm: str = "auto", drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
    """Build a model by name, with `num_classes` outputs (0: pooled features).

    pretrained: path of a checkpoint in any supported format (ours, timm, official TResNet); a
        classifier whose shape differs from the checkpoint's is left freshly initialised (fine-tuning).
    norm: "auto" | "bn" | "iabn", TResNet's norm backend (ResNeSt and timm models: BatchNorm only).
    drop_path_rate: stochastic depth rate of the last block, rising linearly from 0 over the blocks.
    kwargs: passed to the model constructor (e.g. drop_rate, in_chans).
    """
    if name.startswith(TIMM_PREFIX):
        model = _create_timm_model(name, num_classes, norm, drop_path_rate, **kwargs)
    else:
        if name not in _REGISTRY:
            raise _unknown(name)
        entry = _REGISTRY[name]
        model = entry.constructor(num_classes=num_classes, norm=norm, drop_path_rate=drop_path_rate,
                                  **kwargs)
        model.data_config = dict(entry.data_config)
    if pretrained:
        from tresnet_train.models.weights import load_weights
        load_weights(model, pretrained, strict=True, skip_mismatched_classifier=True)
    return model


def _create_timm_model(name: str, num_classes: int, norm: str, drop_path_rate: float,
                       **kwargs) -> nn.Module:
    import timm
    check_model_name(name)
    if norm not in ("auto", "bn"):
        raise ValueError(f"norm={norm!r}: timm models ({name}) use their own norm layers; "
                         "use norm='auto' or 'bn'")
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    model = timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes,
                              **kwargs)
    model.data_config = _timm_data_config(model=model)
    return model


def _timm_data_config(**source) -> dict:
    from timm.data import resolve_data_config
    cfg = resolve_data_config(**source)
    return {k: cfg[k] for k in DATA_CONFIG_KEYS}


def get_data_config(model_or_name: nn.Module | str) -> dict:
    """Preprocessing facts of a model or model name: input_size (3, H, W), crop_pct, interpolation,
    mean, std. For timm models these come from timm's pretrained config."""
    if isinstance(model_or_name, nn.Module):
        model = getattr(model_or_name, "module", model_or_name)  # unwrap DDP
        model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
        if hasattr(model, "data_config"):
            return dict(model.data_config)
        return _timm_data_config(model=model)
    name = model_or_name
    if name.startswith(TIMM_PREFIX):
        import timm
        check_model_name(name)
        cfg = timm.models.get_pretrained_cfg(name[len(TIMM_PREFIX):])
        return _timm_data_config(pretrained_cfg=cfg.to_dict())
    if name not in _REGISTRY:
        raise _unknown(name)
    return dict(_REGISTRY[name].data_config)
