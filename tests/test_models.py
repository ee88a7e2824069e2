"""Model zoo contracts: every registered model forwards, backprops to every parameter, has a pinned
parameter count and equals timm's same-named model with the same weights; TResNet's structure follows
the paper; norm backends agree; models build on meta and compile without graph breaks. CPU only."""
import ast
import copy
import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.utils.flop_counter
from torch import nn

from tresnet_train.models import (UnknownModelError, create_model, get_data_config,
                                  init_non_persistent_buffers, is_known_model, list_models)
from timm.layers import DropPath
from tresnet_train.models.layers import (BlurPool2d, ConvNormAct, SqueezeExcite, inplace_abn_available,
                                         resolve_norm_layer)
from tresnet_train.models.resnest import ResNestBottleneck
from tresnet_train.models.tresnet import BasicBlock, Bottleneck

# Parameter counts: timm 1.0.31 for the models it has, ours for tresnet_tiny.
PARAM_COUNTS = {
    "tresnet_m": 31_389_032,
    "tresnet_l": 55_989_256,
    "tresnet_xl": 78_436_244,
    "tresnet_v2_l": 46_174_824,
    "resnest50d": 27_483_240,
    "resnest101e": 48_275_016,
    "tresnet_tiny": 997_944,
}
WITH_TIMM_COUNTERPART = [n for n in PARAM_COUNTS if n != "tresnet_tiny"]
TOLERANCE = 1e-4  # max abs logit difference to timm, fp32 eval mode
SMALL = 64  # input side for tests that do not need a full-size image


def slow_unless_tiny(names: list[str]) -> list:
    """Parameters for `names`, the full-size models marked slow: each takes seconds on a CPU core."""
    return [n if n == "tresnet_tiny" else pytest.param(n, marks=pytest.mark.slow) for n in names]

needs_iabn = pytest.mark.skipif(not inplace_abn_available(),
                                reason="inplace_abn is not installed (pip install --no-build-isolation "
                                       "inplace-abn)")


@functools.lru_cache(maxsize=None)
def _pristine(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, norm="bn")


def fresh_model(name: str) -> nn.Module:
    """A new fp32 BatchNorm model (a copy of a cached one: building the big models takes seconds)."""
    return copy.deepcopy(_pristine(name))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def timm_reference(randomize_norms):
    """name -> {"params": timm's count, 224: (ours, timm) logits, 448: (ours, timm) logits}, from one
    set of random weights loaded into both models (batch 1, fp32, eval mode)."""
    cache = {}

    def compute(name):
        if name not in cache:
            ours = randomize_norms(fresh_model(name)).eval()
            ref = timm.create_model(name, pretrained=False).eval()
            ref.load_state_dict(ours.state_dict(), strict=True)
            out = {"params": n_params(ref)}
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for size in (224, 448):
                    x = torch.rand(1, 3, size, size, generator=g)
                    out[size] = (ours(x), ref(x))
            cache[name] = out
        return cache[name]

    return compute


# --- registry -------------------------------------------------------------------------------------

def test_registered_names():
    assert set(list_models()) == set(PARAM_COUNTS)
    assert list_models("tresnet_*") == ["tresnet_l", "tresnet_m", "tresnet_tiny", "tresnet_v2_l",
                                        "tresnet_xl"]


def test_unknown_model_names_close_matches_and_list_models():
    with pytest.raises(UnknownModelError, match="tresnet_m") as err:
        create_model("tresnet_mm")
    assert isinstance(err.value, ValueError)
    assert "list_models()" in str(err.value)
    with pytest.raises(UnknownModelError, match="timm/resnet50"):
        create_model("timm/resnet5O")


def test_is_known_model():
    assert is_known_model("tresnet_m") and is_known_model("timm/resnet50")
    assert not is_known_model("resnet50") and not is_known_model("timm/not_a_model")


def test_timm_models_are_one_line():
    model = create_model("timm/resnet50", num_classes=10)
    assert n_params(model) == 25_557_032 - 2048 * 990 - 990
    assert model(torch.rand(2, 3, SMALL, SMALL)).shape == (2, 10)
    cfg = timm.data.resolve_data_config(model=timm.create_model("resnet50"))
    assert get_data_config(model) == {k: cfg[k] for k in get_data_config(model)}
    assert get_data_config("timm/resnet50") == get_data_config(model)
    with pytest.raises(ValueError, match="own norm layers"):
        create_model("timm/resnet50", norm="iabn")


