"""Small layers shared by the TResNet and ResNeSt models.

Every layer builds on any device (CPU, CUDA, meta) and in any dtype: constants are non-persistent
buffers, nothing calls `.cuda()` or `.half()` (the original TResNet anti-alias layer hard-coded
`.cuda().half()` and could not be built without a GPU). Layer choices are passed in as classes.

Sources:
- SpaceToDepth stem, anti-aliased downsampling, "fast" global pooling: Ridnik et al., "TResNet: High
  Performance GPU-Dedicated Architecture", WACV 2021 (https://github.com/Alibaba-MIIL/TResNet).
- Blur pooling: Zhang, "Making Convolutional Networks Shift-Invariant Again", ICML 2019.
- Squeeze-and-excitation: Hu et al., CVPR 2018. Stochastic depth: Huang et al., ECCV 2016.
- Activation checkpointing: Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016.

Space-to-depth, stochastic depth, blur pooling's filter and squeeze-excite are timm's (timm.layers);
what is ours keeps less for backward with the same outputs: the blur's backward and the SE-gated conv.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import timm.layers
import torch
import torch.nn.functional as F
from timm.models import checkpoint
from torch import nn

from ..config import NORMS


def binomial_filter_3x3() -> torch.Tensor:
    """The 3x3 blur [1, 2, 1] x [1, 2, 1] / 16 of TResNet's anti-alias layer, shape (3, 3)."""
    a = torch.tensor([1.0, 2.0, 1.0])
    return torch.outer(a, a) / 16.0


