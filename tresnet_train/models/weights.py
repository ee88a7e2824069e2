"""Model weights in and out: our checkpoints, timm state dicts, official TResNet (InPlace-ABN) files.

Formats read by `load_weights` (told apart by their keys, never by the file name):
(a) ours: a dict with "model" (and optionally "ema") state dicts, plus anything else the trainer stores;
(b) timm: a bare state dict. Our key names equal timm's, so (a) and (b) hold the same layout;
(c) official TResNet (https://github.com/Alibaba-MIIL/TResNet): `{"model": state_dict}` with the
    official key names (`body.conv1.0.weight`, ...) and InPlace-ABN weights. Converted as timm's
    `checkpoint_filter_fn` (timm/models/tresnet.py) documents: `convN.0.0`/`convN.0` -> `convN.conv`,
    `convN.0.1`/`convN.1` -> `convN.bn`, `downsample.I.0`/`.1` -> `downsample.I.conv`/`.bn`, and every
    norm weight `w` -> `|w| + 1e-5`, the scale InPlace-ABN actually applies. Stored anti-alias filters
    (`...op.filt`, saved by the official non-JIT layer) are checked to be the 3x3 binomial and dropped:
    ours is a non-persistent buffer.
Every file is read with `torch.load(weights_only=True)`: a pickle that would run code is refused.
Wrapper prefixes (`module.` from DDP, `_orig_mod.` from torch.compile) are stripped.

Every reader of weights goes through here (the trainer's pretrained/init_from, validate.py,
scripts/export.py, scripts/convert_checkpoint.py): `classifier_name` is the one rule for which keys
are the classifier, `load_state_dict_strict` the one loader that refuses what does not fit.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from tresnet_train import checkpoint
from tresnet_train.models.layers import binomial_filter_3x3

log = logging.getLogger(__name__)

OFFICIAL_STEM_KEY = "body.conv1.0.weight"  # official stem conv; timm/ours: body.conv1.conv.weight
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
IABN_EPS = 1e-5  # InPlace-ABN's default eps, used by every official TResNet norm layer
_OFFICIAL_KEY_RULES = [  # (pattern, replacement), applied in order; dots escaped (timm's are not)
    (re.compile(r"conv(\d+)\.0\.0\."), r"conv\1.conv."),  # anti-aliased conv: Sequential(conv_abn, aa)
    (re.compile(r"conv(\d+)\.0\.1\."), r"conv\1.bn."),
    (re.compile(r"conv(\d+)\.0\."), r"conv\1.conv."),  # plain conv_abn: Sequential(conv, abn)
    (re.compile(r"conv(\d+)\.1\."), r"conv\1.bn."),
    (re.compile(r"downsample\.(\d+)\.0\."), r"downsample.\1.conv."),
    (re.compile(r"downsample\.(\d+)\.1\."), r"downsample.\1.bn."),
]
_OFFICIAL_BLUR_KEY = re.compile(r"\.op\.filt$")
# The classifier weight of a state dict whose model is not at hand: TResNet's (ours and timm's) and
# ResNet/ResNeSt's. With the model, `classifier_name` asks it instead.
CLASSIFIER_WEIGHT_KEYS = ("head.fc.weight", "fc.weight")


def read_checkpoint(path: str | Path) -> dict:
    """`tresnet_train.checkpoint.load` (weights_only=True), its refusals as ValueError; a dict only."""
    try:
        obj = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise ValueError(str(e)) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return obj


def _is_state_dict(obj: dict) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_state_dict(obj: dict, use_ema: bool = False, source: str = "checkpoint") -> dict:
    """The state dict inside a checkpoint: a bare state dict, or its "ema" / "model" entry."""
    if _is_state_dict(obj):
        if use_ema:
            raise ValueError(f"{source} is a bare state dict with no EMA weights; drop use_ema")
        return obj
    key = "ema" if use_ema else "model"
    if isinstance(obj.get(key), dict):
        return obj[key]
    if not use_ema and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    raise ValueError(f"{source} has no {key!r} state dict (top-level keys: {sorted(obj)[:10]})")


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Remove `module.` (DDP) and `_orig_mod.` (torch.compile) from the start of every key."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def detect_format(state_dict: dict) -> str:
    """"official" for an official TResNet state dict, else "timm" (our layout is timm's)."""
    return "official" if OFFICIAL_STEM_KEY in state_dict else "timm"


def convert_official_state_dict(state_dict: dict) -> dict:
    """Official TResNet (InPlace-ABN) state dict -> timm/our layout with BatchNorm-convention weights."""
    out = {}
    for k, v in state_dict.items():
        if _OFFICIAL_BLUR_KEY.search(k):
            expected = binomial_filter_3x3().expand_as(v).to(v.dtype)
            if not torch.allclose(v, expected, atol=1e-6):
                raise ValueError(f"{k}: stored anti-alias filter is not the 3x3 binomial [1,2,1]^2/16")
            continue
        for pattern, replacement in _OFFICIAL_KEY_RULES:
            k = pattern.sub(replacement, k)
        if k.endswith(".bn.weight"):
            v = v.abs() + IABN_EPS  # InPlace-ABN scales by |w| + eps; BatchNorm by w
        out[k] = v
    for k in [k for k in out if k.endswith(".bn.running_var")]:  # old ABN files lack this counter
        out.setdefault(k[: -len("running_var")] + "num_batches_tracked", torch.tensor(0))
    return out


def to_timm_layout(state_dict: dict) -> dict:
    """Any supported state dict -> timm/our key layout (official files are converted)."""
    state_dict = strip_wrapper_prefixes(state_dict)
    if detect_format(state_dict) == "official":
        state_dict = convert_official_state_dict(state_dict)
    return state_dict


def read_state_dict(path: str | Path, use_ema: bool = False) -> dict:
    """Read a checkpoint file of any supported format as a state dict in timm/our layout."""
    obj = read_checkpoint(path)
    return to_timm_layout(select_state_dict(obj, use_ema, source=str(path)))


def classifier_name(model: nn.Module) -> str | None:
    """Module name of `model`'s classifier (timm's `get_classifier()`), None for a model without one."""
    if not hasattr(model, "get_classifier"):
        return None
    classifier = model.get_classifier()
    return next((name for name, m in model.named_modules() if m is classifier), None)


def classifier_rows(state_dict: dict, model: nn.Module | None = None) -> int | None:
    """The classes a state dict's classifier predicts: the rows of `model`'s classifier weight
    (`classifier_name`), or without a model, of the first of `CLASSIFIER_WEIGHT_KEYS` present.
    None when there is no such weight (a headless model)."""
    if model is not None:
        name = classifier_name(model)
        keys = (f"{name}.weight",) if name else ()
    else:
        keys = CLASSIFIER_WEIGHT_KEYS
    weight = next((state_dict[k] for k in keys if k in state_dict), None)
    return int(weight.shape[0]) if weight is not None else None


def load_state_dict_strict(model: nn.Module, state_dict: dict, source: str,
                           skip_mismatched_classifier: bool = False, strict: bool = True) -> None:
    """Load a timm/our-layout state dict into `model`; every refusal is a ValueError naming `source`.

    strict: every key must match (missing and unexpected keys are named).
    skip_mismatched_classifier: keep the model's classifier when `state_dict`'s has another shape
        or the model has none (fine-tuning to a new number of classes).
    """
    state_dict = dict(state_dict)
    model_state = model.state_dict()
    skipped = []
    head = classifier_name(model)
    if skip_mismatched_classifier and head:
        for k in [k for k in state_dict if k.startswith(head + ".")]:
            if k not in model_state or model_state[k].shape != state_dict[k].shape:
                skipped.append(k)
                del state_dict[k]
        if skipped:
            log.info("%s: classifier %s not loaded (shape differs from the model's)", source, skipped)
    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
                  for k, v in state_dict.items() if k in model_state and v.shape != model_state[k].shape]
    if mismatched:
        raise ValueError(f"{source} does not fit {type(model).__name__}: {len(mismatched)} tensors "
                         f"have other shapes, e.g. {mismatched[:3]}. Is it the right model / "
                         f"num_classes?")
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # a layer refused a value (e.g. InPlace-ABN and a negative scale)
        raise ValueError(f"{source}: cannot load into {type(model).__name__}: {e}") from e
    missing = [k for k in result.missing_keys if not (skipped and k.startswith(head + "."))]
    if strict and (missing or result.unexpected_keys):
        raise ValueError(
            f"{source} does not match {type(model).__name__}: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected keys "
            f"{result.unexpected_keys[:5]} ({len(result.unexpected_keys)}). Is it the right model?")


