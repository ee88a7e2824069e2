"""The training step, the meter the epoch loop reads at log points, and the evaluation loop.

`train_step` is one optimizer step and nothing else: reseed, set lr, forward under autocast, loss,
backward through the scaler (DDP syncs on the last micro-batch only), clip, optimizer step, EMA update.
The epoch loop around it (log, checkpoint, stop) is `Trainer.train_epoch`. Optional features are
objects that may be no-ops (see precision.py, losses.py). Which random stream is seeded from what,
and why that makes a resume exact, is told in data/plan.py.
"""
from __future__ import annotations

import contextlib
import itertools
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from .data.plan import Stream, rng
from .distributed import all_reduce_sum, gather_objects
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
    seed: int
    rank: int


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch (CPU and every GPU), numpy and `random` from (seed, rank, step): a run resumed at
    `step` draws what an uninterrupted run draws, with no RNG state saved.

    Not `torch.manual_seed`: for each device type not initialised in this process (CUDA on a CPU
    run; XPU and MTIA everywhere) it queues a lazy seed with a formatted stack trace, about 1 ms a
    step spent on generators the step never draws from.
    """
    seeds = rng(Stream.STEP, seed, rank, step).integers(2**32, size=2)
    torch.random.default_generator.manual_seed(int(seeds[0]))
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(int(seeds[0]))
    np.random.seed(int(seeds[1]))
    random.seed(int(seeds[1]))


def grouped(loader: Iterable, n: int) -> Iterator[list]:
    """The loader's batches in lists of `n` (the micro-batches of one step)."""
    it = iter(loader)
    while group := list(itertools.islice(it, n)):
        yield group


def train_step(p: StepParts, micro_batches: list, global_step: int) -> torch.Tensor:
    """One optimizer step over `micro_batches`; the mean loss, left on the device (no host sync)."""
    seed_step(p.seed, p.rank, global_step)
    set_lr(p.optimizer, p.schedule(global_step))
    no_sync = getattr(p.train_model, "no_sync", contextlib.nullcontext)  # DDP: sync on the last one
    step_loss = 0.0
    for i, (images, targets) in enumerate(micro_batches):
        images, targets = p.batch_augment(images, targets)
        with no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
            with p.precision.autocast():
                loss = p.criterion(p.train_model(images), targets) / len(micro_batches)
            p.precision.scaler.scale(loss).backward()
        step_loss = step_loss + loss.detach()
    p.clipper(p.model, p.optimizer, p.precision.scaler)
    p.precision.scaler.step(p.optimizer)
    p.precision.scaler.update()
    p.optimizer.zero_grad(set_to_none=True)
    p.ema.update(p.model, step=global_step)
    return step_loss


class StepMeter:
    """The loss of the steps since the last log point, summed on the device; read only at log points.

    Adding a step launches device ops only (no host-to-device copy, no sync): the step number of the
    first non-finite loss is kept on the device too, counted up from the one given at `reset`.
    """

    def __init__(self, device: torch.device, global_step: int):
        self.device = device
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.reset(global_step)

    def reset(self, global_step: int) -> None:
        """Start a new log interval whose first step is `global_step`."""
        self.loss_sum = torch.zeros((), device=self.device)
        self.next_step = torch.full((), global_step, dtype=torch.long, device=self.device)
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum = self.loss_sum + loss.float()
        self.bad_step = torch.where(~torch.isfinite(loss) & (self.bad_step < 0), self.next_step,
                                    self.bad_step)
        self.next_step = self.next_step + 1
        self.steps += 1
        self.images += images

    def reduce(self, signalled: bool) -> tuple[float, bool, bool]:
        """(mean loss over ranks and steps, any rank non-finite, any rank signalled): one all-reduce,
        the host sync of a log point."""
        flags = torch.stack([self.loss_sum, (self.bad_step >= 0).float(),
                             torch.tensor(float(signalled), device=self.device)])
        loss_sum, bad, sig = all_reduce_sum(flags).tolist()
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return loss_sum / world / max(self.steps, 1), bad > 0, sig > 0

    def first_bad_step(self) -> int:
        """The earliest global step with a non-finite loss on any rank (collective)."""
        steps = [s for s in gather_objects(int(self.bad_step.item())) if s >= 0]
        return min(steps) if steps else -1

    def images_per_s(self, world_size: int) -> float:
        return self.images * world_size / max(time.perf_counter() - self.t0, 1e-9)


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
