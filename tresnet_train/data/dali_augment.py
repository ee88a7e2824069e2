"""timm's RandAugment (`rand-m9-n2-mstd0.5-inc1`) built from DALI operators, for CPU and GPU pipelines.

Follows timm.data.auto_augment (RandAugment, AugmentOp and the level functions), not DALI's own
`auto_aug.rand_augment`, which differs from it in distribution: it applies every chosen op (timm
applies each with probability 0.5, so a quarter of the images pass untouched with 2 ops), its op set
has Identity and lacks Invert and SolarizeAdd, its magnitudes are fixed bins without timm's noise
(mstd) and its `monotonic_mag` posterize keeps 4 to 8 bits where timm's `inc1` keeps 4 down to 0.

Per image and per layer, as timm: an op drawn uniformly from the 15 of `_RAND_TRANSFORMS` (or
`_RAND_INCREASING_TRANSFORMS` for inc1), with replacement; applied with probability p (0.5); its
magnitude drawn from N(m, mstd) (uniform on [0, m] for mstd > 100) and clipped to [0, mmax or 10];
a random sign for the signed ops (timm's `_randomly_negate`); the op's parameter from timm's level
function; geometric ops fill with the mean colour (timm's `img_mean`). Pixel arithmetic follows
Pillow's (ImageEnhance blends truncate, Color and Contrast use Pillow's integer luma).

Left different, measured per op in tests/test_augment_equal.py: DALI's warps sample bilinearly
only (timm picks bilinear or bicubic per op with `random` interpolation), Equalize uses DALI's
OpenCV-style lookup table.

Every operator here has a CPU and a GPU implementation in DALI; parameters that meet the pixels as
tensor inputs move to the GPU with them. The graph needs `enable_conditionals=True`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .folder import DataError

_LEVEL_DENOM = 10.0  # timm: magnitude m / 10 is the level in [0, 1]
_TRANSLATE_PCT = 0.45  # timm's translate_pct: translation range as a fraction of the image side

# timm.data.auto_augment._RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in timm's order
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                   "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = tuple(
    f"{name}Increasing" if name in ("Posterize", "Solarize", "Color", "Contrast", "Brightness",
                                    "Sharpness") else name for name in RAND_TRANSFORMS)


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's `rand-...` string, parsed as `rand_augment_transform` parses it."""
    magnitude: float = 10.0  # m, 0..10 on timm's scale
    num_ops: int = 2  # n, ops per image
    prob: float = 0.5  # p, probability that a chosen op is applied
    magnitude_std: float = 0.0  # mstd; inf = uniform on [0, m] (timm: any mstd > 100)
    magnitude_max: float = _LEVEL_DENOM  # mmax, the clip of the noisy magnitude
    increasing: bool = False  # inc1: ops whose severity grows with m

    @property
    def op_names(self) -> tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


def parse_randaugment(spec: str) -> RandAugmentSpec:
    """`rand-m9-n2-mstd0.5-inc1` (timm's keys m, n, p, mstd, mmax, inc) -> RandAugmentSpec."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise DataError(f"data.randaugment={spec!r}: expected a timm RandAugment spec starting "
                        f"with 'rand', e.g. rand-m9-mstd0.5-inc1")
    args = {}
    for part in parts[1:]:
        key, value = re.fullmatch(r"([a-z]+)(.*)", part).groups()
        try:
            if key == "m":
                args["magnitude"] = float(int(value))
            elif key == "n":
                args["num_ops"] = int(value)
            elif key == "p":
                args["prob"] = float(value)
            elif key == "mstd":
                args["magnitude_std"] = math.inf if float(value) > 100 else float(value)
            elif key == "mmax":
                args["magnitude_max"] = float(int(value)) or _LEVEL_DENOM  # timm: `mmax or 10`
            elif key == "inc":
                args["increasing"] = bool(int(value))
            else:
                raise DataError(f"data.randaugment={spec!r}: {part!r} is not one of timm's keys "
                                f"m, n, p, mstd, mmax, inc (op weights 't' are not supported)")
        except ValueError as e:
            if isinstance(e, DataError):  # DataError is a ValueError too
                raise
            raise DataError(f"data.randaugment={spec!r}: {part!r} needs a number") from None
    return RandAugmentSpec(**args)


class Layer(NamedTuple):
    """One RandAugment layer's random draws, per image (DALI DataNodes on the CPU)."""
    op: object  # index into the op list
    applied: object  # bool
    level: object  # float32 clipped magnitude / 10
    sign: object  # float32 +1 or -1


