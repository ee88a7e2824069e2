"""Mixed precision and the speed switches, each an object that can be a no-op.

The training step always writes `with precision.autocast(): ...`, `precision.scaler.scale(loss)`,
`clipper(...)`: with AMP off the autocast is a null context and the scaler a disabled GradScaler,
so the step has no `if cfg.x:` branches.
"""
from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """autocast in bf16/fp16 (or nothing) and a GradScaler that is enabled for fp16 only."""

    def __init__(self, amp: str, device: torch.device):
        if amp == "auto":  # bf16 on GPUs; on CPUs without bf16 units it is slower than fp32
            amp = "bf16" if device.type == "cuda" else "none"
        if amp in _DTYPES and device.type == "cpu":
            log.warning("amp %s on a CPU: autocast there is several times slower than fp32 (about "
                        "1 img/s for TResNet-M on 2 cores); use amp auto or none", amp)
        self.amp = amp
        self.device_type = device.type
        self.dtype = _DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


class GradClipper:
    """Clip the global gradient norm (unscaling fp16 gradients first); max_norm 0 is a no-op."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def __call__(self, model: torch.nn.Module, optimizer, scaler) -> None:
        if self.max_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)


def enable_tf32(enabled: bool) -> None:
    """TF32 matmuls and convolutions on Ampere and newer (no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cudnn.benchmark = torch.cuda.is_available()
