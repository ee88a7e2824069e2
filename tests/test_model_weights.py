"""Checkpoint formats both ways: ours ({"model", "ema"}), timm state dicts, official TResNet files
(InPlace-ABN); export to timm; weights-only loading. No pretrained file can be downloaded here, so
the official format is built from our weights with the documented key mapping (the inverse of timm's
`checkpoint_filter_fn`), with raw InPlace-ABN scales of both signs and stored blur filters."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models.tresnet import checkpoint_filter_fn as timm_official_filter
from torch import nn

from tresnet_train.models import (create_model, export_timm_state_dict, load_weights,
                                  read_state_dict)
from tresnet_train.models.weights import (classifier_name, classifier_rows,
                                              load_state_dict_strict)
from tresnet_train.models.layers import ConvNormAct, binomial_filter_3x3, inplace_abn_available

REPO = Path(__file__).parents[1]
TOLERANCE = 1e-4
IABN_EPS = 1e-5
SMALL = 64
needs_iabn = pytest.mark.skipif(not inplace_abn_available(),
                                reason="inplace_abn is not installed (pip install --no-build-isolation "
                                       "inplace-abn)")


def logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.rand(2, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def to_official(model: nn.Module, seed: int = 0) -> tuple[dict, dict]:
    """Our TResNet -> (official state dict, the BatchNorm-convention state dict it should load as).

    Official layout: `convN` is Sequential(Conv2d, InPlaceABN), or for an anti-aliased conv
    Sequential(Sequential(Conv2d, InPlaceABN), AntiAliasDownsampleLayer) whose `op.filt` buffer is
    stored; norm weights are raw InPlace-ABN weights `w` (any sign) that act as `|w| + eps`.
    """
    g = torch.Generator().manual_seed(seed)
    anti_aliased = {n for n, m in model.named_modules() if isinstance(m, ConvNormAct) and m.aa is not None}
    conv_norm = {n for n, m in model.named_modules() if isinstance(m, ConvNormAct)}
    official, expected = {}, {}
    for key, value in model.state_dict().items():
        match = re.fullmatch(r"(.*)\.(conv|bn)\.(\w+)", key)
        if match and match.group(1) in conv_norm:
            prefix, part, leaf = match.groups()
            index = {"conv": 0, "bn": 1}[part]
            official_key = (f"{prefix}.0.{index}.{leaf}" if prefix in anti_aliased
                            else f"{prefix}.{index}.{leaf}")
            if key.endswith("bn.weight"):
                sign = torch.randint(0, 2, value.shape, generator=g) * 2 - 1
                value = sign * (torch.rand(value.shape, generator=g) + 0.5)  # raw, both signs
                expected[key] = value.abs() + IABN_EPS
            elif key.endswith(("bn.bias", "bn.running_mean")):
                value = torch.randn(value.shape, generator=g) * 0.1
            official[official_key] = value
        else:
            official_key = key
            official[key] = value
        expected.setdefault(key, official[official_key])
    for prefix in anti_aliased:
        channels = model.get_submodule(prefix).conv.out_channels
        official[f"{prefix}.1.op.filt"] = binomial_filter_3x3().expand(channels, 1, 3, 3).clone()
    return official, expected


# --- (a) our checkpoints --------------------------------------------------------------------------

@pytest.mark.slow
def test_our_checkpoint_model_and_ema(tmp_path, randomize_norms):
    weights = randomize_norms(create_model("tresnet_tiny", norm="bn"), seed=1)
    ema = randomize_norms(create_model("tresnet_tiny", norm="bn"), seed=2)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": weights.state_dict(), "ema": ema.state_dict(), "epoch": 3,
                "config": {"model": {"name": "tresnet_tiny"}}}, path)
    assert torch.equal(logits(load_weights(create_model("tresnet_tiny", norm="bn"), path)),
                       logits(weights))
    assert torch.equal(logits(load_weights(create_model("tresnet_tiny", norm="bn"), path, use_ema=True)),
                       logits(ema))


def test_use_ema_without_ema_weights_is_an_error(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(create_model("tresnet_tiny", norm="bn").state_dict(), path)
    with pytest.raises(ValueError, match="no EMA"):
        load_weights(create_model("tresnet_tiny", norm="bn"), path, use_ema=True)
    torch.save({"model": create_model("tresnet_tiny", norm="bn").state_dict()}, path)
    with pytest.raises(ValueError, match="'ema'"):
        load_weights(create_model("tresnet_tiny", norm="bn"), path, use_ema=True)


def test_ddp_and_compile_prefixes_are_stripped(tmp_path, randomize_norms):
    model = randomize_norms(create_model("tresnet_tiny", norm="bn"))
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}}, path)
    assert torch.equal(logits(load_weights(create_model("tresnet_tiny", norm="bn"), path)),
                       logits(model))


def test_wrong_model_names_the_keys(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(create_model("tresnet_tiny", norm="bn").state_dict(), path)
    with pytest.raises(ValueError, match=r"tiny\.pth does not fit TResNet: \d+ tensors have other"):
        load_weights(create_model("tresnet_m", norm="bn"), path)
    torch.save(create_model("resnest50d", norm="bn").state_dict(), path)
    with pytest.raises(ValueError, match=r"tiny\.pth.*missing keys \['body"):
        load_weights(create_model("tresnet_tiny", norm="bn"), path)


def test_pretrained_path_with_new_num_classes_keeps_a_fresh_classifier(tmp_path, randomize_norms):
    source = randomize_norms(create_model("tresnet_tiny", norm="bn"))
    path = tmp_path / "in1k.pth"
    torch.save({"model": source.state_dict()}, path)
    model = create_model("tresnet_tiny", num_classes=10, pretrained=str(path), norm="bn")
    assert model.get_classifier().out_features == 10
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    same = create_model("tresnet_tiny", pretrained=str(path), norm="bn")
    assert torch.equal(logits(same), logits(source))


# --- (b) timm state dicts ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["tresnet_m", "resnest50d"])
def test_timm_state_dict_loads_and_matches_timm(name, tmp_path, randomize_norms):
    reference = randomize_norms(timm.create_model(name, pretrained=False))
    path = tmp_path / f"{name}_timm.pth"
    torch.save(reference.state_dict(), path)
    ours = load_weights(create_model(name, norm="bn"), path)
    assert (logits(ours) - logits(reference)).abs().max() <= TOLERANCE


# --- (c) official TResNet files ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["tresnet_m", "tresnet_v2_l"])
def test_official_file_loads_into_batchnorm_as_timm_converts_it(name, tmp_path):
    official, expected = to_official(create_model(name, norm="bn"))
    assert any(k.endswith(".op.filt") for k in official) and "body.conv1.0.weight" in official
    path = tmp_path / "official.pth"
    torch.save({"model": official}, path)

    ours = load_weights(create_model(name, norm="bn"), path)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, expected[key]), key  # keys mapped, |w| + eps, filters dropped

    # timm's own converter (its regex would also rename the stored filters, so they are left out)
    # gives the same tensors (timm's files keep no batch counter: it is 0 in both)
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
    converted = timm_official_filter({k: v for k, v in official.items() if not k.endswith("op.filt")},
                                     reference)
    assert converted.keys() == ours.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in converted.items())
    if name == "tresnet_m":  # and the outputs, once
        reference = timm.create_model(name, pretrained=False)
        reference.load_state_dict(converted, strict=True)
        assert (logits(ours) - logits(reference)).abs().max() <= TOLERANCE


def test_official_blur_filter_must_be_binomial(tmp_path):
    official, _ = to_official(create_model("tresnet_tiny", norm="bn"))
    key = next(k for k in official if k.endswith(".op.filt"))
    official[key] = torch.full_like(official[key], 1 / 9)  # a box filter
    path = tmp_path / "box.pth"
    torch.save({"model": official}, path)
    with pytest.raises(ValueError, match="binomial"):
        read_state_dict(path)


@needs_iabn
def test_official_file_into_inplace_abn_keeps_the_official_scale(tmp_path):
    """InPlace-ABN computes with `|w| + eps` from the official weight `w` itself: its kernel sees |w|,
    and its output equals the library's InPlaceABN holding the raw official weights."""
    from inplace_abn import InPlaceABN
    official, _ = to_official(create_model("tresnet_tiny", norm="bn"))
    path = tmp_path / "official.pth"
    torch.save({"model": official}, path)
    iabn = load_weights(create_model("tresnet_tiny", norm="iabn"), path)
    bn = load_weights(create_model("tresnet_tiny", norm="bn"), path)
    assert (logits(iabn) - logits(bn)).abs().max() <= TOLERANCE

    layer = iabn.body.layer2[0].conv1.bn  # official key body.layer2.0.conv1.0.1.*
    raw = {k[len("body.layer2.0.conv1.0.1."):]: v for k, v in official.items()
           if k.startswith("body.layer2.0.conv1.0.1.")}
    assert torch.allclose((layer.weight - IABN_EPS).abs(), raw["weight"].abs(), atol=1e-6)
    library = InPlaceABN(layer.num_features, activation="leaky_relu", activation_param=1e-3).eval()
    library.load_state_dict(raw)  # official weights, unconverted
    x = torch.randn(2, layer.num_features, 8, 8)
    with torch.no_grad():
        assert torch.allclose(layer.eval()(x.clone()), library(x.clone()), atol=1e-6)


