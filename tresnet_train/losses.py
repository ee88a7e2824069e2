"""Training criteria and the batch-level augmentations that change the targets.

- `ce`: cross-entropy with label smoothing; under mixup/cutmix the targets are soft (already smoothed
  by timm's Mixup) and soft-target cross-entropy is used.
- `bce`: binary cross-entropy with label smoothing and an optional target threshold, as in
  "ResNet strikes back" (Wightman et al., 2021), timm's implementation.

PCA lighting, mixup/cutmix and random erasing run on the batch after the loader, on the model's
device, so both loaders share them.
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


class PcaLighting:
    """AlexNet's PCA lighting noise (Krizhevsky et al. 2012), as ResNeSt's training script applies it
    (Gluon's RandomLighting): each image gets eigvec @ (alpha * eigval) added to its RGB on the
    [0, 1] scale, alpha ~ N(0, std^2) per image and component, before normalisation. On the
    normalised batch that is the same offset divided by the normalisation std, per channel.
    """

    # ImageNet RGB covariance on the [0, 1] scale (fb.resnet.torch, Gluon: 55.46 / 255, ...)
    EIGVAL = (0.2175, 0.0188, 0.0045)
    EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))

    def __init__(self, alpha_std: float, norm_std, device: torch.device):
        self.alpha_std = alpha_std
        self.basis = (torch.tensor(self.EIGVEC) * torch.tensor(self.EIGVAL)).to(device)  # [rgb, component]
        self.inv_std = (1.0 / torch.tensor(norm_std, dtype=torch.float32)).view(1, 3, 1, 1).to(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(images.shape[0], 3, device=images.device) * self.alpha_std  # [N, component]
        rgb = (alpha @ self.basis.T).view(-1, 3, 1, 1)  # [N, rgb, 1, 1]
        return images + (rgb * self.inv_std).to(images.dtype)


class BatchAugment:
    """PCA lighting, mixup/cutmix (soft targets) then random erasing, on a batch on the model's device.

    With everything off it returns its input unchanged, so the training step has no branches.
    timm's Mixup needs an even batch: `build_batch_augment` checks that up front.
    """

    def __init__(self, mixup: Mixup | None, erasing: RandomErasing | None,
                 lighting: PcaLighting | None = None):
        self.mixup = mixup
        self.erasing = erasing
        self.lighting = lighting

    def __call__(self, images: torch.Tensor, targets: torch.Tensor):
        if self.lighting is not None:
            images = self.lighting(images)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        if self.erasing is not None:
            images = self.erasing(images)
        return images, targets


def build_batch_augment(cfg: Config, num_classes: int, device: torch.device,
                        norm_std=(1.0, 1.0, 1.0)) -> BatchAugment:
    """`norm_std`: the std the loaders normalised with (the model's data config), for PCA lighting."""
    mixup = None
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.data.mixup, cutmix_alpha=cfg.data.cutmix,
                      label_smoothing=cfg.train.label_smoothing, num_classes=num_classes)
    # Pixel mode: per-pixel normal noise, as in the published TResNet-M recipe (re_mode pixel).
    erasing = (RandomErasing(cfg.data.random_erasing, mode="pixel", device=device)
               if cfg.data.random_erasing > 0 else None)
    lighting = PcaLighting(cfg.data.pca_lighting, norm_std, device) if cfg.data.pca_lighting > 0 else None
    return BatchAugment(mixup, erasing, lighting)