def test_data_configs():
    tresnet = get_data_config("tresnet_m")
    assert tresnet == dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bilinear",
                           mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    for name in list_models():
        with torch.device("meta"):
            model = create_model(name, norm="bn")
        assert get_data_config(model) == get_data_config(name)
        if name in WITH_TIMM_COUNTERPART:  # same preprocessing as timm's default pretrained config
            assert get_data_config(name) == get_data_config(f"timm/{name}")
    assert get_data_config("resnest101e")["input_size"] == (3, 256, 256)


# --- every registered model -----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_pinned_parameter_count(name):
    assert n_params(fresh_model(name)) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", slow_unless_tiny(list(PARAM_COUNTS)))
def test_backward_reaches_every_parameter(name, randomize_norms):
    model = randomize_norms(fresh_model(name)).train()  # non-zero residual scales: all grads flow
    x = torch.rand(2, 3, 32, 32)  # the smallest input that reaches the last stage (1x1)
    logits = model(x)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", slow_unless_tiny(list(PARAM_COUNTS)))
def test_num_classes_and_classifier_reset(name):
    with torch.device("meta"):  # shapes only: the meta device runs no arithmetic
        model = create_model(name, num_classes=10, norm="bn").eval()
        x = torch.empty(2, 3, 224, 224)
        assert model(x).shape == (2, 10)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        assert create_model(name, num_classes=0, norm="bn")(x).shape == (2, model.num_features)
    assert model.num_features == {"tresnet_tiny": 512, "tresnet_l": 2432, "tresnet_xl": 2656}.get(name, 2048)


@pytest.mark.parametrize("name", slow_unless_tiny(list(PARAM_COUNTS)))
def test_forward_448(name, timm_reference):
    if name in WITH_TIMM_COUNTERPART:
        logits = timm_reference(name)[448][0]  # computed once, also used for the timm comparison
    else:
        with torch.no_grad():
            logits = fresh_model(name).eval()(torch.rand(1, 3, 448, 448))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.slow
@pytest.mark.parametrize("name", WITH_TIMM_COUNTERPART)
def test_matches_timm_with_same_weights(name, size, timm_reference):
    ref = timm_reference(name)
    assert ref["params"] == PARAM_COUNTS[name]
    ours, theirs = ref[size]
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    assert theirs.std() > 0.01  # the logits carry signal, not a constant


@pytest.mark.slow
def test_gradients_match_timm_with_same_weights(randomize_norms):
    """Our blur and SE-gated conv3 keep less for backward (layers.py); their gradients are timm's."""
    ours = randomize_norms(fresh_model("tresnet_m")).train()
    ref = timm.create_model("tresnet_m", pretrained=False).train()
    ref.load_state_dict(ours.state_dict())
    x = torch.rand(2, 3, SMALL, SMALL)
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, theirs[name].grad, rtol=1e-5, atol=1e-6 * theirs[name].grad.abs().max()), name


@pytest.mark.slow
@pytest.mark.parametrize("name", slow_unless_tiny(["tresnet_tiny", "resnest50d"]))
def test_drop_path_rises_linearly_over_blocks(name, randomize_norms):
    model = randomize_norms(create_model(name, norm="bn", drop_path_rate=0.3))
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck, ResNestBottleneck))]
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]
    expected = torch.linspace(0, 0.3, len(blocks)).tolist()
    assert rates == pytest.approx(expected)
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))  # identity in eval
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))  # random in training


# --- gradient checkpointing ------------------------------------------------------------------------

