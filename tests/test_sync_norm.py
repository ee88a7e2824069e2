"""Sync norm conversion: every InPlace-ABN layer is bound to the process group it is given (the kernel's
own default group is captured at import, before init_process_group, and would silently not sync);
BatchNorm becomes SyncBatchNorm on CUDA; on CPU the model is left alone."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from tresnet_train.models import create_model
from tresnet_train.models.layers import inplace_abn_available
from tresnet_train.sync_norm import _convert_iabn, convert_sync_norm

needs_iabn = pytest.mark.skipif(not inplace_abn_available(),
                                reason="inplace_abn is not installed (pip install --no-build-isolation "
                                       "inplace-abn)")


@needs_iabn
def test_every_iabn_layer_is_bound_to_the_group_and_trains_through_the_sync_kernel(monkeypatch):
    from inplace_abn.functions import inplace_abn

    from tresnet_train.models import inplace_abn_norm
    from tresnet_train.models.inplace_abn_norm import InPlaceABNLeaky

    group = object()  # stands in for a process group; the sync kernel needs CUDA to really run
    groups_seen = []

    def recording_sync(*args, group):
        groups_seen.append(group)
        return inplace_abn(*args)

    monkeypatch.setattr(inplace_abn_norm, "inplace_abn_sync", recording_sync)
    torch.manual_seed(0)
    model = create_model("tresnet_tiny", norm="iabn")
    reference = create_model("tresnet_tiny", norm="iabn")
    reference.load_state_dict(model.state_dict())
    layers = [m for m in model.modules() if isinstance(m, InPlaceABNLeaky)]
    assert layers

    converted = _convert_iabn(model, group)
    assert converted is model  # bound in place: same modules, same BN-convention weights
    assert all(layer.sync_group is group for layer in layers)

    x = torch.randn(4, 3, 64, 64)
    out = converted.train()(x)
    assert groups_seen == [group] * len(layers)  # every layer took the sync path with our group
    assert torch.equal(out, reference.train()(x))  # same maths as the per-process kernel

    groups_seen.clear()
    converted.eval()(x)
    assert groups_seen == []  # eval uses running statistics: nothing to sync


@needs_iabn
def test_a_foreign_inplace_abn_is_replaced_by_one_bound_to_the_group():
    from inplace_abn import InPlaceABN, InPlaceABNSync

    group = object()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), InPlaceABN(8))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    state = model.state_dict()
    converted = _convert_iabn(model, group)
    assert isinstance(converted[1], InPlaceABNSync) and converted[1].group is group
    for key, value in state.items():
        assert torch.equal(converted.state_dict()[key], value), key


def test_cpu_models_are_left_alone():
    model = create_model("tresnet_tiny", norm="bn")
    assert convert_sync_norm(model, torch.device("cpu")) is model
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


@pytest.mark.gpu
@needs_iabn
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_sync_kernels_run_with_the_world_group(tmp_path):
    from tresnet_train.models.inplace_abn_norm import InPlaceABNLeaky

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        torch.manual_seed(0)
        iabn = create_model("tresnet_tiny", norm="iabn").to(device)
        plain = create_model("tresnet_tiny", norm="iabn").to(device)
        plain.load_state_dict(iabn.state_dict())
        iabn = convert_sync_norm(iabn, device)
        assert all(m.sync_group is dist.group.WORLD
                   for m in iabn.modules() if isinstance(m, InPlaceABNLeaky))
        x = torch.randn(8, 3, 64, 64, device=device)
        # One rank: synced statistics are that rank's statistics.
        torch.testing.assert_close(iabn.train()(x), plain.train()(x), rtol=1e-4, atol=1e-4)

        bn = convert_sync_norm(create_model("tresnet_tiny", norm="bn").to(device), device)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in bn.modules())
        bn.train()(x).sum().backward()
    finally:
        dist.destroy_process_group()
