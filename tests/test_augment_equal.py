"""The two backends' training augmentation, compared in distribution on real photos.

DALI's RandAugment (tresnet_train/data/dali_augment.py) against timm's (the torch backend's), and
the whole train loaders of both backends (random-resized crop, flip, resize filter); random erasing
and mixup/cutmix run on the batch after either loader (losses.BatchAugment), so one backend-free
check of their rates covers both.

Tolerances come from the sampling error, not from a guess. A share p estimated from n1 draws on one
backend and n2 on the other: under "same distribution" the difference has standard error
SE = sqrt(p (1 - p) (1/n1 + 1/n2)) with p pooled, and by the CLT (n p > 10 here) the difference over
SE is close to N(0, 1). A mean (e.g. mean absolute pixel change): SE = sqrt(s1^2/n1 + s2^2/n2)
with the sample variances. Each comparison passes within Z = 5 SE: a false alarm has probability
6e-7 per comparison, below 1e-4 for the ~100 comparisons in this file, while a real difference of
5 SE fails. Draws are independent (fresh random numbers for every image and every run) and both
backends see the same images equally often, so the draw-level variance is the right one. At the
sizes used (1,600 RandAugment draws, about 110 per op) the test detects, for example, a 6-point
difference in the untouched share (25% vs 18%) or DALI's former posterize at inc1 (4 bits kept where
timm keeps 1). Known implementation differences stay well inside this: DALI warps bilinearly
only, and its Equalize uses OpenCV's lookup table (about 1 SE here).
"""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import real_photos
from tresnet_train.data.dali_backend import dali_available

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
Z = 5.0  # tolerance in standard errors (see the module docstring)
SIZE = 64  # RandAugment input side, pixels
IMAGES = 16  # photos per batch; every run augments all of them
RUNS = 100  # runs per backend: 1,600 draws


def proportions_agree(k1: int, n1: int, k2: int, n2: int) -> tuple[bool, str]:
    p1, p2, pooled = k1 / n1, k2 / n2, (k1 + k2) / (n1 + n2)
    se = max(np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2)), 1e-12)
    return abs(p1 - p2) <= Z * se, f"{p1:.4f} vs {p2:.4f} (SE {se:.4f})"


def means_agree(a: np.ndarray, b: np.ndarray) -> tuple[bool, str]:
    se = max(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)), 1e-12)
    return abs(a.mean() - b.mean()) <= Z * se, f"{a.mean():.3f} vs {b.mean():.3f} (SE {se:.3f})"


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """IMAGES real photos from different classes, SIZE x SIZE uint8 RGB."""
    files = sorted((real_photos() / "train").glob("*/*.JPEG"))[::25][:IMAGES]
    return [np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
            for f in files]


# ---- RandAugment ----------------------------------------------------------------------------------
def dali_rand_augment(photos, spec_str: str, fill=(0, 0, 0), runs: int = RUNS, gpu: bool = False):
    """DALI: per draw (image index, ops chosen per layer, applied per layer, output); `gpu` runs
    the ops on the GPU (pixels there, per-image parameters drawn on the CPU, as in training)."""
    from nvidia.dali import pipeline_def
    from tresnet_train.data.dali_augment import Context, apply_layer, draw_layer, parse_randaugment
    spec = parse_randaugment(spec_str)
    names = spec.op_names

    @pipeline_def(enable_conditionals=True, batch_size=len(photos), num_threads=2,
                  device_id=0 if gpu else None, seed=1234)
    def pipeline():
        import nvidia.dali.fn as fn
        images = fn.external_source(source=lambda: photos, layout="HWC", batch=True,
                                    device="gpu" if gpu else "cpu")
        ctx = Context.create((SIZE, SIZE), fill)
        ops, applied = [], []
        for _ in range(spec.num_ops):
            layer = draw_layer(ctx, spec, len(names))
            images = apply_layer(images, layer, names, ctx)
            ops.append(layer.op)
            applied.append(layer.applied)
        return (images, *ops, *applied)

    pipe = pipeline()
    pipe.build()
    draws = []
    for _ in range(runs):
        out = [o.as_cpu() if hasattr(o, "as_cpu") else o for o in pipe.run()]
        n = spec.num_ops
        for i in range(len(photos)):
            draws.append((i, [names[int(np.array(o[i]))] for o in out[1:1 + n]],
                          [bool(np.array(a[i])) for a in out[1 + n:]], np.array(out[0][i])))
    return draws


