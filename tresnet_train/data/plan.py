"""Which samples each rank reads at each step, and the resumable train-loader protocol.

Both backends read the same plan, so they see the same images in the same order; only the
augmentation randomness differs. The train order of an epoch is a permutation drawn from
(seed, epoch), optionally with DeiT's repeated augmentation (each image `repeats` times in a row,
so its copies land on different ranks), truncated to `steps * batch_size * world_size` samples and
dealt round-robin by *global* rank: every rank runs the same number of steps and the images left
over differ from epoch to epoch. Validation deals all images round-robin and pads each rank to the
same length with samples whose target is -1, which the evaluator ignores: each image counts once.

Exact resume, one mechanism per kind of randomness, each a pure function of where the run is (so a
checkpoint needs no RNG state, and holds none):
- the sample order: a permutation drawn from (seed, epoch);
- torch, numpy and `random` in the training process (mixup/cutmix, dropout, drop path): reseeded
  from (seed, rank, global step) before every optimizer step (`engine.seed_step`);
- the torch loader's augmentation: each sample seeded from (seed, epoch, its global position)
  (`TrainPlan.rank_seeds`), whichever worker decodes it;
- DALI: its operators keep their own random state and its pipeline reads batches ahead, so a seed
  alone cannot restart an epoch mid-way; the loader's state carries DALI's pipeline checkpoint
  (dali_backend.py). Each epoch's pipeline is seeded from (seed, epoch, rank).
Every stream is keyed by a `Stream` tag first, so no two share numbers.
"""
from __future__ import annotations

import enum
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger(__name__)

class Stream(enum.IntEnum):
    """The first word of every random stream's key, so that no two streams share numbers."""

    ORDER = 1  # the epoch's sample order: (seed, epoch)
    SAMPLE = 2  # per-sample augmentation seeds of the torch loader: (seed, epoch) + position
    STEP = 3  # torch, numpy and `random`, reseeded before every optimizer step: (seed, rank, step)
    DALI = 4  # a DALI train pipeline: (seed, epoch, rank, first step it reads)
    SYNTHETIC = 5  # the fixed batches of data.source=synthetic


def rng(stream: Stream, *key: int) -> np.random.Generator:
    """numpy's PCG64 seeded through SeedSequence from (stream, *key): distinct keys give
    independent streams. Negative integers are taken modulo 2**64."""
    return np.random.default_rng([int(stream), *(int(k) % 2**64 for k in key)])


def seed_of(stream: Stream, *key: int) -> int:
    """One 31-bit seed from (stream, *key), small enough for every seeding API (numpy's, DALI's)."""
    return int(rng(stream, *key).integers(2**31))


@dataclass(frozen=True)
class TrainPlan:
    num_samples: int  # decodable training images
    batch_size: int  # per process
    world_size: int
    rank: int  # global rank
    seed: int  # cfg.run.seed
    repeats: int = 1  # repeated augmentation (DeiT); 1 = off

    @property
    def steps(self) -> int:
        """Batches per epoch, identical on every rank (the remainder is left out)."""
        return (self.num_samples // self.world_size) // self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices of the whole epoch in global position order (all ranks)."""
        order = rng(Stream.ORDER, self.seed, epoch).permutation(self.num_samples)
        if self.repeats > 1:
            order = np.repeat(order, self.repeats)
        return order[: self.steps * self.batch_size * self.world_size]

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for the epoch, `steps * batch_size` of them, in step order."""
        return self.epoch_order(epoch)[self.rank:: self.world_size]

    def rank_seeds(self, epoch: int) -> np.ndarray:
        """Per-sample augmentation seeds (32-bit): the epoch's global positions take consecutive
        draws of one stream keyed by (seed, epoch), so a sample's seed depends on its position
        alone, not on workers, prefetching, the rank or where a run was resumed."""
        total = self.steps * self.batch_size * self.world_size
        seeds = rng(Stream.SAMPLE, self.seed, epoch).integers(2**32, size=total, dtype=np.uint32)
        return seeds[self.rank:: self.world_size].astype(np.int64)

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "rank"}


@dataclass(frozen=True)
class ValPlan:
    num_samples: int
    batch_size: int
    world_size: int
    rank: int

    @property
    def per_rank(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    @property
    def steps(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def rank_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices, is_padding): round-robin by global rank, padded to `per_rank`."""
        idx = np.arange(self.rank, self.num_samples, self.world_size)
        pad = self.per_rank - len(idx)
        indices = np.concatenate([idx, np.zeros(pad, dtype=idx.dtype)])
        return indices, np.arange(self.per_rank) >= len(idx)


class ResumableTrainLoader:
    """The train-loader protocol both backends share.

    `set_epoch(epoch, start_step)` positions the next `iter()`; iterating yields the epoch's batches
    from there. After the last batch the loader moves itself to the next epoch. `state_dict()` is
    the position of the next batch as plain data (plus the backend's own extras), safe for
    `torch.load(weights_only=True)`; `load_state_dict()` restores it.
    """

    backend = "base"

    def __init__(self, plan: TrainPlan, classes: list[str], skipped: list[str]):
        self.plan = plan
        self.classes = list(classes)
        self.skipped = list(skipped)  # paths of undecodable files left out (train split)
        self.epoch = 0
        self.next_step = 0

    def __len__(self) -> int:
        return self.plan.steps

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step {start_step} is outside epoch of {len(self)} steps")
        self.epoch, self.next_step = int(epoch), int(start_step)

    def __iter__(self):
        epoch, start = self.epoch, self.next_step
        step = start
        for step, batch in enumerate(self._batches(epoch, start), start):
            if step + 1 >= len(self):
                self.epoch, self.next_step = epoch + 1, 0
            else:
                self.next_step = step + 1
            yield batch

    def _batches(self, epoch: int, start_step: int):
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"backend": self.backend, "epoch": self.epoch, "step": self.next_step,
                "plan": self.plan.identity()}

    def load_state_dict(self, state: dict) -> None:
        epoch, step = int(state["epoch"]), int(state["step"])
        saved = state.get("plan", {})
        if saved != self.plan.identity() and step > 0:
            # Same point of the epoch, to the nearest batch, but not the same batches.
            seen = step * saved.get("batch_size", self.batch_size) * saved.get("world_size", 1)
            new_step = min(seen // (self.batch_size * self.plan.world_size), len(self))
            log.warning("loader state was saved with %s, this run has %s: resuming epoch %d at step "
                        "%d of %d with a new data order (not bit-exact)", saved,
                        self.plan.identity(), epoch + 1, new_step, len(self))
            step = new_step
        self.set_epoch(epoch, step)
