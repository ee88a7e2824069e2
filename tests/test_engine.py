"""The training step's switches and criteria, each shown to do what it says (CPU):
gradient accumulation equals the big batch, clipping bounds the norm (fp16-scaled gradients
unscaled first), autocast dtypes, the losses and batch augmentations, and a train.py run with every
speed switch on (channels_last, torch.compile, bf16, accumulation, clipping)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy

from trainer_helpers import load, tiny_overrides, train
from tresnet_train.config import load_config
from tresnet_train.data.plan import Stream, rng
from tresnet_train.engine import NoEMA, StepParts, grouped, seed_step, train_step
from tresnet_train.losses import CrossEntropy, build_batch_augment, build_criterion
from tresnet_train.precision import GradClipper, Precision


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def run_steps(model: nn.Module, batches: list, accum_steps: int, precision: Precision,
              clipper: GradClipper = GradClipper(0.0)) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    parts = StepParts(model=model, train_model=model, optimizer=optimizer, schedule=lambda step: 0.1,
                      criterion=CrossEntropy(0.0), batch_augment=lambda x, y: (x, y),
                      precision=precision, clipper=clipper, ema=NoEMA(), seed=0, rank=0)
    return [train_step(parts, micro_batches, step).item()
            for step, micro_batches in enumerate(grouped(batches, accum_steps))]


def test_accumulating_two_half_batches_equals_one_full_batch():
    torch.manual_seed(1)
    images, targets = torch.randn(4, 8, 3, 8, 8), torch.randint(0, 5, (4, 8))
    full = small_model()
    run_steps(full, [(images[i], targets[i]) for i in range(4)], 1, Precision("none", torch.device("cpu")))
    halves = [(half_x, half_y) for i in range(4)
              for half_x, half_y in zip(images[i].chunk(2), targets[i].chunk(2))]
    accumulated = small_model()
    run_steps(accumulated, halves, 2, Precision("none", torch.device("cpu")))
    for a, b in zip(full.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and not a no-op: one half batch alone gives other weights
    half_only = small_model()
    run_steps(half_only, halves[::2], 1, Precision("none", torch.device("cpu")))
    assert not torch.allclose(next(full.parameters()), next(half_only.parameters()), atol=1e-6)


def test_seed_step_draws_what_torch_manual_seed_drew():
    """The per-step reseed gives torch, numpy and `random` the streams `torch.manual_seed` and the
    step's seeds give them, so runs (and checkpoints) from before and after it draw the same."""
    torch_seed, other_seed = rng(Stream.STEP, 3, 1, 7).integers(2**32, size=2)
    torch.manual_seed(int(torch_seed))
    np.random.seed(int(other_seed))
    random.seed(int(other_seed))
    expected = torch.rand(3), np.random.rand(3), random.random()
    seed_step(3, 1, 7)
    drawn = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(drawn[0], expected[0])
    assert np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_clipping_bounds_the_true_gradient_norm(amp):
    model = small_model()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    precision = Precision(amp, torch.device("cpu"))
    scale = 1.0
    if amp == "fp16":  # gradients as the scaler leaves them after backward: multiplied by its scale
        precision.scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
        scale = precision.scaler.get_scale()
        for p in model.parameters():
            p.grad.mul_(scale)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    GradClipper(0.0)(model, optimizer, precision.scaler)  # off: untouched
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])) > 10 * scale
    GradClipper(1.0)(model, optimizer, precision.scaler)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm == pytest.approx(1.0, rel=1e-4)


def test_precision_autocasts_to_the_configured_dtype():
    x, layer = torch.randn(2, 4), nn.Linear(4, 3)
    cpu = torch.device("cpu")
    with Precision("none", cpu).autocast():
        assert layer(x).dtype == torch.float32
    with Precision("bf16", cpu).autocast():
        assert layer(x).dtype == torch.bfloat16
    assert Precision("auto", cpu).amp == "none"  # CPUs: fp32 (bf16 autocast is slower there)
    assert Precision("fp16", cpu).scaler.is_enabled() and not Precision("bf16", cpu).scaler.is_enabled()