@dataclass(frozen=True)
class Context:
    """What the ops need besides the pixels: image size (H, W) in pixels, fill colour (timm's
    img_mean, 0..255 per channel), and the DALI modules (imported here only when used: DALI is an
    optional dependency)."""
    size: tuple[int, int]
    fill: tuple[int, int, int]
    fn: object
    types: object
    math: object

    @classmethod
    def create(cls, size: tuple[int, int], fill: tuple[int, int, int]) -> "Context":
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
        return cls(tuple(size), tuple(fill), fn, types, dmath)


def draw_layer(ctx: Context, spec: RandAugmentSpec, num_ops: int) -> Layer:
    """timm's draws for one layer: np.random.choice over the ops (with replacement), the op's
    `random.random() > prob` skip, its magnitude noise and clip, and `_randomly_negate`."""
    fn, types = ctx.fn, ctx.types
    op = fn.random.choice(num_ops)
    applied = fn.random.coin_flip(probability=spec.prob, dtype=types.BOOL)
    if spec.magnitude_std == math.inf:
        magnitude = fn.random.uniform(range=[0.0, spec.magnitude])
    else:  # stddev 0 gives m itself, as a per-image tensor like the other draws
        magnitude = fn.random.normal(mean=spec.magnitude, stddev=spec.magnitude_std)
    level = ctx.math.clamp(magnitude, 0.0, spec.magnitude_max) / _LEVEL_DENOM
    sign = 1.0 - 2.0 * fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.FLOAT)
    return Layer(op, applied, level, sign)


def rand_augment(images, ctx: Context, spec: RandAugmentSpec):
    """uint8 HWC images -> timm's RandAugment of them."""
    names = spec.op_names
    for _ in range(spec.num_ops):
        images = apply_layer(images, draw_layer(ctx, spec, len(names)), names, ctx)
    return images


def apply_layer(images, layer: Layer, names: tuple[str, ...], ctx: Context):
    """The layer's op on the images it applies to; `names` are the ops `layer.op` indexes."""
    if layer.applied:
        out = _select(images, layer, names, ctx, 0)
    else:
        out = images
    return out


def _select(images, layer: Layer, names: tuple[str, ...], ctx: Context, first: int):
    """An if/else chain over the ops: each image runs only its own op."""
    if first == len(names) - 1:
        return OPS[names[first]](images, layer, ctx)
    if layer.op == first:
        out = OPS[names[first]](images, layer, ctx)
    else:
        out = _select(images, layer, names, ctx, first + 1)
    return out


# ---- helpers --------------------------------------------------------------------------------------
def _on(node, images):
    """A per-image parameter on the images' device (tensor inputs must share it)."""
    return node.gpu() if images.device == "gpu" else node


def _u8(ctx: Context, x):
    """Float pixels -> uint8 the way Pillow's blends store them: truncated, clipped to 0..255."""
    return ctx.fn.cast(ctx.math.clamp(ctx.math.floor(x), 0.0, 255.0), dtype=ctx.types.UINT8)


def _blend(ctx: Context, images, degenerate, factor):
    """Pillow's Image.blend(degenerate, image, factor), the core of every ImageEnhance op."""
    return _u8(ctx, degenerate + (images - degenerate) * _on(factor, images))


def _luma(ctx: Context, images):
    """Pillow's convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16, as float (H, W, 1)."""
    weights = ctx.types.Constant(np.array([19595, 38470, 7471], np.float32) / 65536)
    return ctx.math.floor(ctx.fn.reductions.sum(images * weights, axis_names="C", keep_dims=True)
                          + 0.5)


