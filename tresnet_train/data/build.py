"""`build_loaders`: the one entry point the trainer calls (source, backend, splits, plans)."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from ..config import BACKENDS, DECODERS
from .dali_backend import (DaliTrainLoader, DaliValLoader, dali_available,
                           describe_preallocation)
from .digits import build_digits
from .folder import DataError, index_split
from .plan import TrainPlan, ValPlan
from .synthetic import SyntheticTrainLoader, SyntheticValLoader
from .torch_backend import TorchTrainLoader, TorchValLoader
from .transforms import Preprocess

log = logging.getLogger(__name__)


def resolve_backend(name: str) -> str:
    """auto -> dali when nvidia-dali is importable, else torch."""
    if name == "auto":
        return "dali" if dali_available() else "torch"
    if name == "dali" and not dali_available():
        raise DataError("data.backend=dali but NVIDIA DALI is not installed: pip install "
                        "'tresnet-train[dali]' (CUDA 12) or '[dali-cu13]', or set data.backend=torch")
    if name not in DECODERS:
        raise DataError(f"data.backend={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def dataset_root(data_cfg) -> Path | None:
    """The ImageFolder root for folder and digits sources (digits is built on first use)."""
    if data_cfg.source == "synthetic":
        return None
    if data_cfg.source == "digits":
        return build_digits(data_cfg.root or None)
    return Path(data_cfg.root).expanduser().absolute()  # DALI file lists need absolute paths


def index_threads(workers: int) -> int:
    """Threads for listing and checking a split's files (I/O bound: more than the loader workers)."""
    return min(32, max(4, 2 * workers))


def build_val_loader(split, data_cfg, pre: Preprocess, backend: str, world, device: torch.device):
    """This rank's val loader for an indexed split: round-robin by global rank, padded (target -1)."""
    val_plan = ValPlan(len(split.samples), data_cfg.val_batch_size or data_cfg.batch_size,
                       world.world_size, world.rank)
    if backend == "dali":
        return DaliValLoader(split, val_plan, pre, device, data_cfg.workers)
    return TorchValLoader(split, val_plan, pre, device, data_cfg.workers, data_cfg.strict,
                          data_cfg.max_bad_fraction)


def _check_randaugment(spec: str) -> None:
    if not spec:
        return
    from timm.data.auto_augment import rand_augment_transform
    try:
        rand_augment_transform(spec, {})
    except Exception as e:  # noqa: BLE001 - timm asserts on malformed specs
        raise DataError(f"data.randaugment={spec!r} is not a valid timm RandAugment spec ({e}); "
                        f"example: rand-m9-mstd0.5-inc1") from None


def loader_workers(requested: int) -> int:
    """`data.workers` capped at the CPUs this process may use (more only add contention)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if requested > cpus:
        log.info("data.workers=%d is more than the %d CPU(s) available: using %d", requested, cpus,
                 cpus)
        return cpus
    return requested


def build_loaders(cfg, data_config: dict, world, device: torch.device):
    """(train_loader, val_loader) for this rank; see tresnet_train/data/__init__.py for the contract."""
    d = dataclasses.replace(cfg.data, workers=loader_workers(cfg.data.workers))
    pre = Preprocess.from_config(d, data_config)
    _check_randaugment(d.randaugment)
    val_batch = d.val_batch_size or d.batch_size
    repeats = max(1, d.repeated_aug)
    if d.source == "synthetic":
        train_plan = TrainPlan(d.synthetic_size, d.batch_size, world.world_size, world.rank,
                               cfg.run.seed)
        val_plan = ValPlan(d.synthetic_size, val_batch, world.world_size, world.rank)
        n = cfg.model.num_classes
        return (SyntheticTrainLoader(train_plan, n, pre, device),
                SyntheticValLoader(val_plan, n, pre, device))

    root = dataset_root(d)
    backend = resolve_backend(d.backend)
    train = index_split(root, "train", strict=d.strict, threads=index_threads(d.workers))
    val = index_split(root, "val", strict=d.strict, threads=index_threads(d.workers))
    train_plan = TrainPlan(len(train.samples), d.batch_size, world.world_size, world.rank,
                           cfg.run.seed, repeats)
    if backend == "dali":
        train_loader = DaliTrainLoader(train, train_plan, pre, device, d.workers,
                                       d.max_bad_fraction)
    else:
        train_loader = TorchTrainLoader(train, train_plan, pre, device, d.workers, d.strict,
                                        d.max_bad_fraction)
    val_loader = build_val_loader(val, d, pre, backend, world, device)
    memory = ""
    if backend == "dali":  # nvJPEG's buffers live outside PyTorch's allocator: say how much
        memory = " | DALI preallocates per rank: " + describe_preallocation(
            train_loader.threads, train_loader.padding, val_loader.padding)
    log.info("data: %s backend on %s | %d classes | train %d images, %d batches of %d per rank x %d "
             "rank(s) | val %d images, %d batches of %d | train crop %d, eval resize %d crop %d "
             "(%s)%s",
             backend, device, len(train.classes), len(train.samples), train_plan.steps, d.batch_size,
             world.world_size, len(val.samples), len(val_loader), val_batch, pre.img_size,
             pre.val_resize, pre.val_img_size, pre.interpolation, memory)
    return train_loader, val_loader