class BlurPool2d(timm.layers.BlurPool2d):
    """timm's anti-aliased downsampling (reflect pad, 3x3 binomial blur, stride 2) and its filter
    buffer, with a backward that keeps nothing (_Blur): timm's forward keeps the padded input, +3.0
    MiB per image (+7%) for TResNet-M with InPlace-ABN at 224 in fp32 (scripts/bench_memory.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Blur.apply(x, self.filt, self.stride)


class _Blur(torch.autograd.Function):
    """Reflect-pad by 1, then a fixed depthwise filter with `stride`; keeps nothing for backward.

    The op is linear with a constant filter, so its input gradient needs the filter and the input's
    shape only: autograd's own pad + conv2d would keep the padded input, (C, H+2, W+2) per image.
    The backward calls the same kernels autograd would (conv2d input gradient, reflect-pad backward).
    """

    @staticmethod
    def forward(ctx, x, filt, stride):
        ctx.shape, ctx.in_dtype, ctx.stride = x.shape, x.dtype, stride
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        out = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), filt.to(x.dtype), stride=stride,
                       groups=x.shape[1])  # under autocast: the autocast dtype
        ctx.save_for_backward(filt)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (filt,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        # The input gradient reads the input's shape and layout, not its values.
        padded = torch.empty((n, c, h + 2, w + 2), dtype=grad_out.dtype, device=grad_out.device,
                             memory_format=ctx.memory_format)
        grad_padded = torch.ops.aten.convolution_backward(
            grad_out, padded, filt.to(grad_out.dtype), None, [ctx.stride] * 2, [0, 0], [1, 1], False,
            [0, 0], c, [True, False, False])[0]  # (N, C, H+2, W+2)
        grad_padded = grad_padded.to(ctx.in_dtype)  # autocast: the pad ran in the input's dtype
        return torch.ops.aten.reflection_pad2d_backward(
            grad_padded, grad_padded.new_empty(ctx.shape), [1, 1, 1, 1]), None, None  # (N, C, H, W)


class _GatedConv(torch.autograd.Function):
    """`F.conv2d(x * gate, weight)` (no bias, `stride`, `padding`) that keeps x and gate for backward,
    not their product: the product is recomputed there (one multiply). x is a tensor the graph keeps
    anyway (the output of the norm before it), gate is (N, C, 1, 1), so the product's storage,
    (C, H, W) per image, is saved. Dtypes follow autocast as plain ops would: the conv computes in the
    dtype of its output, gradients come back in their inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, x, gate, weight, stride, padding):
        out = F.conv2d(x * gate, weight, stride=stride, padding=padding)
        ctx.stride, ctx.padding, ctx.conv_dtype = stride, padding, out.dtype
        ctx.save_for_backward(x, gate, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, weight = ctx.saved_tensors
        z = x * gate  # (N, C, H, W), the conv input, as in forward
        dtype = ctx.conv_dtype
        grad_z, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out.to(dtype), z.to(dtype), weight.to(dtype), None, _pair(ctx.stride),
            _pair(ctx.padding), [1, 1], False, [0, 0], 1, [True, True, False])
        grad_z = grad_z.to(z.dtype)
        grad_x = (grad_z * gate).to(x.dtype)
        grad_gate = (grad_z * x).sum((2, 3), keepdim=True).to(gate.dtype)  # (N, C, 1, 1)
        return grad_x, grad_gate, grad_w.to(weight.dtype), None, None


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def gated_conv2d(x: torch.Tensor, gate: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`conv(x * gate)` for a bias-free `conv`, keeping x and gate for backward instead of x * gate
    (see _GatedConv): squeeze-and-excitation followed by a conv, as in TResNet's Bottleneck."""
    if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError(f"gated_conv2d takes a plain bias-free conv, got {conv}")
    return _GatedConv.apply(x, gate, conv.weight, conv.stride, conv.padding)


class SqueezeExcite(timm.layers.SEModule):
    """timm's squeeze-and-excitation (mean -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid gate), plus the
    gate alone for gated_conv2d, which keeps x and gate for backward instead of their product: timm's
    forward would keep that product, about 2 MiB per image in TResNet-M at 224 in fp32 (11 blocks x
    256 x 14 x 14 x 4 bytes)."""

    def __init__(self, channels: int, rd_channels: int):
        super().__init__(channels, rd_channels=rd_channels)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gate, (N, C, 1, 1): `forward(x)` is `x * attention(x)`."""
        return self.gate(self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True))))))


def checkpoint_blocks(blocks: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run `blocks` in order, each under activation checkpointing (timm's `checkpoint`, which is
    torch.utils.checkpoint, non-reentrant unless timm.layers.set_reentrant_ckpt says otherwise): a
    block keeps only its input for backward and runs again there. Dropout and drop-path masks repeat
    (the RNG state is replayed), and norms update their running statistics once per step, not twice."""
    for block in blocks:
        x = checkpoint_module(block, x)
    return x


def checkpoint_module(module: nn.Module, *args) -> torch.Tensor:
    """`module(*args)` under activation checkpointing (timm's `checkpoint`): keeps only `args` for
    backward and runs the module again there, its norms' running statistics updated once."""
    return checkpoint(_RunOnceStats(module), *args)


class _RunOnceStats:
    """Calls `module`; from the second call on (the recomputation in backward) its norms leave their
    running statistics alone, which the first call already updated."""

    def __init__(self, module: nn.Module):
        self.module, self.calls = module, 0

    def __call__(self, *args) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            return self.module(*args)
        with running_stats_frozen(self.module):
            return self.module(*args)


@contextmanager
def running_stats_frozen(module: nn.Module):
    """Norms in `module` (BatchNorm, InPlace-ABN) still normalise with batch statistics but keep
    their running mean, variance and batch count: momentum 0 updates the statistics by
    1 * running + 0 * batch, which is the running value bit for bit, and the count is put back.
    The same tensors stay in place, so what autograd saved and DDP broadcasts stays valid."""
    norms = [m for m in module.modules()
             if getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                with torch.no_grad():
                    m.num_batches_tracked.copy_(count)


class FastGlobalAvgPool(nn.Module):
    """Global average pool as a plain mean over H and W: (N, C, H, W) -> (N, C).

    TResNet's "fast global average pooling": no adaptive-pool kernel, works in any memory format.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def set_drop_block(model: nn.Module, rate: float) -> None:
    """Set every DropBlock layer's drop probability (ResNeSt's training ramps it over the epochs)."""
    from timm.layers import DropBlock2d
    for m in model.modules():
        if isinstance(m, DropBlock2d):
            m.drop_prob = rate


def drop_path_rates(rate: float, num_blocks: int) -> list[float]:
    """Per-block stochastic depth, rising linearly from 0 at the first block to `rate` at the last."""
    if num_blocks <= 1:
        return [rate] * num_blocks
    return [rate * i / (num_blocks - 1) for i in range(num_blocks)]


class ConvNormAct(nn.Module):
    """Conv (no bias) -> norm -> LeakyReLU (or none) -> optional anti-aliased stride-2 downsampling.

    `norm_layer` is a class. A plain norm (nn.BatchNorm2d) is followed by a separate activation module,
    so `nn.SyncBatchNorm.convert_sync_batchnorm` can swap it without losing the activation. A norm
    class with `fuses_activation = True` (InPlace-ABN) takes the slope itself. `act_slope=None` means
    no activation. With `aa_layer` and stride 2, the conv runs at stride 1 and `aa_layer` downsamples
    (TResNet's anti-aliasing). State-dict keys: `conv.*`, `bn.*` (timm's names).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_slope: float | None = None,
        aa_layer: type[nn.Module] | None = None,
    ):
        super().__init__()
        use_aa = aa_layer is not None and stride > 1
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=1 if use_aa else stride,
                              padding=kernel_size // 2, bias=False)
        if getattr(norm_layer, "fuses_activation", False):
            self.bn = norm_layer(out_chs, act_slope=act_slope)
            self.act = nn.Identity()
        else:
            self.bn = norm_layer(out_chs)
            self.act = nn.LeakyReLU(act_slope, inplace=True) if act_slope is not None else nn.Identity()
        self.aa = aa_layer(out_chs, stride=stride) if use_aa else None

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """`gate` (N, C, 1, 1): convolve x * gate, keeping x and gate for backward (gated_conv2d)."""
        x = self.conv(x) if gate is None else gated_conv2d(x, gate, self.conv)
        x = self.act(self.bn(x))
        if self.aa is not None:
            x = self.aa(x)
        return x


