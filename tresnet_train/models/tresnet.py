"""TResNet: Ridnik et al., "TResNet: High Performance GPU-Dedicated Architecture", WACV 2021.

Follows the official code (https://github.com/Alibaba-MIIL/TResNet, src/models/tresnet/tresnet.py):
- stem: SpaceToDepth (block 4), then a 3x3 conv-norm-LeakyReLU(0.01);
- stages 1-2: BasicBlocks, stages 3-4: Bottlenecks (TResNet-V2: Bottlenecks everywhere);
- SE in stages 1-3 only: BasicBlock after its second conv, before the residual sum; Bottleneck after
  the 3x3 conv (reduction max(planes / 4, 64) and max(planes / 2, 64) channels);
- LeakyReLU(1e-3) inside blocks, no activation on a block's last norm, ReLU after the residual sum;
- anti-aliased downsampling: stride-1 conv, then a 3x3 binomial blur with stride 2;
- shortcut downsampling: 2x2 average pool (ceil mode), then 1x1 conv-norm;
- fast global average pooling, a linear classifier.
A Bottleneck recomputes its last conv and norm in backward (`recompute_conv3`) rather than keep
their output. `set_grad_checkpointing()` recomputes each residual block in backward instead of keeping its
activations (as timm's models: the stem is kept, every block of the four stages is checkpointed).
State-dict keys equal timm's `tresnet_*` models, so timm weights load unchanged. `norm` picks
BatchNorm2d + LeakyReLU or InPlace-ABN (see layers.resolve_norm_layer); keys are the same.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from timm.layers import DropPath, SpaceToDepth
from torch import nn

from tresnet_train.models.layers import (BlurPool2d, ConvNormAct, FastGlobalAvgPool, SqueezeExcite,
                                         checkpoint_blocks, checkpoint_module, drop_path_rates, resolve_norm_layer,
                                         zero_scale_)
from tresnet_train.models.registry import TRESNET_DATA_CONFIG, register_model

STEM_SLOPE = 1e-2  # LeakyReLU slope of the stem conv (official: InPlaceABN default activation_param)
BLOCK_SLOPE = 1e-3  # LeakyReLU slope inside the residual blocks (official: activation_param=1e-3)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int, downsample: nn.Module | None,
                 use_se: bool, norm_layer: type[nn.Module], drop_path: float):
        super().__init__()
        self.conv1 = ConvNormAct(in_chs, planes, 3, stride, norm_layer, BLOCK_SLOPE, BlurPool2d)
        self.conv2 = ConvNormAct(planes, planes, 3, 1, norm_layer, act_slope=None)
        self.se = SqueezeExcite(planes, max(planes // 4, 64)) if use_se else None
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        zero_scale_(self.conv2.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        if self.se is not None:
            out = self.se(out)
        return self.act(self.drop_path(out) + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int, downsample: nn.Module | None,
                 use_se: bool, norm_layer: type[nn.Module], drop_path: float):
        super().__init__()
        self.conv1 = ConvNormAct(in_chs, planes, 1, 1, norm_layer, BLOCK_SLOPE)
        self.conv2 = ConvNormAct(planes, planes, 3, stride, norm_layer, BLOCK_SLOPE, BlurPool2d)
        self.se = SqueezeExcite(planes, max(planes * self.expansion // 8, 64)) if use_se else None
        self.conv3 = ConvNormAct(planes, planes * self.expansion, 1, 1, norm_layer, act_slope=None)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        # conv3 and its norm run again in backward from their input, which the graph keeps anyway
        # (conv2's output, SE's gate), instead of keeping their output: (4 * planes, H, W) per image,
        # 9.6 of TResNet-M's 42.3 MiB per image at 224 in fp32 (scripts/bench_memory.py), for one
        # more 1x1 conv and norm per block. Bit-identical results (layers.checkpoint_module).
        self.recompute_conv3 = True

    def zero_init_last(self) -> None:
        zero_scale_(self.conv3.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        # SE's gated product feeds conv3 only: recomputed in backward instead of kept (gated_conv2d).
        gate = self.se.attention(out) if self.se is not None else None
        # Under torch.compile the partitioner picks what to recompute (and a checkpointed call that
        # freezes running statistics cannot be traced).
        if self.recompute_conv3 and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            out = checkpoint_module(self.conv3, out, gate)
        else:
            out = self.conv3(out, gate=gate)
        return self.act(self.drop_path(out) + shortcut)


class ClassifierHead(nn.Module):
    """Global pool -> dropout -> linear. `num_classes=0` gives pooled features (keys `fc.*`)."""

    def __init__(self, num_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.global_pool = FastGlobalAvgPool()
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))  # (N, C)
        return x if pre_logits else self.fc(x)


class TResNet(nn.Module):
    """TResNet with `layers` blocks per stage and stage widths 64 * width_factor * (1, 2, 4, 8)."""

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        width_factor: float = 1.0,
        v2: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        norm: str = "auto",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        norm_layer = resolve_norm_layer(norm)
        self.num_classes = num_classes
        planes = int(64 * width_factor)
        if v2:
            planes = planes // 8 * 8  # TResNet-V2 rounds widths to multiples of 8
        early_block = Bottleneck if v2 else BasicBlock
        stage_specs = [  # (block, planes, blocks, stride, use_se)
            (early_block, planes, layers[0], 1, True),
            (early_block, planes * 2, layers[1], 2, True),
            (Bottleneck, planes * 4, layers[2], 2, True),
            (Bottleneck, planes * 8, layers[3], 2, False),
        ]
        rates = iter(drop_path_rates(drop_path_rate, sum(layers)))

        body = OrderedDict(s2d=SpaceToDepth(4), conv1=ConvNormAct(in_chans * 16, planes, 3, 1,
                                                                  norm_layer, STEM_SLOPE))
        in_chs = planes
        for i, (block, stage_planes, num_blocks, stride, use_se) in enumerate(stage_specs):
            out_chs = stage_planes * block.expansion
            downsample = None
            if stride != 1 or in_chs != out_chs:
                pool = [nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)] if stride == 2 else []
                downsample = nn.Sequential(*pool, ConvNormAct(in_chs, out_chs, 1, 1, norm_layer))
            blocks = []
            for j in range(num_blocks):
                blocks.append(block(in_chs, stage_planes, stride if j == 0 else 1,
                                    downsample if j == 0 else None, use_se, norm_layer, next(rates)))
                in_chs = out_chs
            body[f"layer{i + 1}"] = nn.Sequential(*blocks)
        self.body = nn.Sequential(body)

        self.num_features = in_chs
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        self.grad_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init: Kaiming fan-out convs, unit norms, N(0, 0.01) classifier, and the last norm
        of every residual branch at zero so each block starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif hasattr(m, "running_var") and getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                m.zero_init_last()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each residual block's input for backward and recompute the block there
        (layers.checkpoint_blocks): less memory, about one more forward per step. The Bottlenecks'
        own conv3 recomputation is then turned off: the whole block runs again anyway."""
        self.grad_checkpointing = enable
        for m in self.modules():
            if isinstance(m, Bottleneck):
                m.recompute_conv3 = not enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """New classifier for `num_classes` outputs (0: the model returns pooled features)."""
        self.num_classes = num_classes
        self.head.fc = nn.Identity()
        if num_classes > 0:
            ref = next(self.parameters())  # the new layer goes on the model's device and dtype
            self.head.fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.normal_(self.head.fc.weight, 0.0, 0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_features, H/32, W/32)."""
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return self.body(x)
        x = self.body.conv1(self.body.s2d(x))  # (N, planes, H/4, W/4)
        stages = (self.body.layer1, self.body.layer2, self.body.layer3, self.body.layer4)
        return checkpoint_blocks([block for stage in stages for block in stage], x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(TRESNET_DATA_CONFIG)
def tresnet_m(**kwargs) -> TResNet:
    return TResNet(layers=(3, 4, 11, 3), **kwargs)


@register_model(TRESNET_DATA_CONFIG)
def tresnet_l(**kwargs) -> TResNet:
    return TResNet(layers=(4, 5, 18, 3), width_factor=1.2, **kwargs)


@register_model(TRESNET_DATA_CONFIG)
def tresnet_xl(**kwargs) -> TResNet:
    return TResNet(layers=(4, 5, 24, 3), width_factor=1.3, **kwargs)


@register_model(TRESNET_DATA_CONFIG)
def tresnet_v2_l(**kwargs) -> TResNet:
    """TResNet-L-V2 (Ridnik et al., "ImageNet-21K Pretraining for the Masses"): Bottlenecks in all
    stages, width 1.0, [3, 4, 23, 3] blocks."""
    return TResNet(layers=(3, 4, 23, 3), v2=True, **kwargs)


@register_model(TRESNET_DATA_CONFIG)
def tresnet_tiny(**kwargs) -> TResNet:
    """Tiny test/demo variant (ours, no published weights): TResNet blocks, one per stage, width 0.25.
    For CPU demos and fast trainer tests, not for accuracy."""
    return TResNet(layers=(1, 1, 1, 1), width_factor=0.25, **kwargs)