def assert_same_step(plain, other, counted, runs: int, precision: str = "fp32"):
    """One training step with drop path: logits, every gradient, running statistics and batch counts
    of `other` equal `plain`'s bit for bit, while the modules `counted(model)` lists run once each in
    `plain` and `runs` times in `other` (the recomputation must not update the running statistics a
    second time)."""
    x = torch.rand(2, 3, SMALL, SMALL)
    out = {}
    for key, model in (("plain", plain), ("other", other)):
        modules = counted(model)
        calls = []
        hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in modules]
        torch.manual_seed(0)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            y = model(x)
        y.float().square().sum().backward()
        for h in hooks:
            h.remove()
        out[key] = y.detach(), len(calls) / len(modules)
    assert out["plain"][1] == 1 and out["other"][1] == runs
    assert torch.equal(out["plain"][0], out["other"][0])
    grads = dict(other.named_parameters())
    for pname, p in plain.named_parameters():
        assert torch.equal(p.grad, grads[pname].grad), pname
    buffers = dict(other.named_buffers())
    for bname, b in plain.named_buffers():
        assert torch.equal(b, buffers[bname]), bname
    with torch.no_grad():  # eval and no-grad forwards are untouched
        assert torch.equal(plain.eval()(x), other.eval()(x))


@pytest.mark.parametrize("name, norm", [
    ("tresnet_tiny", "bn"), pytest.param("tresnet_tiny", "iabn", marks=needs_iabn), ("resnest50d", "bn")])
