"""InPlace-ABN as a GPU run uses it, forced on CPU: one weight convention (BatchNorm's) from training to
BatchNorm, InPlace-ABN and timm; scales kept where InPlace-ABN can represent them; autocast; and the
trainer's path (resume, init_from, validate.py, several processes with sync and EMA)."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F

from tests.trainer_helpers import load, main_in_process, tiny_overrides, train
from tresnet_train.config import OptimConfig
from tresnet_train.models import create_model, export_timm_state_dict
from tresnet_train.models.layers import inplace_abn_available, inplace_abn_layers
from tresnet_train.optim import build_optimizer
from tresnet_train.validation import main as validate_main

pytestmark = pytest.mark.skipif(not inplace_abn_available(),
                                reason="inplace_abn is not installed (pip install "
                                       "--no-build-isolation inplace-abn)")
EPS = 1e-5
TOLERANCE = 1e-4


def _train(model, steps: int, size: int, batch: int = 8, lr: float = 0.5, num_classes: int = 10):
    """SGD steps on random images through the trainer's optimizer (with its InPlace-ABN scale floor)."""
    g = torch.Generator().manual_seed(0)
    optimizer = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0), lr)
    model.train()
    for _ in range(steps):
        x = torch.rand(batch, 3, size, size, generator=g)
        y = torch.randint(0, num_classes, (batch,), generator=g)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def _logits(model, size: int):
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.slow
def test_trained_scales_mean_the_same_with_batchnorm_inplace_abn_and_timm():
    torch.manual_seed(0)
    model = _train(create_model("tresnet_m", norm="iabn", num_classes=10), steps=3, size=64, lr=0.05)
    scales = torch.cat([m.weight.detach() for m in inplace_abn_layers(model)])
    assert scales.min() >= EPS  # every scale is one InPlace-ABN applied
    assert (scales == EPS).sum() > 0  # and some steps wanted less: the floor was used
    state = model.state_dict()
    ours = _logits(model, 64)

    bn = create_model("tresnet_m", norm="bn", num_classes=10)
    bn.load_state_dict(state)
    assert (_logits(bn, 64) - ours).abs().max() <= TOLERANCE

    again = create_model("tresnet_m", norm="iabn", num_classes=10)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), state.values()))
    assert torch.equal(_logits(again, 64), ours)

    reference = timm.create_model("tresnet_m", pretrained=False, num_classes=10)
    reference.load_state_dict(export_timm_state_dict(model), strict=True)
    assert (_logits(reference, 64) - ours).abs().max() <= TOLERANCE


@pytest.mark.slow
def test_zero_init_is_the_smallest_scale_and_trains_upwards():
    """A block's last norm starts at eps (|0| + eps, as the official init); the first step moves
    its scales with the BatchNorm gradient's sign, never onto the mirrored branch below zero."""
    torch.manual_seed(0)
    model = create_model("tresnet_tiny", norm="iabn")
    last = model.body.layer1[0].conv2.bn
    assert torch.equal(last.weight.detach(), torch.full_like(last.weight, EPS))
    _train(model, steps=4, size=32, lr=0.2)
    assert last.weight.min() >= EPS and last.weight.max() > 10 * EPS


def test_bn_checkpoint_scales_below_eps_load_at_the_floor():
    bn = create_model("tresnet_tiny", norm="bn")
    with torch.no_grad():
        bn.body.conv1.bn.weight[:3] = torch.tensor([0.0, -5e-4, 2e-6])
    iabn = create_model("tresnet_tiny", norm="iabn")
    iabn.load_state_dict(bn.state_dict())
    assert torch.equal(iabn.body.conv1.bn.weight[:3].detach(), torch.full((3,), EPS))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
def test_autocast_runs_inplace_abn_in_a_precision_its_kernels_have(train_mode, dtype,
                                                                  randomize_norms):
    """CPU kernels: fp32 (bf16 input with fp32 weights is refused, fp16 has no CPU kernel)."""
    iabn = randomize_norms(create_model("tresnet_tiny", norm="iabn")).train(train_mode)
    bn = create_model("tresnet_tiny", norm="bn").train(train_mode)
    bn.load_state_dict(iabn.state_dict())
    x = torch.rand(4, 3, 64, 64)
    with torch.autocast("cpu", dtype=dtype):
        out, ref = iabn(x), bn(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)
    if train_mode:
        out.float().square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in iabn.parameters())


# --- the trainer's path -------------------------------------------------------------------------

def _val_top1(ckpt, digits, tmp_path, capsys) -> float:
    """validate.py's top-1, from its main() run in this process (no second torch import)."""
    out = tmp_path / "val.json"
    proc = main_in_process(validate_main, ["--ckpt", str(ckpt), "--data", str(digits), "--no-ema",
                                           "--workers", "0", "--json", str(out)], capsys)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())["top1"]


@pytest.mark.slow
def test_iabn_run_validates_resumes_and_initialises_the_next(tmp_path, digits, capsys):
    """The reported failure, end to end: an InPlace-ABN run's best.pth validates (BatchNorm) at the
    top-1 the trainer logged, the run resumes for another epoch, and a fine-tuning run starts from it."""
    run = tmp_path / "run"
    iabn = {"model.norm": "iabn", "optim.lr": 0.4}
    proc = train(tiny_overrides(run, digits, **iabn))
    assert proc.returncode == 0, proc.stderr
    best = load(run / "best.pth")
    trainer_top1 = best["val"]["model_top1"]
    assert _val_top1(run / "best.pth", digits, tmp_path, capsys) == pytest.approx(trainer_top1, abs=1e-6)

    proc = train(tiny_overrides(run, digits, **iabn, **{"train.epochs": 3}))
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stderr + proc.stdout
    assert load(run / "last.pth")["epoch"] == 3

    proc = train(tiny_overrides(tmp_path / "finetune", digits, **iabn,
                                **{"model.init_from": run / "best.pth", "train.epochs": 1}))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_two_processes_with_iabn_sync_and_ema_train_alike(tmp_path, digits):
    run = tmp_path / "run"
    proc = train(tiny_overrides(run, digits, **{"model.norm": "iabn", "model.sync_bn": "true",
                                               "train.ema": "true", "train.epochs": 1}), nproc=2)
    assert proc.returncode == 0, proc.stderr
    prints = json.loads((run / "summary.json").read_text())["weights_sha256_per_rank"]
    assert len(prints) == 2 and prints[0] == prints[1]
    assert load(run / "last.pth")["ema"] is not None