def _enhance_factor(layer: Layer, increasing: bool):
    """timm's _enhance_level_to_arg (0.1..1.9) or _enhance_increasing_level_to_arg (1 +- 0.9 level,
    at least 0.1)."""
    if increasing:
        return _max(1.0 + layer.sign * layer.level * 0.9, 0.1)
    return layer.level * 1.8 + 0.1


def _max(x, low: float):
    return x + (low - x) * (x < low)


def _filled(ctx: Context, images, warp):
    """`warp(images, fill_value)` with the uncovered area in ctx.fill. DALI's warps fill with one
    scalar: a fill that differs per channel is subtracted before the warp (filling 0) and added
    back after."""
    if len(set(ctx.fill)) == 1:
        return warp(images, float(ctx.fill[0]))
    fill = ctx.types.Constant(np.array(ctx.fill, np.float32))
    warped = warp(ctx.fn.cast(images, dtype=ctx.types.FLOAT) - fill, 0.0)
    return ctx.fn.cast(ctx.math.clamp(warped + fill, 0.0, 255.0), dtype=ctx.types.UINT8)


def _warp(ctx: Context, images, matrix):
    """Pillow's Image.transform(AFFINE, matrix), `matrix` mapping output to input pixels."""
    return _filled(ctx, images, lambda x, fill: ctx.fn.warp_affine(
        x, matrix=matrix, fill_value=fill, inverse_map=False, interp_type=ctx.types.INTERP_LINEAR))


def _affine(ctx: Context, entry: tuple[int, int], value):
    """The 2x3 identity map with `value` (per image) at `entry`."""
    unit = np.zeros((2, 3), np.float32)
    unit[entry] = 1
    return ctx.types.Constant(np.eye(2, 3, dtype=np.float32)) + value * ctx.types.Constant(unit)


# ---- the ops (timm's NAME_TO_OP with its LEVEL_TO_ARG) ---------------------------------------------
def _auto_contrast(images, layer, ctx):
    """ImageOps.autocontrast: each channel's [min, max] stretched to [0, 255]; flat channels kept."""
    lo = ctx.fn.reductions.min(images, axis_names="HW", keep_dims=True)
    hi = ctx.fn.reductions.max(images, axis_names="HW", keep_dims=True)
    flat = hi <= lo
    scale = 255.0 / _max(ctx.fn.cast(hi - lo, dtype=ctx.types.FLOAT), 1.0)
    return _u8(ctx, (images - lo) * scale + lo * flat + 1e-3)  # + 1e-3: max maps to 255 exactly


def _equalize(images, layer, ctx):
    return ctx.fn.equalize(images)


def _invert(images, layer, ctx):
    return ctx.types.Constant(255, dtype=ctx.types.UINT8) - images


def _rotate(images, layer, ctx):
    """Image.rotate(level * 30 degrees, randomly negated) about the centre, size kept."""
    angle = layer.sign * layer.level * 30.0
    return _filled(ctx, images, lambda x, fill: ctx.fn.rotate(
        x, angle=angle, keep_size=True, fill_value=fill, interp_type=ctx.types.INTERP_LINEAR))


def _posterize_bits(images, bits, ctx):
    """ImageOps.posterize keeping `bits` high bits; 0 bits is black (Pillow < 13, timm's intent)."""
    mask = ctx.fn.cast(256.0 - ctx.math.pow(2.0, 8.0 - bits), dtype=ctx.types.UINT8)
    return images & _on(mask, images)


def _posterize(images, layer, ctx):
    """timm's _posterize_level_to_arg: int(level * 4) bits kept (0..4)."""
    return _posterize_bits(images, ctx.math.floor(layer.level * 4.0), ctx)


def _posterize_increasing(images, layer, ctx):
    """_posterize_increasing_level_to_arg: 4 - int(level * 4) bits kept (4..0)."""
    return _posterize_bits(images, 4.0 - ctx.math.floor(layer.level * 4.0), ctx)


def _solarize_threshold(images, threshold, ctx):
    """ImageOps.solarize: pixels at or above the threshold are inverted."""
    inverted = images >= _on(threshold, images)
    return (inverted * (ctx.types.Constant(255, dtype=ctx.types.UINT8) - images)
            + (inverted ^ True) * images)