class _Recorder:
    """A timm AugmentOp that logs (name, applied); timm returns the input itself when it skips."""

    def __init__(self, op, log: list):
        self.op, self.log = op, log

    def __call__(self, img):
        out = self.op(img)
        self.log.append((self.op.name, out is not img))
        return out


def timm_rand_augment(photos, spec_str: str, fill=(0, 0, 0), runs: int = RUNS):
    """timm, as the torch backend builds it (train_transform's hparams, bilinear), same records."""
    from timm.data.auto_augment import rand_augment_transform
    from tresnet_train.data.transforms import _pillow_safe
    ra = _pillow_safe(rand_augment_transform(spec_str, {
        "translate_const": int(SIZE * 0.45), "img_mean": fill, "interpolation": Image.BILINEAR}))
    log: list = []
    ra.ops = [_Recorder(op, log) for op in ra.ops]
    random.seed(1234)
    np.random.seed(1234)
    pil = [Image.fromarray(p) for p in photos]
    draws = []
    for _ in range(runs):
        for i, img in enumerate(pil):
            del log[:]
            out = np.asarray(ra(img))
            draws.append((i, [name for name, _ in log], [applied for _, applied in log], out))
    return draws


def _mad(draws, photos) -> np.ndarray:
    return np.array([np.abs(out.astype(np.float64) - photos[i]).mean() for i, _, _, out in draws])


def _check_per_op(dali, timm, photos, names) -> list[str]:
    """Single-op draws (n1, p1): op frequencies and each op's mean absolute pixel change."""
    failures = []
    for name in names:
        d = [x for x in dali if x[1][0] == name]
        t = [x for x in timm if x[1][0] == name]
        ok, msg = proportions_agree(len(d), len(dali), len(t), len(timm))
        if not ok:
            failures.append(f"{name} frequency {msg}")
        ok, msg = means_agree(_mad(d, photos), _mad(t, photos))
        if not ok:
            failures.append(f"{name} mean |change| {msg}")
    return failures


@needs_dali
@pytest.mark.slow
@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m7-mstd0.5"])
def test_each_op_changes_pixels_as_timm_does(photos, spec):
    """One op per image, always applied: each op's frequency and mean absolute pixel change.
    inc1 (TResNet-M's recipe) and inc0 (ResNet strikes back A1) use different level functions."""
    from tresnet_train.data.dali_augment import parse_randaugment
    single = f"{spec}-n1-p1.0"
    failures = _check_per_op(dali_rand_augment(photos, single), timm_rand_augment(photos, single),
                             photos, parse_randaugment(single).op_names)
    assert not failures, failures


@needs_dali
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_each_op_on_the_gpu_changes_pixels_as_timm_does(photos):
    """The same ops with the pixels on the GPU (the `mixed` training pipeline's placement)."""
    from tresnet_train.data.dali_augment import parse_randaugment
    single = "rand-m9-mstd0.5-inc1-n1-p1.0"
    failures = _check_per_op(dali_rand_augment(photos, single, gpu=True),
                             timm_rand_augment(photos, single), photos,
                             parse_randaugment(single).op_names)
    assert not failures, failures


