"""InPlace-ABN (Rota Bulo et al., CVPR 2018) as a TResNet norm layer; imported only when it is used.

`inplace_abn.InPlaceABN` computes `act((x - mean) / sqrt(var + eps) * (|w| + eps) + b)`: it scales by
`|w| + eps`, not by `w`. This layer keeps its `weight` in BatchNorm convention (the scale itself) and
hands `weight - eps` to the kernel, so `|weight - eps| + eps == weight` for every `weight >= eps`. The
state dict therefore means the same thing as a BatchNorm2d state dict with the same keys: a checkpoint
trained with InPlace-ABN loads into the BatchNorm model (and into timm) unchanged, and the reverse works
as long as no scale is negative, which InPlace-ABN cannot represent (loading refuses such weights).
Official InPlace-ABN checkpoints are converted to this convention (`|w| + eps`) by
`checkpoints.convert_official_state_dict`; the kernel then sees `|w|`, i.e. exactly the official scale.
"""
from __future__ import annotations

import torch
from inplace_abn import InPlaceABN
from inplace_abn.functions import inplace_abn, inplace_abn_sync

# A BatchNorm scale below -tolerance has no InPlace-ABN equivalent (the kernel would use ~ -scale).
NEGATIVE_SCALE_TOLERANCE = 1e-3


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
        # Process group for batch statistics across ranks (set by sync_norm.convert_sync_norm).
        # None computes them per process; the kernel's own default would be None too, silently.
        self.sync_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16 and x.device.type == "cpu":
            raise RuntimeError("InPlace-ABN has no float16 kernel on CPU; use bfloat16, float32 or "
                               "norm='bn'")
        momentum, training = self._get_momentum_and_training()
        running_mean, running_var = self._get_running_stats()
        # The kernel scales by |w| + eps: pass weight - eps so the scale is `weight` (see module doc).
        args = (x, self.weight - self.eps, self.bias, running_mean, running_var, training, momentum,
                self.eps, self.activation, self.activation_param)
        if training and self.sync_group is not None:
            return inplace_abn_sync(*args, group=self.sync_group)
        return inplace_abn(*args)

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