def _solarize(images, layer, ctx):
    """_solarize_level_to_arg: threshold min(256, int(level * 256))."""
    return _solarize_threshold(images, _min256(ctx.math.floor(layer.level * 256.0)), ctx)


def _solarize_increasing(images, layer, ctx):
    """_solarize_increasing_level_to_arg: threshold 256 - min(256, int(level * 256))."""
    return _solarize_threshold(images, 256.0 - _min256(ctx.math.floor(layer.level * 256.0)), ctx)


def _min256(x):
    return x + (256.0 - x) * (x > 256.0)


def _solarize_add(images, layer, ctx):
    """timm's solarize_add: min(128, int(level * 110)) added to pixels below 128 (capped at 255)."""
    add = ctx.math.floor(layer.level * 110.0)
    add = add + (128.0 - add) * (add > 128.0)
    shifted = images < ctx.types.Constant(128, dtype=ctx.types.UINT8)
    return _u8(ctx, images + shifted * _on(add, images))


def _color(increasing: bool):
    def op(images, layer, ctx):
        """ImageEnhance.Color: blend with the image's luma."""
        return _blend(ctx, images, _luma(ctx, images), _enhance_factor(layer, increasing))
    return op


def _contrast(increasing: bool):
    def op(images, layer, ctx):
        """ImageEnhance.Contrast: blend with the luma's mean, rounded to an integer."""
        mean = ctx.math.floor(ctx.fn.reductions.mean(_luma(ctx, images), axis_names="HWC",
                                                     keep_dims=True) + 0.5)
        return _blend(ctx, images, mean, _enhance_factor(layer, increasing))
    return op


def _brightness(increasing: bool):
    def op(images, layer, ctx):
        """ImageEnhance.Brightness: blend with black."""
        return _u8(ctx, images * _on(_enhance_factor(layer, increasing), images))
    return op


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # ImageFilter.SMOOTH
_IDENTITY = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32)


def _sharpness(increasing: bool):
    def op(images, layer, ctx):
        """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image, as one 3x3 filter; the
        1-pixel border is kept as it is (Pillow's filter copies it from the input)."""
        factor = _enhance_factor(layer, increasing)
        kernel = (1.0 - factor) * ctx.types.Constant(_SMOOTH) + factor * ctx.types.Constant(
            _IDENTITY)
        inside = np.zeros((*ctx.size, 1), np.uint8)
        inside[1:-1, 1:-1] = 1
        inside = ctx.types.Constant(inside)
        return (ctx.fn.filter(images, _on(kernel, images)) * inside
                + images * (ctx.types.Constant(1, dtype=ctx.types.UINT8) - inside))
    return op


def _shear(entry: tuple[int, int]):
    def op(images, layer, ctx):
        """timm's shear_x/y: Pillow's affine (1, f, 0, 0, 1, 0) or (1, 0, 0, f, 1, 0),
        f = level * 0.3, randomly negated."""
        return _warp(ctx, images, _affine(ctx, entry, layer.sign * layer.level * 0.3))
    return op


def _translate(entry: tuple[int, int], side: int):
    def op(images, layer, ctx):
        """timm's translate_x/y_rel: level * 0.45 of the width/height, randomly negated."""
        pixels = layer.sign * layer.level * (_TRANSLATE_PCT * ctx.size[side])
        return _warp(ctx, images, _affine(ctx, entry, pixels))
    return op


OPS = {
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert, "Rotate": _rotate,
    "Posterize": _posterize, "PosterizeIncreasing": _posterize_increasing,
    "Solarize": _solarize, "SolarizeIncreasing": _solarize_increasing,
    "SolarizeAdd": _solarize_add,
    "Color": _color(False), "ColorIncreasing": _color(True),
    "Contrast": _contrast(False), "ContrastIncreasing": _contrast(True),
    "Brightness": _brightness(False), "BrightnessIncreasing": _brightness(True),
    "Sharpness": _sharpness(False), "SharpnessIncreasing": _sharpness(True),
    "ShearX": _shear((0, 1)), "ShearY": _shear((1, 0)),
    "TranslateXRel": _translate((0, 2), 1), "TranslateYRel": _translate((1, 2), 0),
}