def zero_scale_(norm: nn.Module) -> None:
    """Zero-init a norm's scale (a residual branch starts as the identity): 0 for BatchNorm, the
    smallest scale the layer can represent for InPlace-ABN (`min_scale`, eps; the official init
    gives InPlace-ABN the same scale, |0| + eps)."""
    nn.init.constant_(norm.weight, getattr(norm, "min_scale", 0.0))


def inplace_abn_layers(model: nn.Module) -> list[nn.Module]:
    """Our InPlace-ABN layers (`InPlaceABNLeaky`, the norms with a `min_scale`), found without
    importing inplace_abn."""
    return [m for m in model.modules() if hasattr(m, "min_scale")]


class ScaleFloor:
    """Keeps every InPlace-ABN scale at or above its `min_scale` (eps) after each optimizer step.

    InPlace-ABN cannot represent a smaller scale, so the weights a step leaves below it are raised to
    it: the checkpointed weight is then always the scale the layer applied, and BatchNorm or timm
    reproduce it (see inplace_abn_norm.py). Register with `optimizer.register_step_post_hook`; a
    model without InPlace-ABN layers gets no hook.
    """

    def __init__(self, model: nn.Module):
        self.groups: dict[float, list[torch.Tensor]] = {}  # floor -> the weights it applies to
        for m in inplace_abn_layers(model):
            self.groups.setdefault(m.min_scale, []).append(m.weight)

    def __bool__(self) -> bool:
        return bool(self.groups)

    @torch.no_grad()
    def __call__(self, *hook_args) -> None:
        for floor, weights in self.groups.items():
            torch._foreach_clamp_min_(weights, floor)  # one fused launch per floor, no host sync


def init_non_persistent_buffers(model: nn.Module) -> nn.Module:
    """Refill constant buffers that are not in the state dict (after `to_empty()` from meta)."""
    for m in model.modules():
        if isinstance(m, BlurPool2d):
            m.init_non_persistent_buffers()
    return model


def inplace_abn_available() -> bool:
    """True when the `inplace_abn` package (and its compiled extension) imports."""
    try:
        import inplace_abn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_norm_layer(norm: str) -> type[nn.Module]:
    """Norm class for `norm`: "bn" -> BatchNorm2d (+ separate LeakyReLU), "iabn" -> InPlace-ABN,
    "auto" -> InPlace-ABN when CUDA is available and inplace_abn is installed, else BatchNorm2d.
    Both give the same state-dict keys and the same outputs from the same weights."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {NORMS}")
    if norm == "auto":
        norm = "iabn" if torch.cuda.is_available() and inplace_abn_available() else "bn"
    if norm == "bn":
        return nn.BatchNorm2d
    if not inplace_abn_available():
        raise ImportError("norm='iabn' needs inplace-abn: pip install setuptools_scm && "
                          "pip install --no-build-isolation inplace-abn (or use norm='bn')")
    from tresnet_train.models.inplace_abn_norm import InPlaceABNLeaky
    return InPlaceABNLeaky
