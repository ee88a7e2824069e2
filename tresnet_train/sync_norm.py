"""Batch statistics synchronised across GPUs, for BatchNorm and InPlace-ABN models alike.

torch's SyncBatchNorm replaces BatchNorm2d. InPlace-ABN's sync kernel takes a process group argument
whose default is captured when `inplace_abn` is imported, before `init_process_group` has run: left at
its default it silently computes per-process statistics. Our InPlace-ABN layers (`InPlaceABNLeaky`)
are therefore given the world group explicitly (`sync_group`), and any other InPlaceABN is replaced by
an `InPlaceABNSync` bound to it. Both sync kernels need CUDA tensors, so on CPU (gloo) batch
statistics stay per process, and the log says so.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn

log = logging.getLogger(__name__)


def _convert_iabn(module: nn.Module, group) -> nn.Module:
    """Bind every InPlace-ABN layer to `group`: ours in place, others replaced by InPlaceABNSync."""
    from inplace_abn import InPlaceABN, InPlaceABNSync

    from .models.inplace_abn_norm import InPlaceABNLeaky

    if isinstance(module, InPlaceABNLeaky):
        module.sync_group = group
        return module
    if isinstance(module, InPlaceABN) and not isinstance(module, InPlaceABNSync):
        synced = InPlaceABNSync(module.num_features, eps=module.eps, momentum=module.momentum,
                                affine=module.affine, activation=module.activation,
                                activation_param=module.activation_param, group=group)
        synced.load_state_dict(module.state_dict())
        return synced.to(next(iter(module.buffers())).device)
    for name, child in module.named_children():
        setattr(module, name, _convert_iabn(child, group))
    return module


def convert_sync_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm and InPlaceABN -> InPlaceABNSync(group=WORLD), on CUDA only."""
    if device.type != "cuda":
        log.info("data-parallel on CPU: batch-norm statistics are per process (no sync layer runs "
                 "on gloo)")
        return model
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    try:
        import inplace_abn  # noqa: F401
    except ImportError:
        return model
    return _convert_iabn(model, dist.group.WORLD)
