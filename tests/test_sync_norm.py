"""Sync norm conversion: InPlace-ABN layers sync through their own all-gather on any backend (checked
against full-batch statistics with 2 gloo processes), timm's fused norm-activation layers keep their
activation, BatchNorm becomes SyncBatchNorm on CUDA only, and the converted model can be deep-copied
(the EMA does that)."""
import copy

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tresnet_train.models import create_model
from tresnet_train.models.layers import inplace_abn_available, inplace_abn_layers
from tresnet_train.sync_norm import convert_sync_norm

needs_iabn = pytest.mark.skipif(not inplace_abn_available(),
                                reason="inplace_abn is not installed (pip install --no-build-isolation "
                                       "inplace-abn)")
CHANNELS = 6


def _full_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, CHANNELS, 5, 5, generator=g) * 2 + 1
    dy = torch.randn(8, CHANNELS, 5, 5, generator=g)
    return x, dy


def _layer():
    from tresnet_train.models.inplace_abn_norm import InPlaceABNLeaky
    layer = InPlaceABNLeaky(CHANNELS, act_slope=0.01)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, CHANNELS))
        layer.bias.copy_(torch.linspace(-0.2, 0.2, CHANNELS))
    return layer


def _forward_backward(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer.train()(x * 1.0)  # the layer works in place: give it a non-leaf
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "dweight": layer.weight.grad, "dbias": layer.bias.grad,
            "running_mean": layer.running_mean, "running_var": layer.running_var}


def _sync_rank(rank: int, world_size: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world_size)
    try:
        layer = _layer()
        convert_sync_norm(layer, torch.device("cpu"))
        x, dy = _full_batch()
        half = slice(4 * rank, 4 * rank + 4)  # this rank's half of the batch
        torch.save(_forward_backward(layer, x[half], dy[half]), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@needs_iabn
def test_inplace_abn_sync_on_gloo_equals_full_batch_statistics(tmp_path):
    mp.spawn(_sync_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x, dy = _full_batch()
    full = _forward_backward(_layer(), x, dy)  # one process, the whole batch

    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), full["y"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), full["dx"], rtol=1e-4,
                               atol=1e-5)
    for key in ("running_mean", "running_var"):  # the same on both ranks, and the full batch's
        for r in ranks:
            torch.testing.assert_close(r[key], full[key], rtol=1e-5, atol=1e-6)
    for key in ("dweight", "dbias"):  # local sums; DDP adds the ranks' gradients up
        torch.testing.assert_close(ranks[0][key] + ranks[1][key], full[key], rtol=1e-4, atol=1e-5)
    per_process = _forward_backward(_layer(), x[:4], dy[:4])
    assert not torch.allclose(per_process["y"], full["y"][:4], atol=1e-3)  # the halves differ


@needs_iabn
def test_converted_inplace_abn_model_deep_copies_for_the_ema():
    model = create_model("tresnet_tiny", norm="iabn")
    model = convert_sync_norm(model, torch.device("cpu"))
    layers = inplace_abn_layers(model)
    assert layers and all(m.sync for m in layers)
    ema = copy.deepcopy(model)  # timm's ModelEmaV3 does this; a stored ProcessGroup cannot be copied
    assert all(m.sync for m in inplace_abn_layers(ema))


def test_timm_fused_norm_activation_keeps_its_activation(randomize_norms):
    """timm's BatchNormAct2d becomes a SyncBatchNormAct, not a plain SyncBatchNorm that would drop the
    activation. The conversion is module surgery; eval-mode SyncBatchNorm runs on CPU."""
    model = randomize_norms(timm.create_model("tresnet_m", pretrained=False)).eval()
    assert any(type(m).__name__ == "BatchNormAct2d" for m in model.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        converted = convert_sync_norm(model, torch.device("cuda"))
        after = converted.eval()(x)
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert torch.equal(before, after)


def test_cpu_batchnorm_models_are_left_alone():
    model = create_model("tresnet_tiny", norm="bn")
    assert convert_sync_norm(model, torch.device("cpu")) is model
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


@pytest.mark.gpu
@needs_iabn
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_sync_kernels_run_with_the_world_group(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        torch.manual_seed(0)
        iabn = create_model("tresnet_tiny", norm="iabn").to(device)
        plain = create_model("tresnet_tiny", norm="iabn").to(device)
        plain.load_state_dict(iabn.state_dict())
        iabn = convert_sync_norm(iabn, device)
        assert all(m.sync for m in inplace_abn_layers(iabn))
        x = torch.randn(8, 3, 64, 64, device=device)
        # One rank: synced statistics are that rank's statistics.
        torch.testing.assert_close(iabn.train()(x), plain.train()(x), rtol=1e-4, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            iabn.train()(x).float().sum().backward()
        copy.deepcopy(iabn)

        bn = convert_sync_norm(create_model("tresnet_tiny", norm="bn").to(device), device)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in bn.modules())
        bn.train()(x).sum().backward()
    finally:
        dist.destroy_process_group()
