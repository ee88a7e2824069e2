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
NATIVE_BF16 = (8, 0)  # compute capability from which GPUs have bf16 tensor cores (Ampere)


class PrecisionError(ValueError):
    """An autocast choice this device cannot run well; the message names the device and the fix."""


def resolve_amp(amp: str, device: torch.device) -> tuple[str, str]:
    """(none | bf16 | fp16, why) for `train.amp` on `device`.

    auto: bf16 where the GPU computes it natively (compute capability >= 8.0: A100, H100, ...),
    fp16 with loss scaling below that (V100 7.0, T4 7.5: bf16 runs emulated there, several times
    slower, and the published TResNet-M run itself trained in fp16), none on a CPU (autocast is
    slower than fp32 there). An explicit bf16 on a GPU without native bf16 is refused.
    """
    if device.type != "cuda":
        if amp == "auto":
            return "none", "CPU: fp32 (autocast is slower there)"
        return amp, "as configured"
    name = torch.cuda.get_device_name(device)
    cc = torch.cuda.get_device_capability(device)
    native = cc >= NATIVE_BF16
    if amp == "bf16" and not native:
        raise PrecisionError(
            f"config key 'train.amp' is bf16 but {name} (compute capability {cc[0]}.{cc[1]}) has no "
            f"native bf16: it would run emulated, several times slower. Use train.amp=auto (fp16 "
            f"with loss scaling there) or fp16")
    if amp != "auto":
        return amp, "as configured"
    if native:
        return "bf16", f"compute capability {cc[0]}.{cc[1]} computes bf16 natively"
    return "fp16", f"compute capability {cc[0]}.{cc[1]} has no bf16 tensor cores: fp16, loss-scaled"


class Precision:
    """autocast in bf16/fp16 (or nothing) and a GradScaler that is enabled for fp16 only."""

    def __init__(self, amp: str, device: torch.device):
        amp, self.reason = resolve_amp(amp, device)
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