@pytest.mark.parametrize("name, head", [("tresnet_tiny", "head.fc"), ("resnest50d", "fc")])
def test_one_classifier_rule_with_and_without_the_model(name, head):
    with torch.device("meta"):
        model = create_model(name, num_classes=7, norm="bn")
    state_dict = model.state_dict()
    assert classifier_name(model) == head
    assert classifier_rows(state_dict, model) == classifier_rows(state_dict) == 7
    headless = {k: v for k, v in state_dict.items() if not k.startswith(head + ".")}
    assert classifier_rows(headless, model) is None and classifier_rows(headless) is None


def test_strict_loader_names_the_source_and_the_missing_classifier():
    model = create_model("tresnet_tiny", num_classes=7, norm="bn")
    headless = {k: v for k, v in model.state_dict().items() if not k.startswith("head.fc.")}
    with pytest.raises(ValueError, match=r"mine\.pth does not match TResNet: missing keys "
                                         r"\['head\.fc\.weight', 'head\.fc\.bias'\] \(2\)"):
        load_state_dict_strict(model, headless, "mine.pth")
    load_state_dict_strict(model, headless, "mine.pth", strict=False)


@needs_iabn
def test_inplace_abn_refuses_negative_batchnorm_scales(tmp_path):
    model = create_model("tresnet_tiny", norm="bn")
    with torch.no_grad():
        model.body.conv1.bn.weight.fill_(-0.5)
    path = tmp_path / "negative.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="norm='bn'"):
        load_weights(create_model("tresnet_tiny", norm="iabn"), path)