def load_weights(model: nn.Module, path: str | Path, use_ema: bool = False, strict: bool = True,
                 skip_mismatched_classifier: bool = False) -> nn.Module:
    """Load a checkpoint of any supported format into `model` (ours, or a timm model).

    use_ema: take the checkpoint's "ema" weights instead of "model"; strict and
    skip_mismatched_classifier as `load_state_dict_strict`.
    """
    load_state_dict_strict(model, read_state_dict(path, use_ema), str(path),
                           skip_mismatched_classifier=skip_mismatched_classifier, strict=strict)
    return model


def export_timm_state_dict(model_or_state_dict: nn.Module | dict) -> dict:
    """A state dict that `timm.create_model(<same name>).load_state_dict(..., strict=True)` accepts.

    Takes a model (unwrapped or not), a state dict of any supported format, or our checkpoint dict
    (its "model" entry). Norm weights are already in BatchNorm convention, also for InPlace-ABN models.
    """
    if isinstance(model_or_state_dict, nn.Module):
        state_dict = model_or_state_dict.state_dict()
    else:
        state_dict = select_state_dict(model_or_state_dict)
    return {k: v.detach().clone() for k, v in to_timm_layout(state_dict).items()}


def convert_checkpoint(src: str | Path, dst: str | Path, use_ema: bool = False,
                       verify_timm_model: str | None = None) -> dict:
    """Read `src` (any format), write its timm-format state dict to `dst`, optionally check that it
    loads strictly into `timm.create_model(verify_timm_model)`. Returns the state dict."""
    state_dict = export_timm_state_dict(read_state_dict(src, use_ema))
    if verify_timm_model:
        import timm
        num_classes = classifier_rows(state_dict) or 0
        reference = timm.create_model(verify_timm_model, pretrained=False, num_classes=num_classes)
        reference.load_state_dict(state_dict, strict=True)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, dst)
    return state_dict
