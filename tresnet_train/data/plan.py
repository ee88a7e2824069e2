"""Which samples each rank reads at each step, and the resumable train-loader protocol.

Both backends read the same plan, so they see the same images in the same order; only the
augmentation randomness differs. The train order of an epoch is a permutation drawn from
(seed, epoch), optionally with DeiT's repeated augmentation (each image `repeats` times in a row,
so its copies land on different ranks), truncated to `steps * batch_size * world_size` samples and
dealt round-robin by *global* rank: every rank runs the same number of steps and the images left
over differ from epoch to epoch. Validation deals all images round-robin and pads each rank to the
same length with samples whose target is -1, which the evaluator ignores: each image counts once.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger(__name__)

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al. 2014): a bijective 64-bit mix, vectorised."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from integers (any sign), e.g. (seed, epoch, rank)."""
    h = np.array([0x9E3779B97F4A7C15], dtype=np.uint64)
    for p in parts:
        with np.errstate(over="ignore"):
            h = _splitmix64(h ^ np.array([int(p) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return int(h[0] & np.uint64(0x7FFFFFFF))


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
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x7E5])
        order = rng.permutation(self.num_samples)
        if self.repeats > 1:
            order = np.repeat(order, self.repeats)
        return order[: self.steps * self.batch_size * self.world_size]

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for the epoch, `steps * batch_size` of them, in step order."""
        return self.epoch_order(epoch)[self.rank:: self.world_size]

    def rank_seeds(self, epoch: int) -> np.ndarray:
        """Per-sample augmentation seeds from (seed, epoch, global position): independent of
        workers, prefetching and where a run was resumed."""
        positions = np.arange(self.rank, self.steps * self.batch_size * self.world_size,
                              self.world_size, dtype=np.uint64)
        base = np.uint64(derive_seed(self.seed, epoch, 0xA06))
        with np.errstate(over="ignore"):
            return (_splitmix64(positions + base * np.uint64(0x100000001B3)) >> np.uint64(33)).astype(
                np.int64)

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
