"""InPlace-ABN (Rota Bulo et al., CVPR 2018) as a TResNet norm layer; imported only when it is used.

One weight convention end to end: `weight` is the BatchNorm scale itself, in the model, in every
checkpoint, in the timm export. InPlace-ABN's kernels compute `act(x_hat * (|w| + eps) + b)`: they
scale by `|w| + eps`, so the layer hands them `w = weight - eps`, whose scale is exactly `weight` as
long as `weight >= eps`. InPlace-ABN cannot represent a smaller scale (its backward inverts the
output, which needs a scale > 0), so the layer keeps `weight >= eps` at every point where the weight
changes: at init (`zero_scale_` gives eps, the scale the official zero init gives too), at load
(`_load_from_state_dict` raises a scale in [-1e-3, eps) to eps and refuses more negative ones), and
after every optimizer step (`layers.ScaleFloor`). A checkpoint trained with InPlace-ABN therefore
gives the same logits loaded with BatchNorm, with InPlace-ABN and in timm.

The autograd function below is inplace_abn's own, with two changes (its C++ kernels are called as
they are): the statistics of several processes are reduced with torch ops, so sync works on any
device and backend (the package's reduction is CUDA-only), and the weight gradient's sign flip for
negative `w` is a `torch.where` (the package's boolean-mask assignment is a host sync per layer and
step). Under autocast the kernels get fp32 input (their CUDA dispatch has no bf16, the CPU one no
fp16, and bf16 input with fp32 weights is refused) except fp16 on CUDA, which they support: they
work in place on a transient fp32 copy, and the layer returns and keeps for backward its output in
the input's dtype (bf16: 2 bytes per value kept, as BatchNorm under autocast, instead of 4).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from inplace_abn import InPlaceABN, _backend
from inplace_abn.functions import _activation_from_name
from torch.autograd.function import once_differentiable

# A BatchNorm scale below -tolerance has no InPlace-ABN equivalent (the kernel would use ~ -scale).
NEGATIVE_SCALE_TOLERANCE = 1e-3


def _reduce_statistics(mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, group):
    """Per-process (mean, biased var, count) -> the statistics of all processes' samples together.

    One all-gather of [mean, var, count] in float64 (counts of any size stay exact); the combination
    is the parallel-variance formula of inplace_abn's CUDA `reduce_statistics`.
    """
    c = mean.numel()
    local = torch.cat([mean.double(), var.double(), count.double()])  # (2C + 1,)
    gathered = local.new_empty(dist.get_world_size(group), local.numel())  # (W, 2C + 1)
    dist.all_gather(list(gathered.unbind(0)), local, group=group)
    means, variances, counts = gathered[:, :c], gathered[:, c:2 * c], gathered[:, 2 * c:]  # (W, C), (W, 1)
    total = counts.sum()
    all_mean = (counts * means).sum(0) / total
    all_var = (counts * (variances + (means - all_mean) ** 2)).sum(0) / total
    return all_mean.to(mean.dtype), all_var.to(var.dtype), total.long().reshape(1)


class _InPlaceABNFunction(torch.autograd.Function):
    """inplace_abn's `InPlaceABN` autograd function (see the module docstring for what differs)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps,
                activation, activation_param, group):
        # Autocast input the kernels lack (bf16, CPU fp16): they work in place on a transient fp32
        # copy, and the output goes back to the input's dtype, which is also what backward keeps.
        low = x.dtype if x.dtype != weight.dtype and not (x.dtype == torch.float16 and x.is_cuda) else None
        if low is not None:
            x = x.to(weight.dtype)
        ctx.training, ctx.eps, ctx.group, ctx.low = training, eps, group, low
        ctx.activation, ctx.activation_param = _activation_from_name(activation), activation_param
        if training:
            mean, var, count = _backend.statistics(x)
            if group is not None:
                mean, var, count = _reduce_statistics(mean, var, count, group)
            if running_mean is not None:
                n = count.to(var.dtype)
                running_mean.mul_(1 - momentum).add_(momentum * mean)
                running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))  # unbiased
        else:
            mean, var, count = running_mean, running_var, None
        _backend.forward(x, mean, var, weight, bias, eps, ctx.activation, activation_param)
        if low is not None:
            y = x.to(low)
            ctx.save_for_backward(y, var, count, weight, bias)
            return y
        ctx.save_for_backward(x, var, count, weight, bias)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_act):
        y_act, var, count, weight, bias = ctx.saved_tensors
        if ctx.low is not None:  # the kernels run in the weights' dtype (forward)
            y_act, dy_act = y_act.to(weight.dtype), dy_act.to(weight.dtype)
        xhat, dy, sum_dy_local, sum_xhat_dy_local = _backend.backward_reduce(
            y_act, dy_act, weight, bias, ctx.eps, ctx.activation, ctx.activation_param)
        sum_dy, sum_xhat_dy = sum_dy_local, sum_xhat_dy_local
        if ctx.group is not None:
            sums = torch.stack([sum_dy_local, sum_xhat_dy_local])  # (2, C)
            dist.all_reduce(sums, group=ctx.group)
            sum_dy, sum_xhat_dy = sums.unbind(0)
        if ctx.training:
            _backend.backward_train(xhat, dy, var, count, sum_dy, sum_xhat_dy, weight, ctx.eps)
            dx = dy  # backward_train overwrote dy with dx
        else:
            dx = _backend.backward_test(dy, var, weight, ctx.eps)
        dweight = torch.where(weight < 0, -sum_xhat_dy_local, sum_xhat_dy_local)  # d|w|/dw
        if ctx.low is not None:
            dx = dx.to(ctx.low)
        return dx, dweight, sum_dy_local, None, None, None, None, None, None, None, None


