"""The training step and the evaluation loop.

`train_one_epoch` is the whole hot loop: reseed, set lr, forward under autocast, loss, backward through
the scaler, clip, optimizer step, EMA update, then `on_step` (meters, logging, signals, checkpoints,
owned by the trainer). Optional features are objects that may be no-ops (see precision.py, losses.py).
"""
from __future__ import annotations

import contextlib
import itertools
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from .distributed import all_reduce_sum
from .losses import BatchAugment, eval_loss
from .optim import set_lr
from .precision import GradClipper, Precision


class NoEMA:
    """Stands in for timm's ModelEmaV3 when train.ema is off."""

    module = None

    def update(self, model, step=None) -> None:
        pass


@dataclass
class StepParts:
    """What one optimizer step touches."""

    model: nn.Module  # the bare model (EMA source, gradient clipping)
    train_model: nn.Module  # the model as called: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    schedule: Callable[[int], float]  # global step -> lr
    criterion: nn.Module
    batch_augment: BatchAugment
    precision: Precision
    clipper: GradClipper
    ema: object  # timm ModelEmaV3 or NoEMA
    accum_steps: int
    seed: int
    rank: int


def seed_step(seed: int, rank: int, step: int) -> None:
    """Derive every global random stream from (seed, rank, step): resuming at a step needs no RNG state."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[1]))


def _grouped(loader: Iterable, n: int) -> Iterator[list]:
    it = iter(loader)
    while group := list(itertools.islice(it, n)):
        yield group


def train_one_epoch(p: StepParts, loader: Iterable, epoch: int, steps: int, start_step: int,
                    on_step: Callable[..., bool]) -> None:
    """Run optimizer steps `start_step..steps-1` of `epoch`; the loader is already positioned.

    `on_step` returns True to end the epoch early (a stop signal was handled).
    """
    p.model.train()
    no_sync = getattr(p.train_model, "no_sync", contextlib.nullcontext)  # DDP: sync on the last micro-batch
    for step, micro_batches in zip(range(start_step, steps), _grouped(loader, p.accum_steps)):
        global_step = epoch * steps + step
        seed_step(p.seed, p.rank, global_step)
        lr = set_lr(p.optimizer, p.schedule(global_step))
        step_loss = 0.0  # mean over the micro-batches, stays on the device
        for i, (images, targets) in enumerate(micro_batches):
            images, targets = p.batch_augment(images, targets)
            with (no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext()):
                with p.precision.autocast():
                    loss = p.criterion(p.train_model(images), targets) / len(micro_batches)
                p.precision.scaler.scale(loss).backward()
            step_loss = step_loss + loss.detach()
        p.clipper(p.model, p.optimizer, p.precision.scaler)
        p.precision.scaler.step(p.optimizer)
        p.precision.scaler.update()
        p.optimizer.zero_grad(set_to_none=True)
        p.ema.update(p.model, step=global_step)
        if on_step(step=step, global_step=global_step, loss=step_loss, lr=lr,
                   images=images.shape[0] * len(micro_batches)):
            return


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, precision: Precision, device: torch.device,
             on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> dict:
    """top-1/top-5 (%) and mean loss over every real image; padding samples (target -1) are ignored.

    Sums are reduced across ranks, so with any world size each image counts exactly once.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    for images, targets in loader:
        with precision.autocast():
            logits = model(images)
        real = targets >= 0
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [N, 5]
        hits = (top5 == targets[:, None]) & real[:, None]
        sums += torch.stack([eval_loss(logits, targets).double(), hits[:, 0].sum().double(),
                             hits.any(dim=1).sum().double(), real.sum().double()])
        if on_batch is not None:
            on_batch(logits.float(), targets)
    loss, top1, top5_hits, n = all_reduce_sum(sums).tolist()  # the one host sync of the loop
    n = max(n, 1.0)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5_hits / n, "loss": loss / n,
            "num_images": int(n)}
