"""ResNeSt: Zhang et al., "ResNeSt: Split-Attention Networks", CVPR-W 2022 (arXiv 2004.08955).

As in the paper's ResNeSt-50/101 (https://github.com/zhanghang1989/ResNeSt): split attention with
radix 2 and cardinality 1 in every bottleneck's 3x3 conv; a deep stem of three 3x3 convs (stem width
32 for resnest50d, 64 for resnest101e) then 3x3 max pool; strided blocks downsample with a 3x3 average
pool after the split-attention conv ("avd"), and shortcuts with a 2x2 average pool before the 1x1 conv.
State-dict keys equal timm's `resnest50d` / `resnest101e`. BatchNorm + ReLU only: InPlace-ABN has no
in-place ReLU (its backward must invert the activation). Optional DropBlock (Ghiasi et al. 2018; timm's
DropBlock2d, block 3) in the last two stages, where the official code puts it: after bn1, after the
split-attention conv and after bn3 (resnest/gluon/resnet.py); its training ramps the probability
linearly over the epochs (`set_drop_block`). `set_grad_checkpointing()` recomputes each bottleneck
in backward instead of keeping its activations (the stem is kept), as timm's ResNeSt.
"""
from __future__ import annotations

import torch
from timm.layers import DropBlock2d, DropPath
from torch import nn

from tresnet_train.models.layers import checkpoint_blocks, drop_path_rates
from tresnet_train.models.registry import IMAGENET_MEAN, IMAGENET_STD, register_model

RESNEST_DATA_CONFIG = dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bilinear",
                           mean=IMAGENET_MEAN, std=IMAGENET_STD)


class SplitAttention(nn.Module):
    """Split-attention 3x3 conv: `radix` grouped conv branches, weighted per channel by a softmax over
    the branches of a small MLP on their pooled sum."""

    def __init__(self, channels: int, radix: int = 2):
        super().__init__()
        self.radix = radix
        attn_chs = max(channels * radix // 4, 32)  # paper: reduction factor 4, at least 32
        self.conv = nn.Conv2d(channels, channels * radix, 3, padding=1, groups=radix, bias=False)
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.act0 = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, attn_chs, 1)
        self.bn1 = nn.BatchNorm2d(attn_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(attn_chs, channels * radix, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.bn0(self.conv(x)))  # (N, R*C, H, W)
        n, rc, h, w = x.shape
        x = x.reshape(n, self.radix, rc // self.radix, h, w)  # (N, R, C, H, W)
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)  # (N, C, 1, 1)
        attn = self.fc2(self.act1(self.bn1(self.fc1(gap))))  # (N, R*C, 1, 1)
        attn = attn.reshape(n, self.radix, rc // self.radix, 1, 1).softmax(dim=1)  # (N, R, C, 1, 1)
        return (x * attn).sum(dim=1)  # (N, C, H, W)


class ResNestBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int, downsample: nn.Module | None,
                 radix: int, drop_path: float, drop_block: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = SplitAttention(planes, radix)
        self.avd_last = nn.AvgPool2d(3, stride, padding=1) if stride > 1 else None
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act3 = nn.ReLU(inplace=True)
        blocks = [DropBlock2d(drop_block, block_size=3) if drop_block > 0 else nn.Identity()
                  for _ in range(3)]
        self.drop_block1, self.drop_block2, self.drop_block3 = blocks  # no parameters: keys unchanged

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.drop_block2(self.conv2(self.act1(self.drop_block1(self.bn1(self.conv1(x))))))
        if self.avd_last is not None:
            out = self.avd_last(out)
        out = self.drop_block3(self.bn3(self.conv3(out)))
        return self.act3(self.drop_path(out) + shortcut)


class ResNeSt(nn.Module):
    def __init__(
        self,
        layers: tuple[int, int, int, int],
        stem_width: int = 32,
        radix: int = 2,
        num_classes: int = 1000,
        in_chans: int = 3,
        norm: str = "auto",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_block_rate: float = 0.0,
    ):
        super().__init__()
        if norm not in ("auto", "bn"):
            raise ValueError(f"norm={norm!r}: ResNeSt uses BatchNorm + ReLU; InPlace-ABN cannot run "
                             "an in-place ReLU. Use norm='auto' or 'bn'.")
        self.num_classes = num_classes
        in_chs = stem_width * 2
        self.conv1 = nn.Sequential(  # deep stem; keys conv1.{0,1,3,4,6} as in timm
            nn.Conv2d(in_chans, stem_width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, in_chs, 3, padding=1, bias=False),
        )
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        rates = iter(drop_path_rates(drop_path_rate, sum(layers)))
        for i, num_blocks in enumerate(layers):
            planes, stride = 64 * 2 ** i, 1 if i == 0 else 2
            out_chs = planes * ResNestBottleneck.expansion
            pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 \
                else nn.Identity()
            downsample = nn.Sequential(pool, nn.Conv2d(in_chs, out_chs, 1, bias=False),
                                       nn.BatchNorm2d(out_chs))
            blocks = []
            for j in range(num_blocks):
                blocks.append(ResNestBottleneck(in_chs, planes, stride if j == 0 else 1,
                                                downsample if j == 0 else None, radix, next(rates),
                                                drop_block_rate if i >= 2 else 0.0))
                in_chs = out_chs
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))

        self.num_features = in_chs
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Kaiming fan-out convs, unit BatchNorms, the last BatchNorm of each residual branch at zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResNestBottleneck):
                m.zero_init_last()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each bottleneck's input for backward and recompute the block there
        (layers.checkpoint_blocks): less memory, about one more forward per step."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """New classifier for `num_classes` outputs (0: the model returns pooled features)."""
        self.num_classes = num_classes
        ref = next(self.parameters())
        self.fc = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                   if num_classes > 0 else nn.Identity())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))  # (N, 2*stem, H/4, W/4)
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_blocks([block for stage in stages for block in stage], x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 2048, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean((2, 3)))  # (N, 2048)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(RESNEST_DATA_CONFIG)
def resnest50d(**kwargs) -> ResNeSt:
    return ResNeSt(layers=(3, 4, 6, 3), stem_width=32, **kwargs)


@register_model(dict(RESNEST_DATA_CONFIG, input_size=(3, 256, 256)))
def resnest101e(**kwargs) -> ResNeSt:
    return ResNeSt(layers=(3, 4, 23, 3), stem_width=64, **kwargs)
