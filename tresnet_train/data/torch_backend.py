"""The torch backend: torchvision transforms in DataLoader workers, pinned memory, a device prefetcher.

Exact resume: each sample's augmentation is seeded from (seed, epoch, global position) inside
`__getitem__` (torch, numpy and `random`, which timm's RandAugment uses), so the pixels do not depend
on which worker decoded the sample or where the run was resumed; in the main process (workers=0)
the global RNG states are restored afterwards. A file that fails to read or decode despite the
indexing check (deleted mid-run, say) is replaced by the next sample, reported once, listed in
`skipped` and counted against data.max_bad_fraction (bad_files.py); with data.strict=true it is a
DataError instead.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .bad_files import BadFiles
from .folder import DataError, Split
from .plan import ResumableTrainLoader, TrainPlan, ValPlan
from .transforms import Normalize, Preprocess, eval_transform, load_rgb, train_transform

log = logging.getLogger(__name__)

_MAX_TRIES = 10  # consecutive undecodable files before giving up on a sample


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU generator, numpy and `random` for one sample.

    In the main process (workers=0) their states are restored afterwards. A loader worker's global
    streams serve nothing but its samples, so it skips the save and restore: numpy's alone takes
    about 170 us a sample (timeit, 2-core CPU), some 4% of decoding and cropping a 320 px JPEG.
    """
    saved = None
    if get_worker_info() is None:
        saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    torch.random.default_generator.manual_seed(seed)  # CPU only: CUDA generators are left alone
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.set_rng_state(saved[2])