@needs_dali
@pytest.mark.slow
def test_geometric_ops_fill_with_the_mean_colour_per_channel(photos):
    """ImageNet-mean fill (124, 116, 104) differs per channel: DALI fills one scalar, so the ops
    shift the pixels around the warp; the per-op change must still match timm's."""
    spec = "rand-m9-mstd0.5-n1-p1.0"
    fill = (124, 116, 104)
    dali = dali_rand_augment(photos, spec, fill, runs=40)
    timm = timm_rand_augment(photos, spec, fill, runs=40)
    corner = [out[0, 0] for _, names, _, out in dali if names[0] == "TranslateXRel"]
    assert any(tuple(c) == fill for c in corner)  # a shifted-in corner holds the fill exactly
    failures = _check_per_op(dali, timm, photos, ("Rotate", "ShearX", "ShearY", "TranslateXRel",
                                                  "TranslateYRel"))
    assert not failures, failures


@needs_dali
@pytest.mark.slow
def test_rand_augment_chooses_applies_and_spares_as_timm_does(photos):
    """The recipe's rand-m9-mstd0.5-inc1: per layer the op frequencies and the applied share
    (timm: 0.5), and the share of images left pixel-identical (about a quarter)."""
    spec = "rand-m9-mstd0.5-inc1"
    dali, timm = dali_rand_augment(photos, spec), timm_rand_augment(photos, spec)
    failures = []
    for layer in range(2):
        for name in {x[1][layer] for x in dali} | {x[1][layer] for x in timm}:
            ok, msg = proportions_agree(sum(x[1][layer] == name for x in dali), len(dali),
                                        sum(x[1][layer] == name for x in timm), len(timm))
            if not ok:
                failures.append(f"layer {layer} {name} frequency {msg}")
        ok, msg = proportions_agree(sum(x[2][layer] for x in dali), len(dali),
                                    sum(x[2][layer] for x in timm), len(timm))
        if not ok:
            failures.append(f"layer {layer} applied share {msg}")

    def untouched(draws):
        return sum(np.array_equal(out, photos[i]) for i, _, _, out in draws)
    ok, msg = proportions_agree(untouched(dali), len(dali), untouched(timm), len(timm))
    if not ok:
        failures.append(f"untouched share {msg}")
    assert 0.2 < untouched(dali) / len(dali) < 0.3  # timm's quarter, give or take no-op draws
    assert not failures, failures


# ---- the whole train loaders: crop, flip, resize filter --------------------------------------------
CODED = 256  # side of the coordinate-coded image
STRIPE = 16  # B channel alternates 64 / 192 every STRIPE columns: edges where filters overshoot


