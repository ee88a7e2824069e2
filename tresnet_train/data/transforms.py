"""Preprocessing settings shared by both backends, and the torchvision/timm transforms (torch backend).

Train: random-resized-crop (scale from data.scale, aspect 3/4..4/3; filter from
data.train_interpolation, `random` = bilinear or bicubic per image, timm's train.py default),
horizontal flip, optional timm RandAugment or AutoAugment (same hyper-parameters as timm's
`create_transform`), optional colour jitter (torchvision's ColorJitter: brightness, contrast,
saturation). Eval, two protocols: `crop` resizes the shorter side to floor(img_size / crop_pct) and
center-crops img_size (timm's eval transform, the trainer's); `squash` resizes the whole image to
img_size x img_size, aspect not kept, no crop (the official TResNet evaluation at 448:
`transforms.Resize((448, 448))` in Alibaba-MIIL/TResNet's src/helper_functions/helper_functions.py).
Images leave the workers as
uint8 CHW tensors and are normalised on the device ((x / 255 - mean) / std; TResNet: mean 0, std 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image, ImageOps

_INTERP = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
           "nearest": T.InterpolationMode.NEAREST}
VAL_RESIZE_MODES = ("crop", "squash")  # eval protocols, see the module docstring


@dataclass(frozen=True)
class Preprocess:
    """Everything both backends need to produce the same tensors; built from config + data config."""
    img_size: int  # train crop, pixels
    val_img_size: int  # eval crop, pixels
    crop_pct: float  # eval crop fraction
    interpolation: str  # bilinear | bicubic (the model's data config)
    mean: tuple[float, float, float]  # on the [0, 1] scale
    std: tuple[float, float, float]
    scale: tuple[float, float]  # random-resized-crop area range
    hflip: float
    randaugment: str  # timm spec or ""
    val_resize_mode: str = "crop"  # crop (timm, the trainer) | squash (official TResNet 448)
    train_interpolation: str = ""  # train resize: bilinear | bicubic | random ("" = interpolation)
    autoaugment: str = ""  # AutoAugment policy (original) or ""
    color_jitter: float = 0.0  # brightness/contrast/saturation strength, 0 = off

    def __post_init__(self):
        if self.val_resize_mode not in VAL_RESIZE_MODES:
            raise ValueError(f"val_resize_mode={self.val_resize_mode!r}: expected one of "
                             f"{', '.join(VAL_RESIZE_MODES)}")

    @property
    def fill(self) -> tuple[int, int, int]:
        """timm's `img_mean` hparam: the 0..255 colour that RandAugment's and AutoAugment's
        rotations, shears and translations fill the uncovered area with (the mean pixel)."""
        return tuple(min(255, round(255 * m)) for m in self.mean)

    @property
    def val_resize(self) -> int:
        """Shorter side after the eval resize, pixels: floor(img_size / crop_pct) before the center
        crop (crop, timm's rounding), img_size (squash: both sides, nothing cropped)."""
        if self.val_resize_mode == "squash":
            return self.val_img_size
        return math.floor(self.val_img_size / self.crop_pct)

    @classmethod
    def from_config(cls, data_cfg, data_config: dict) -> "Preprocess":
        interp = data_config.get("interpolation", "bilinear")
        if interp not in _INTERP:
            interp = "bilinear"  # timm's 'random' etc.: eval needs one fixed filter
        return cls(img_size=data_cfg.img_size, val_img_size=data_cfg.val_img_size or data_cfg.img_size,
                   crop_pct=data_cfg.crop_pct or float(data_config.get("crop_pct", 0.875)),
                   interpolation=interp, mean=tuple(float(m) for m in data_config.get("mean", (0, 0, 0))),
                   std=tuple(float(s) for s in data_config.get("std", (1, 1, 1))),
                   scale=tuple(data_cfg.scale), hflip=float(data_cfg.hflip),
                   randaugment=data_cfg.randaugment,
                   train_interpolation=data_cfg.train_interpolation or interp,
                   autoaugment=data_cfg.autoaugment, color_jitter=float(data_cfg.color_jitter))


class Normalize:
    """uint8 (or 0..255 float) NCHW -> float32 (x / 255 - mean) / std, on whatever device x is on."""

    def __init__(self, pre: Preprocess, device: torch.device):
        std = torch.tensor(pre.std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(device)
        self.shift = (torch.tensor(pre.mean, dtype=torch.float32) / std).view(1, 3, 1, 1).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mul_(self.scale).sub_(self.shift)


def load_rgb(path: str) -> Image.Image:
    """torchvision's default loader: Pillow, converted to RGB (CMYK, greyscale, palette all work).

    An image that is RGB already is returned as decoded: Pillow's `convert("RGB")` would copy it.
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits giving a black image as Pillow < 13 did (Pillow 13 raises
    "bits must be between or equal to 1 and 8"; timm's increasing posterize reaches 0 bits at
    magnitude 10, e.g. rand-m9-mstd0.5-inc1 with its magnitude noise)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow_safe(augment):
    """Swap timm's posterize for `_posterize` in this RandAugment's or AutoAugment's own ops (no
    global patching; AutoAugment's original policy posterizes down to 0 bits too)."""
    from timm.data import auto_augment
    ops = [*getattr(augment, "ops", []), *(op for sub in getattr(augment, "policy", []) for op in sub)]
    for op in ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize
    return augment


def train_transform(pre: Preprocess) -> T.Compose:
    interp = pre.train_interpolation or pre.interpolation
    if interp == "random":  # timm's crop: bilinear or bicubic, chosen per image
        from timm.data.transforms import RandomResizedCropAndInterpolation
        crop = RandomResizedCropAndInterpolation(pre.img_size, scale=pre.scale, ratio=(3 / 4, 4 / 3),
                                                 interpolation="random")
    else:
        crop = T.RandomResizedCrop(pre.img_size, scale=pre.scale, ratio=(3 / 4, 4 / 3),
                                   interpolation=_INTERP[interp])
    tfs = [crop, T.RandomHorizontalFlip(pre.hflip)]
    # timm's create_transform hyper-parameters; random: its ops pick bilinear or bicubic per image
    hparams = {"translate_const": int(pre.img_size * 0.45),
               "img_mean": pre.fill}
    if interp != "random":
        hparams["interpolation"] = F.pil_modes_mapping[_INTERP[interp]]
    if pre.randaugment:
        from timm.data.auto_augment import rand_augment_transform
        tfs.append(_pillow_safe(rand_augment_transform(pre.randaugment, hparams)))
    elif pre.autoaugment:
        from timm.data.auto_augment import auto_augment_transform
        tfs.append(_pillow_safe(auto_augment_transform(pre.autoaugment, hparams)))
    if pre.color_jitter:
        tfs.append(T.ColorJitter(brightness=pre.color_jitter, contrast=pre.color_jitter,
                                 saturation=pre.color_jitter))
    tfs.append(T.PILToTensor())  # uint8 CHW
    return T.Compose(tfs)


def eval_transform(pre: Preprocess) -> T.Compose:
    interp = _INTERP[pre.interpolation]
    if pre.val_resize_mode == "squash":
        size = [T.Resize((pre.val_img_size, pre.val_img_size), interpolation=interp)]
    else:
        size = [T.Resize(pre.val_resize, interpolation=interp), T.CenterCrop(pre.val_img_size)]
    return T.Compose([*size, T.PILToTensor()])