def test_grad_checkpointing_changes_no_output_gradient_or_running_statistic(name, norm, randomize_norms):
    plain = randomize_norms(create_model(name, norm=norm, drop_path_rate=0.2)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    blocks = (BasicBlock, Bottleneck, ResNestBottleneck)
    assert_same_step(plain, ckpt, lambda model: [m for m in model.modules() if isinstance(m, blocks)], runs=2)


@pytest.mark.parametrize("norm, precision", [
    ("bn", "fp32"), pytest.param("iabn", "fp32", marks=needs_iabn), pytest.param("iabn", "bf16", marks=needs_iabn)])
def test_bottleneck_conv3_recompute_changes_no_output_gradient_or_running_statistic(norm, precision,
                                                                                   randomize_norms):
    """Each Bottleneck's conv3 (conv + norm) runs again in backward instead of keeping its output."""
    recompute = randomize_norms(create_model("tresnet_tiny", norm=norm, drop_path_rate=0.2)).train()
    kept = copy.deepcopy(recompute)
    bottlenecks = [m for m in kept.modules() if isinstance(m, Bottleneck)]
    assert bottlenecks and all(m.recompute_conv3 for m in bottlenecks)  # on by default
    for m in bottlenecks:
        m.recompute_conv3 = False
    assert_same_step(kept, recompute, lambda model: [m.conv3 for m in model.modules() if isinstance(m, Bottleneck)],
                     runs=2, precision=precision)


def test_config_key_turns_grad_checkpointing_on():
    from tresnet_train.config import load_config
    from tresnet_train.trainer import build_model
    for value in ("false", "true"):
        cfg = load_config(overrides=["data.source=synthetic", "model.name=tresnet_tiny",
                                     "model.num_classes=10", f"model.grad_checkpointing={value}"])
        assert build_model(cfg, torch.device("cpu")).grad_checkpointing is (value == "true")


# --- TResNet as the paper and the official code define it -----------------------------------------

def _slope(conv: ConvNormAct):
    return conv.act.negative_slope if isinstance(conv.act, nn.LeakyReLU) else None


@pytest.mark.parametrize("name, layers, width, v2", [
    ("tresnet_m", [3, 4, 11, 3], 64, False),
    ("tresnet_l", [4, 5, 18, 3], 76, False),
    ("tresnet_xl", [4, 5, 24, 3], 83, False),
    ("tresnet_v2_l", [3, 4, 23, 3], 64, True),
])
def test_tresnet_structure(name, layers, width, v2):
    body = fresh_model(name).body
    assert body.s2d.bs == 4  # timm.layers.SpaceToDepth
    assert body.conv1.conv.in_channels == 48 and body.conv1.conv.kernel_size == (3, 3)
    assert body.conv1.conv.out_channels == width and _slope(body.conv1) == 1e-2
    for i, n_blocks in enumerate(layers):
        stage = getattr(body, f"layer{i + 1}")
        assert len(stage) == n_blocks
        expected_block = Bottleneck if (v2 or i >= 2) else BasicBlock
        assert all(type(b) is expected_block for b in stage)
        assert all((b.se is not None) == (i < 3) for b in stage)  # SE in stages 1-3 only
        for j, b in enumerate(stage):
            first, last = (b.conv1, b.conv2) if expected_block is BasicBlock else (b.conv2, b.conv3)
            assert _slope(b.conv1) == 1e-3 and _slope(last) is None  # no act before the residual sum
            if expected_block is Bottleneck:
                assert _slope(b.conv2) == 1e-3
                assert b.se is None or b.se.fc1.in_channels == b.conv2.conv.out_channels  # after 3x3
            strided = i > 0 and j == 0
            assert (first.aa is not None) == strided  # anti-aliasing replaces the stride
            assert first.conv.stride == (1, 1)
            if strided:
                assert isinstance(first.aa, BlurPool2d) and first.aa.stride == 2
                assert isinstance(b.downsample[0], nn.AvgPool2d)
                assert _slope(b.downsample[1]) is None


def test_blur_filter_is_binomial_and_not_in_state_dict():
    blur = BlurPool2d(5)
    expected = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    assert torch.equal(blur.filt, expected.expand(5, 1, 3, 3))
    assert "filt" not in blur.state_dict()
    x = torch.rand(1, 5, 8, 8)
    assert blur(x).shape == (1, 5, 4, 4)
    assert torch.allclose(blur(torch.ones(1, 5, 8, 8)), torch.ones(1, 5, 4, 4))


def test_se_gates_channels():
    se = SqueezeExcite(8, 4)
    x = torch.rand(2, 8, 5, 5)
    gate = se(x) / x
    assert torch.allclose(gate, gate[:, :, :1, :1].expand_as(gate), atol=1e-6)  # one gate per channel
    assert ((gate > 0) & (gate < 1)).all()


# --- norm backends --------------------------------------------------------------------------------

def test_auto_norm_picks_batchnorm_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_norm_layer("auto") is nn.BatchNorm2d
    with pytest.raises(ValueError, match="norm="):
        resolve_norm_layer("gn")


@needs_iabn
def test_auto_norm_picks_inplace_abn_on_cuda(monkeypatch):
    from inplace_abn import InPlaceABN
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert issubclass(resolve_norm_layer("auto"), InPlaceABN)


def test_resnest_is_batchnorm_only():
    with pytest.raises(ValueError, match="InPlace-ABN"):
        create_model("resnest50d", norm="iabn")


@needs_iabn
def test_inplace_abn_and_batchnorm_agree_from_one_checkpoint(randomize_norms):
    from inplace_abn import InPlaceABN
    bn = randomize_norms(create_model("tresnet_tiny", norm="bn"))
    iabn = create_model("tresnet_tiny", norm="iabn")
    assert list(iabn.state_dict()) == list(bn.state_dict())
    iabn.load_state_dict(bn.state_dict(), strict=True)
    layers = [m for m in iabn.modules() if isinstance(m, InPlaceABN)]
    assert len(layers) == sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    slopes = {(m.activation, m.activation_param) for m in layers}
    assert slopes == {("leaky_relu", 1e-2), ("leaky_relu", 1e-3), ("identity", 0.0)}

    x = torch.rand(4, 3, SMALL, SMALL)
    with torch.no_grad():
        assert (bn.eval()(x) - iabn.eval()(x)).abs().max() <= TOLERANCE
    bn.train(), iabn.train()
    out_bn, out_iabn = bn(x), iabn(x)
    assert (out_bn - out_iabn).abs().max() <= TOLERANCE
    out_bn.square().sum().backward()
    out_iabn.square().sum().backward()
    for (name, p), q in zip(bn.named_parameters(), iabn.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5 * p.grad.abs().max()), name
    for (name, a), b in zip(bn.state_dict().items(), iabn.state_dict().values()):  # running stats
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


@needs_iabn
def test_inplace_abn_runs_bfloat16_and_refuses_float16_on_cpu():
    model = create_model("tresnet_tiny", norm="iabn").eval()
    x = torch.rand(2, 3, SMALL, SMALL)
    with torch.no_grad():
        assert torch.isfinite(model.to(torch.bfloat16)(x.bfloat16()).float()).all()
        with pytest.raises(RuntimeError, match="float16"):
            model.to(torch.float16)(x.half())


# --- device-agnostic, compile-friendly ------------------------------------------------------------

def test_no_device_or_dtype_calls_in_model_code():
    source = Path(__file__).parents[1] / "tresnet_train" / "models"
    offenders = [f"{p.name}:{node.lineno}" for p in source.glob("*.py")
                 for node in ast.walk(ast.parse(p.read_text()))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and node.func.attr in ("cuda", "half")]
    assert offenders == []


@pytest.mark.parametrize("name", ["tresnet_m", "resnest50d"])
def test_builds_on_meta_device(name):
    with torch.device("meta"):
        model = create_model(name, norm="bn")
    assert all(p.is_meta for p in model.parameters())
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)