def test_label_smoothing_and_soft_targets():
    logits, target = torch.randn(6, 10), torch.randint(0, 10, (6,))
    smoothed = CrossEntropy(0.1)(logits, target)
    soft = torch.full((6, 10), 0.01).scatter(1, target[:, None], 0.91)
    torch.testing.assert_close(smoothed, -(soft * logits.log_softmax(1)).sum(1).mean())
    torch.testing.assert_close(CrossEntropy(0.1)(logits, soft), smoothed)  # dense targets: soft CE


def test_mixup_cutmix_give_soft_targets_and_erasing_changes_pixels():
    cfg = load_config(None, ["data.root=/d", "data.mixup=0.8", "data.cutmix=1.0", "data.random_erasing=1.0",
                             "train.label_smoothing=0.1"])
    augment = build_batch_augment(cfg, num_classes=10, device=torch.device("cpu"))
    torch.manual_seed(0)
    images, targets = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    mixed, soft = augment(images.clone(), targets)
    assert soft.shape == (8, 10)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    assert (soft.max(1).values < 0.95).all()  # smoothed and mixed, never one-hot
    assert not torch.equal(mixed, images)
    off = build_batch_augment(load_config(None, ["data.root=/d"]), 10, torch.device("cpu"))
    same, hard = off(images, targets)
    assert same is images and hard is targets


def test_bce_with_target_threshold_is_timms():
    cfg = load_config(None, ["data.root=/d", "train.loss=bce", "train.bce_target_thresh=0.2",
                             "train.label_smoothing=0.1"])
    criterion = build_criterion(cfg)
    logits, target = torch.randn(6, 10), torch.randint(0, 10, (6,))
    expected = BinaryCrossEntropy(smoothing=0.1, target_threshold=0.2)(logits, target)
    torch.testing.assert_close(criterion(logits, target), expected)
    hard = F.one_hot(target, 10).float()  # threshold 0.2 turns the smoothed targets back to 0/1
    torch.testing.assert_close(expected, F.binary_cross_entropy_with_logits(logits, hard))


@pytest.mark.slow
def test_train_py_with_every_speed_switch_on(tmp_path, digits):
    """channels_last + torch.compile + bf16 autocast + accumulation + clipping: trains, finite loss."""
    out = tmp_path / "run"
    proc = train(tiny_overrides(out, digits, **{
        "model.channels_last": "true", "model.compile": "true", "train.amp": "bf16",
        "optim.accum_steps": 2, "optim.clip_grad": 1.0, "data.batch_size": 8,
        "train.epochs": 1, "train.steps_per_epoch": 6}), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = load(out / "last.pth")
    assert state["config"]["model"]["compile"] and state["config"]["optim"]["accum_steps"] == 2
    assert not any(k.startswith("_orig_mod") for k in state["model"])  # the bare model is saved
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if r["kind"] == "train"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert "global batch 16" in proc.stdout  # 8 per step x 2 accumulated


def test_pca_lighting_is_alexnets_offset_before_normalisation():
    """On a normalised batch, PcaLighting equals Gluon's RandomLighting (offset eigvec @ (alpha *
    eigval) on the [0, 1] image) followed by the normalisation."""
    from tresnet_train.losses import PcaLighting
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    cfg = load_config(None, ["data.root=/d", "data.pca_lighting=0.1"])
    augment = build_batch_augment(cfg, 10, torch.device("cpu"), norm_std=tuple(std.tolist()))
    images = torch.rand(4, 3, 8, 8, dtype=torch.float64).float()
    normalised = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.manual_seed(5)
    lit, _ = augment(normalised.clone(), torch.zeros(4, dtype=torch.long))
    torch.manual_seed(5)
    alpha = (torch.randn(4, 3) * 0.1).numpy()
    eigvec, eigval = np.array(PcaLighting.EIGVEC), np.array(PcaLighting.EIGVAL)
    offsets = torch.tensor(np.stack([np.dot(eigvec * a, eigval) for a in alpha]), dtype=torch.float32)
    want = (images + offsets.view(4, 3, 1, 1) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(lit, want, rtol=0, atol=1e-5)
    assert offsets.abs().min() > 0 and len({tuple(o.tolist()) for o in offsets}) == 4