# --- export to timm ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["tresnet_m", "tresnet_v2_l", "resnest50d"])
def test_export_loads_strictly_in_timm(name, randomize_norms):
    ours = randomize_norms(create_model(name, norm="bn"))
    ours.train()(torch.rand(2, 3, SMALL, SMALL))  # moves running stats and the batch counter
    reference = timm.create_model(name, pretrained=False)
    reference.load_state_dict(export_timm_state_dict(ours), strict=True)
    assert (logits(ours) - logits(reference)).abs().max() <= TOLERANCE


@pytest.mark.slow
@needs_iabn
def test_inplace_abn_model_exports_to_timm(randomize_norms):
    ours = randomize_norms(create_model("tresnet_m", norm="iabn"))
    reference = timm.create_model("tresnet_m", pretrained=False)
    reference.load_state_dict(export_timm_state_dict(ours), strict=True)
    assert (logits(ours) - logits(reference)).abs().max() <= TOLERANCE


@pytest.mark.slow
def test_convert_checkpoint_script_official_to_timm(tmp_path):
    official, expected = to_official(create_model("tresnet_m", norm="bn"))
    src, dst = tmp_path / "official.pth", tmp_path / "timm.pth"
    torch.save({"model": official}, src)
    subprocess.run([sys.executable, "scripts/convert_checkpoint.py", str(src), str(dst),
                    "--verify-timm-model", "tresnet_m"], cwd=REPO, check=True)
    converted = torch.load(dst, weights_only=True)
    reference = timm.create_model("tresnet_m", pretrained=False)
    reference.load_state_dict(converted, strict=True)
    assert all(torch.equal(converted[k], v) for k, v in expected.items())


@pytest.mark.slow
def test_convert_script_prints_the_timm_call_and_the_validation_input(tmp_path):
    """Our 10-class checkpoint trained at 128 px: the printed call loads it (a bare
    `timm.create_model("tresnet_m")` would not), and the input it was validated at is stated."""
    from tresnet_train.config import Config, to_dict

    cfg = Config()
    cfg.model.name, cfg.model.num_classes = "tresnet_m", 10
    cfg.data.img_size, cfg.data.crop_pct = 128, 1.0
    model = create_model("tresnet_m", num_classes=10, norm="bn")
    data_config = {"input_size": [3, 224, 224], "crop_pct": 0.875, "interpolation": "bilinear",
                   "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    src, dst = tmp_path / "last.pth", tmp_path / "timm.pth"
    torch.save({"model": model.state_dict(), "ema": None, "config": to_dict(cfg),
                "model_name": "tresnet_m", "data_config": data_config}, src)
    proc = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", str(src), str(dst)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "  model = timm.create_model('tresnet_m', num_classes=10)" in lines, proc.stdout
    code = "\n".join(line.strip() for line in lines if line.startswith("  model"))
    scope = {"timm": timm, "torch": torch}
    exec(code, scope)  # the two printed lines, as a user would paste them
    assert all(torch.equal(scope["model"].state_dict()[k], v) for k, v in model.state_dict().items())
    assert ("validate at: 128 px (crop_pct 1: resize the short side to 128, center crop 128), "
            "bilinear, mean (0.0, 0.0, 0.0) std (1.0, 1.0, 1.0) on RGB in [0, 1]") in lines, proc.stdout
    assert "--img-size 128 --crop-pct 1" in proc.stdout


# --- weights-only loading ------------------------------------------------------------------------

class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))  # would create the file if it were unpickled


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": _Exploit(marker)}}, path)
    with pytest.raises(ValueError, match="evil.pth") as err:
        load_weights(create_model("tresnet_tiny", norm="bn"), path)
    assert "weights-only" in str(err.value)
    assert not marker.exists()


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="notes.pth"):
        load_weights(create_model("tresnet_tiny", norm="bn"), path)