def coded_image() -> Image.Image:
    """R = x, G = y (the crop window can be read back from the output), B = vertical stripes of 64
    and 192 (a bicubic resize overshoots outside [64, 192] at their edges, a bilinear one never)."""
    x, y = np.meshgrid(np.arange(CODED), np.arange(CODED))
    stripes = np.where((x // STRIPE) % 2 == 0, 64, 192)
    return Image.fromarray(np.stack([x, y, stripes], -1).astype(np.uint8))


def loader_draws(tmp_path, backend: str, interpolation: str, epochs: int):
    """Per output image: (crop area fraction, aspect w/h, flipped, bicubic) from the backend's train
    loader on copies of the coded image (PNG: lossless, so the stripes stay sharp)."""
    from tresnet_train.config import Config
    from tresnet_train.data import build_loaders
    from tresnet_train.distributed import World
    root = tmp_path / "coded"
    if not root.exists():
        for split, count in (("train", 128), ("val", 1)):
            (root / split / "c0").mkdir(parents=True)
            coded_image().save(root / split / "c0" / "0.png")
            for k in range(1, count):
                os.link(root / split / "c0" / "0.png", root / split / "c0" / f"{k}.png")
    cfg = Config()
    cfg.data.root, cfg.data.backend, cfg.data.workers = str(root), backend, 0 if backend == "torch" else 2
    cfg.data.img_size, cfg.data.batch_size, cfg.data.train_interpolation = 96, 64, interpolation
    data_config = {"input_size": (3, 96, 96), "crop_pct": 0.875, "interpolation": "bilinear",
                   "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    loader, _ = build_loaders(cfg, data_config, World(), torch.device("cpu"))
    draws = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, _ in loader:
            draws += [_decode(img.numpy() * 255) for img in images]
    return draws


def _decode(img: np.ndarray) -> tuple[float, float, bool, bool]:
    r, g, b = img  # CHW, 0..255
    out = r.shape[1]
    left, right = r[:, 0].mean(), r[:, -1].mean()
    flipped = left > right
    width = abs(right - left) * out / (out - 1)  # output pixel centres span (out - 1) / out of it
    height = (g[-1].mean() - g[0].mean()) * out / (out - 1)
    bicubic = bool(b.min() < 62 or b.max() > 194)  # 1 grey level of rounding either side
    return width * height / CODED ** 2, width / height, bool(flipped), bicubic


@needs_dali
@pytest.mark.slow
def test_train_loaders_crop_flip_and_filter_as_torchvision(tmp_path):
    """RandomResizedCrop's area and aspect histograms, the flip rate and, with `random`, the
    bilinear/bicubic choice per image: DALI's loader against the torch backend's."""
    dali = loader_draws(tmp_path, "dali", "random", epochs=8)
    timm = loader_draws(tmp_path, "torch", "random", epochs=8)
    failures = []
    area_edges = np.linspace(0.0, 1.05, 8)
    aspect_edges = np.exp(np.linspace(np.log(0.7), np.log(1 / 0.7), 8))
    for k, edges in ((0, area_edges), (1, aspect_edges)):
        hd = np.histogram([x[k] for x in dali], edges)[0]
        ht = np.histogram([x[k] for x in timm], edges)[0]
        assert hd.sum() == len(dali) and ht.sum() == len(timm), (hd, ht)  # nothing out of range
        for lo, cd, ct in zip(edges, hd, ht):
            ok, msg = proportions_agree(cd, len(dali), ct, len(timm))
            if not ok:
                failures.append(f"{'area' if k == 0 else 'aspect'} bin from {lo:.2f}: {msg}")
    for k, what in ((2, "flip"), (3, "bicubic")):
        ok, msg = proportions_agree(sum(x[k] for x in dali), len(dali), sum(x[k] for x in timm),
                                    len(timm))
        if not ok:
            failures.append(f"{what} share {msg}")
    assert not failures, failures
    for backend, fixed, expected in (("dali", "bilinear", 0.0), ("torch", "bilinear", 0.0),
                                     ("dali", "bicubic", 1.0), ("torch", "bicubic", 1.0)):
        draws = loader_draws(tmp_path, backend, fixed, epochs=1)
        assert np.mean([x[3] for x in draws]) == pytest.approx(expected, abs=0.05), (backend, fixed)


# ---- on the batch, after either loader -------------------------------------------------------------
def test_random_erasing_and_cutmix_rates_on_the_batch():
    """Backend-free (losses.BatchAugment): erasing hits data.random_erasing of the images, and timm's
    Mixup picks cutmix for half the batches when both mixup and cutmix are on."""
    from tresnet_train.config import Config
    from tresnet_train.losses import build_batch_augment
    torch.manual_seed(0)
    np.random.seed(0)
    cfg = Config()
    cfg.data.random_erasing = 0.25
    erase = build_batch_augment(cfg, 10, torch.device("cpu"))
    images = torch.zeros(4000, 3, 8, 8)
    erased = int((erase(images.clone(), torch.zeros(4000, dtype=torch.long))[0] != 0)
                 .flatten(1).any(1).sum())
    se = np.sqrt(0.25 * 0.75 / 4000)
    assert abs(erased / 4000 - 0.25) <= Z * se, erased

    cfg = Config()
    cfg.data.mixup, cfg.data.cutmix = 0.2, 1.0
    mix = build_batch_augment(cfg, 10, torch.device("cpu"))
    batch = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])
    cut = 0
    for _ in range(400):
        out, _ = mix(batch.clone(), torch.tensor([0, 1]))
        cut += bool(((out == 0) | (out == 1)).all())  # cutmix pastes; mixup blends every pixel
    se = np.sqrt(0.5 * 0.5 / 400)
    assert abs(cut / 400 - 0.5) <= Z * se, cut