class InPlaceABNLeaky(InPlaceABN):
    """InPlace-ABN with LeakyReLU(`act_slope`) or no activation (`act_slope=None`), BN-convention weight."""

    fuses_activation = True  # ConvNormAct adds no separate activation after it

    def __init__(self, num_features: int, act_slope: float | None = None, eps: float = 1e-5,
                 momentum: float = 0.1):
        if act_slope is None:
            activation, param = "identity", 0.0
        else:
            activation, param = "leaky_relu", act_slope
        super().__init__(num_features, eps=eps, momentum=momentum, activation=activation,
                         activation_param=param)
        # Batch statistics over all processes of the default group (sync_norm.convert_sync_norm
        # sets it). A flag, not a process group: the EMA deep-copies the model, and a group cannot
        # be copied.
        self.sync = False

    @property
    def min_scale(self) -> float:
        """The smallest scale InPlace-ABN represents: |w| + eps at w = 0."""
        return self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16 and not x.is_cuda and self.weight.dtype == torch.float16:
            raise RuntimeError("InPlace-ABN has no float16 kernel on CPU; use bfloat16, float32 or "
                               "norm='bn'")
        momentum, training = self._get_momentum_and_training()
        running_mean, running_var = self._get_running_stats()
        if training and x.numel() // x.shape[1] <= 1:
            raise ValueError(f"InPlace-ABN needs more than one value per channel in training, got "
                             f"input of shape {tuple(x.shape)}")
        group = dist.group.WORLD if self.sync and training and dist.is_initialized() else None
        # The kernel scales by |w| + eps: pass weight - eps so the scale is `weight` (module doc).
        return _InPlaceABNFunction.apply(x, self.weight - self.eps, self.bias, running_mean,
                                         running_var, training, momentum, self.eps,
                                         self.activation, self.activation_param, group)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        weight = state_dict.get(prefix + "weight")
        if weight is not None and bool((weight < -NEGATIVE_SCALE_TOLERANCE).any()):
            n = int((weight < -NEGATIVE_SCALE_TOLERANCE).sum())
            error_msgs.append(
                f"{prefix}weight has {n} negative BatchNorm scale(s) (min {weight.min().item():.4g}); "
                "InPlace-ABN scales by |w| + eps and cannot represent them. Load this checkpoint "
                "with norm='bn'.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if weight is not None:
            with torch.no_grad():
                self.weight.clamp_(min=self.min_scale)