class ImageDataset(Dataset):
    """Decodes `samples[i]`; the key is (index, seed or -1 for none, is_padding)."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        # numpy arrays, not a list of tuples: forked workers would otherwise copy it page by page
        # as reference counts change (the copy-on-write growth known from ImageNet DataLoaders).
        self.paths = np.array([os.fsencode(p) for p, _ in samples])
        self.targets = np.array([t for _, t in samples], dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index, seed, pad = key
        failures = []
        for attempt in range(_MAX_TRIES):
            i = (index + attempt) % len(self)
            path = os.fsdecode(self.paths[i])
            try:
                img = load_rgb(path)
            except Exception as e:  # noqa: BLE001 - a bad file must not end the run
                failures.append(f"{path}\t{type(e).__name__}: {e}")
                continue
            try:
                with _seeded(seed) if seed >= 0 else contextlib.nullcontext():
                    image = self.transform(img)
            except Exception as e:  # a transform bug, not a bad file: say which image and stop
                raise RuntimeError(f"augmentation failed on {path} ({img.width}x{img.height}): "
                                   f"{type(e).__name__}: {e}") from e
            return image, -1 if pad else int(self.targets[i]), "\n".join(failures)
        raise DataError(f"{_MAX_TRIES} consecutive files failed to decode, starting at "
                        f"{os.fsdecode(self.paths[index])}: {failures[-1]}")


class _TrainKeys:
    """Batch sampler: the keys of this rank's batches of `epoch` from `start` on, computed when the
    DataLoader starts iterating. Holds no reference to the loader (a cycle through the DataLoader
    would leave its worker shutdown to the garbage collector, which stalls on worker joins)."""

    def __init__(self, plan: TrainPlan):
        self.plan, self.epoch, self.start = plan, 0, 0

    def __iter__(self):
        b = self.plan.batch_size
        indices = self.plan.rank_indices(self.epoch)[self.start * b:].tolist()
        seeds = self.plan.rank_seeds(self.epoch)[self.start * b:].tolist()
        keys = [(i, s, False) for i, s in zip(indices, seeds)]
        return iter([keys[k:k + b] for k in range(0, len(keys), b)])


class _DeviceBatches:
    """Moves batches to the device and normalises them; on CUDA the copy of batch i+1 runs on a side
    stream while the model works on batch i (the prefetcher of NVIDIA's and timm's ImageNet loaders)."""

    def __init__(self, device: torch.device, normalize: Normalize, on_failures):
        self.device, self.normalize, self.on_failures = device, normalize, on_failures

    def __call__(self, batches):
        if self.device.type != "cuda":
            for images, targets, failures in batches:
                self.on_failures(failures)
                yield self.normalize(images.to(self.device)), targets.to(self.device)
            return
        stream = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        ready = None
        for images, targets, failures in batches:
            self.on_failures(failures)
            with torch.cuda.stream(stream):
                images = self.normalize(images.to(self.device, non_blocking=True))
                targets = targets.to(self.device, non_blocking=True)
            if ready is not None:
                yield ready
            main.wait_stream(stream)
            images.record_stream(main)
            targets.record_stream(main)
            ready = images, targets
        if ready is not None:
            yield ready


class _FailureLog:
    def __init__(self, strict: bool, bad: BadFiles):
        self.strict, self.bad = strict, bad

    def __call__(self, failures: list[str]) -> None:
        for text in filter(None, "\n".join(failures).split("\n")):
            path, _, why = text.partition("\t")
            if self.strict:
                raise DataError(f"{path} cannot be decoded ({why}); fix or delete it, or set "
                                f"data.strict=false to skip undecodable files")
            self.bad.add(path, why)


def _loader(dataset, batch_keys, workers: int, device: torch.device, persistent: bool) -> DataLoader:
    # Own generator: the DataLoader draws worker base seeds from it, not from the global RNG (the
    # per-sample seeds make those base seeds irrelevant to the pixels anyway).
    return DataLoader(dataset, batch_sampler=batch_keys, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=persistent and workers > 0,
                      prefetch_factor=4 if workers > 0 else None, generator=torch.Generator(),
                      worker_init_fn=_ignore_ctrl_c)


def _ignore_ctrl_c(worker_id: int) -> None:
    """Ctrl-C reaches the workers too (same process group); the main process alone handles it
    (checkpoint, then stop), so a worker must not die of it mid-epoch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TorchTrainLoader(ResumableTrainLoader):
    backend = "torch"

    def __init__(self, split: Split, plan: TrainPlan, pre: Preprocess, device: torch.device,
                 workers: int, strict: bool, max_bad_fraction: float = 1.0):
        super().__init__(plan, split.classes, split.skipped)
        self.samples = split.samples
        self._keys = _TrainKeys(plan)
        self._loader = _loader(ImageDataset(split.samples, train_transform(pre)), self._keys,
                               workers, device, persistent=True)
        self._to_device = _DeviceBatches(device, Normalize(pre, device),
                                         _FailureLog(strict, BadFiles(self.skipped, len(self.samples),
                                                                      max_bad_fraction)))

    def _batches(self, epoch: int, start_step: int):
        self._keys.epoch, self._keys.start = epoch, start_step
        return self._to_device(iter(self._loader))


class TorchValLoader:
    """Every image once across ranks; padding samples carry target -1; same step count everywhere."""

    def __init__(self, split: Split, plan: ValPlan, pre: Preprocess, device: torch.device,
                 workers: int, strict: bool, max_bad_fraction: float = 1.0):
        self.classes, self.skipped, self.plan = split.classes, list(split.skipped), plan
        self.num_images = plan.num_samples
        indices, pad = plan.rank_indices()
        keys = [(int(i), -1, bool(p)) for i, p in zip(indices, pad)]
        batches = [keys[k:k + plan.batch_size] for k in range(0, len(keys), plan.batch_size)]
        self._loader = _loader(ImageDataset(split.samples, eval_transform(pre)),
                               batches, workers, device, persistent=False)
        self._to_device = _DeviceBatches(device, Normalize(pre, device),
                                         _FailureLog(strict, BadFiles(self.skipped, len(split.samples),
                                                                      max_bad_fraction, "validation")))

    def __len__(self) -> int:
        return self.plan.steps

    def __iter__(self):
        return self._to_device(iter(self._loader))
