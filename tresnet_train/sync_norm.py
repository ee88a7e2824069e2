"""Batch statistics synchronised across processes, for BatchNorm and InPlace-ABN models alike.

BatchNorm layers (ours and timm's, fused norm-activation layers included) become SyncBatchNorm through
`timm.layers.convert_sync_batchnorm`: torch's own converter turns timm's `BatchNormAct2d` into a plain
SyncBatchNorm and drops its activation. torch's SyncBatchNorm needs CUDA, so on CPU (gloo) BatchNorm
statistics stay per process, and the log says so. Our InPlace-ABN layers sync through their own
all-gather on the default process group (`InPlaceABNLeaky.sync`), on any device and backend.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
from timm.layers import convert_sync_batchnorm

from .models.layers import inplace_abn_layers

log = logging.getLogger(__name__)


def convert_sync_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Sync every norm layer of `model` across the default process group where the device allows."""
    iabn = inplace_abn_layers(model)
    for m in iabn:
        m.sync = True
    if device.type == "cuda":
        return convert_sync_batchnorm(model)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        log.info("data-parallel on CPU: BatchNorm statistics are per process (torch's SyncBatchNorm "
                 "needs CUDA)%s", "; InPlace-ABN layers sync" if iabn else "")
    return model
