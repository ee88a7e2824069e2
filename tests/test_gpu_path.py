"""The GPU user's path on a CUDA device: steps between log points never wait for the host, and
InPlace-ABN trains and evaluates under bf16 autocast. Skipped without CUDA (the CPU versions of these
checks are in test_inplace_abn.py and test_sync_norm.py)."""
import pytest
import torch

from tresnet_train.config import OptimConfig
from tresnet_train.data.dali_backend import dali_available
from tresnet_train.engine import StepMeter, StepParts, train_step
from tresnet_train.losses import BatchAugment, CrossEntropy
from tresnet_train.models import create_model
from tresnet_train.models.layers import inplace_abn_available
from tresnet_train.optim import build_optimizer, build_schedule
from tresnet_train.precision import GradClipper, Precision

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_steps_between_log_points_never_sync_with_the_host():
    from timm.utils import ModelEmaV3
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = create_model("tresnet_tiny", norm="auto", num_classes=10).to(device)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1), 0.1)
    steps = 6
    parts = StepParts(model=model, train_model=model, optimizer=optimizer,
                      schedule=build_schedule(OptimConfig(lr=0.1), 0.1, steps, 1),
                      criterion=CrossEntropy(0.1), batch_augment=BatchAugment(None, None),
                      precision=Precision("auto", device), clipper=GradClipper(0.0),
                      ema=ModelEmaV3(model, decay=0.9), seed=0, rank=0)
    batches = [(torch.rand(16, 3, 64, 64, device=device),
                torch.randint(0, 10, (16,), device=device)) for _ in range(steps)]
    meter = StepMeter(device, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, batch in enumerate(batches):
            meter.add(train_step(parts, [batch], step), images=16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    mean_loss, nonfinite, _ = meter.reduce(False)  # the log point: the one host sync
    assert meter.steps == steps and not nonfinite and mean_loss > 0


@pytest.mark.skipif(not inplace_abn_available(), reason="inplace_abn is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
def test_inplace_abn_under_autocast_on_cuda(train_mode, dtype):
    """bf16: the layers compute in fp32 (no bf16 kernel); fp16: in fp16, statistics in fp32."""
    device = torch.device("cuda", 0)
    iabn = create_model("tresnet_tiny", norm="iabn").to(device).train(train_mode)
    bn = create_model("tresnet_tiny", norm="bn").to(device).train(train_mode)
    bn.load_state_dict(iabn.state_dict())
    x = torch.rand(8, 3, 64, 64, device=device)
    with torch.autocast("cuda", dtype=dtype):
        out, ref = iabn(x), bn(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)
    if train_mode:
        out.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in iabn.parameters())


@pytest.mark.parametrize("norm", [
    "bn", pytest.param("iabn", marks=pytest.mark.skipif(not inplace_abn_available(),
                                                        reason="inplace_abn is not installed"))])
def test_bottleneck_conv3_recompute_is_bit_identical_on_the_gpu(norm):
    """The GPU defaults (bf16 autocast, channels-last, cuDNN autotuning): recomputing each Bottleneck's
    conv3 and norm in backward gives the gradients and running statistics of keeping their output."""
    import copy
    device = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    recompute = create_model("tresnet_tiny", norm=norm).to(device, memory_format=torch.channels_last).train()
    kept = copy.deepcopy(recompute)
    for m in kept.modules():
        if hasattr(m, "recompute_conv3"):
            m.recompute_conv3 = False
    x = torch.rand(8, 3, 64, 64, device=device).to(memory_format=torch.channels_last)
    for model in (recompute, kept):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x).float().square().mean().backward()
    for (name, a), b in zip(recompute.named_parameters(), kept.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(recompute.named_buffers(), kept.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_mixed_decoding_resumes_mid_epoch_on_the_gpu(tmp_path, digits):
    """The GPU defaults end to end in one process: DALI `mixed` decoding, InPlace-ABN when installed,
    bf16 autocast, EMA; SIGTERM after a mid-epoch checkpoint, then a resume that restores DALI's own
    pipeline checkpoint and finishes."""
    import os
    import signal

    from tests.trainer_helpers import load, start_train, tiny_overrides, train, wait_for_step
    out = tmp_path / "run"
    overrides = tiny_overrides(out, digits, **{
        "run.device": "cuda", "data.backend": "dali", "model.norm": "auto", "train.amp": "auto",
        "data.img_size": 64, "run.ckpt_every_steps": 2})
    proc = start_train(overrides)
    wait_for_step(out / "last.pth", 2, proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=900) == 75, proc.stdout.read()
    stopped = load(out / "last.pth")
    mid_epoch = stopped["step_in_epoch"] > 0
    assert not mid_epoch or stopped["loader"][0].get("dali") is not None  # DALI's own checkpoint
    resumed = train(overrides)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"step {stopped['step_in_epoch']}" in resumed.stdout
    assert "no pipeline checkpoint" not in resumed.stdout + resumed.stderr
    assert load(out / "last.pth")["global_step"] == 12
