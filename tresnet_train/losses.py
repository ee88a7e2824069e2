"""Training criteria and the batch-level augmentations that change the targets.

- `ce`: cross-entropy with label smoothing; under mixup/cutmix the targets are soft (already smoothed
  by timm's Mixup) and soft-target cross-entropy is used.
- `bce`: binary cross-entropy with label smoothing and an optional target threshold, as in
  "ResNet strikes back" (Wightman et al., 2021), timm's implementation.

Mixup/cutmix and random erasing run on the batch after the loader, on the model's device.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from .config import Config


class CrossEntropy(nn.Module):
    """Label-smoothed CE for class indices, soft-target CE for mixed (dense) targets."""

    def __init__(self, smoothing: float):
        super().__init__()
        self.hard = nn.CrossEntropyLoss(label_smoothing=smoothing)
        self.soft = SoftTargetCrossEntropy()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.soft(logits, target) if target.ndim == 2 else self.hard(logits, target)


def build_criterion(cfg: Config) -> nn.Module:
    if cfg.train.loss == "bce":
        thresh = cfg.train.bce_target_thresh or None
        return BinaryCrossEntropy(smoothing=cfg.train.label_smoothing, target_threshold=thresh)
    return CrossEntropy(cfg.train.label_smoothing)


def eval_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed plain cross-entropy over the real (target >= 0) samples of an eval batch."""
    per_image = F.cross_entropy(logits.float(), target.clamp(min=0), reduction="none")
    return torch.where(target >= 0, per_image, 0.0).sum()  # a mask, not an index: no host sync


class BatchAugment:
    """Mixup/cutmix (soft targets) then random erasing, on a batch on the model's device.

    With everything off it returns its input unchanged, so the training step has no branches.
    timm's Mixup needs an even batch: `build_batch_augment` checks that up front.
    """

    def __init__(self, mixup: Mixup | None, erasing: RandomErasing | None):
        self.mixup = mixup
        self.erasing = erasing

    def __call__(self, images: torch.Tensor, targets: torch.Tensor):
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        if self.erasing is not None:
            images = self.erasing(images)
        return images, targets


def build_batch_augment(cfg: Config, num_classes: int, device: torch.device) -> BatchAugment:
    mixup = None
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.data.mixup, cutmix_alpha=cfg.data.cutmix,
                      label_smoothing=cfg.train.label_smoothing, num_classes=num_classes)
    # Pixel mode: per-pixel normal noise, as in the published TResNet-M recipe (re_mode pixel).
    erasing = (RandomErasing(cfg.data.random_erasing, mode="pixel", device=device)
               if cfg.data.random_erasing > 0 else None)
    return BatchAugment(mixup, erasing)