def test_meta_model_materialises_and_loads(randomize_norms):
    reference = randomize_norms(create_model("tresnet_tiny", norm="bn")).eval()
    with torch.device("meta"):
        model = create_model("tresnet_tiny", norm="bn")
    model = init_non_persistent_buffers(model.to_empty(device="cpu"))
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.rand(2, 3, SMALL, SMALL)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference(x))


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = create_model("tresnet_tiny", norm="bn").eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.rand(2, 3, SMALL, SMALL)
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max() <= TOLERANCE


@pytest.mark.slow
def test_tresnet_m_has_no_graph_breaks():
    torch._dynamo.reset()
    model = fresh_model("tresnet_m").train()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a break raises
    compiled(torch.rand(2, 3, SMALL, SMALL)).sum().backward()
    assert model.body.conv1.conv.weight.grad is not None


# --- README table ---------------------------------------------------------------------------------

def test_model_table_counts_macs(capsys):
    spec = importlib.util.spec_from_file_location(
        "model_table", Path(__file__).parents[1] / "scripts" / "model_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    with torch.device("meta"):
        resnet50 = create_model("timm/resnet50")
    assert table.gmacs(resnet50, 224) == pytest.approx(4.09, abs=0.01)  # ResNet-50's known 4.1 GMACs
    tiny = fresh_model("tresnet_tiny").eval()
    with torch.device("meta"):
        tiny_meta = create_model("tresnet_tiny", norm="bn").eval()
    assert 3.9 < table.gmacs(tiny_meta, 448) / table.gmacs(tiny_meta, 224) <= 4  # SE + fc stay fixed
    flops = torch.utils.flop_counter.FlopCounterMode(display=False)
    with flops, torch.no_grad():
        tiny(torch.rand(1, 3, 224, 224))  # the same count when the arithmetic really runs
    assert table.gmacs(tiny_meta, 224) == pytest.approx(flops.get_total_flops() / 2e9)
    sys.argv = ["model_table.py", "--models", "tresnet_tiny"]
    table.main()
    assert "| tresnet_tiny | 1.00 | 0.14 | 0.56 |" in capsys.readouterr().out


def test_resnest_drop_block_sits_in_the_last_two_stages_and_follows_its_rate():
    from timm.layers import DropBlock2d

    from tresnet_train.models.layers import set_drop_block
    from tresnet_train.models.resnest import ResNeSt
    torch.manual_seed(0)
    model = ResNeSt(layers=(1, 1, 2, 1), num_classes=10, drop_block_rate=0.1)
    plain = ResNeSt(layers=(1, 1, 2, 1), num_classes=10)
    assert model.state_dict().keys() == plain.state_dict().keys()  # no parameters, same checkpoints
    stages = {name.split(".")[0] for name, m in model.named_modules() if isinstance(m, DropBlock2d)}
    assert stages == {"layer3", "layer4"}
    assert sum(isinstance(m, DropBlock2d) for m in model.modules()) == 3 * (2 + 1)  # 3 per block
    for name, p in model.named_parameters():
        if name.endswith("bn3.weight"):
            torch.nn.init.ones_(p)  # zero-initialised last norms would hide what is dropped before them
    x = torch.rand(2, 3, 96, 96)  # layer3 6x6, layer4 3x3: room for 3x3 blocks
    model.train()
    set_drop_block(model, 0.0)
    off = model(x)
    torch.testing.assert_close(model(x), off)  # probability 0: nothing dropped
    set_drop_block(model, 0.1)
    assert not torch.allclose(model(x), off)
