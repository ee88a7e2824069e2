"""Checkpoints: written atomically, read with `torch.load(weights_only=True)` only.

A checkpoint is a plain dict of tensors and plain data (no pickled objects), so loading it never runs
code from the file. Writes go to a temporary file in the same folder, are flushed to disk, and are
then renamed over the target: a crash or a full disk mid-write leaves the previous file intact.

Files in a run folder: `last.pth` (every epoch end and every `run.ckpt_every_steps`), `best.pth` (best
validation top-1 of the model or its EMA), and `top/epoch_XXXX.pth` for the `run.keep_top_k` best epochs.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

LAST, BEST, TOP_DIR = "last.pth", "best.pth", "top"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and what to do."""


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise CheckpointError(f"disk full while writing checkpoint {path}; the previous "
                                  f"checkpoint there is intact. Free space in {path.parent} and "
                                  f"resume with run.resume=auto") from e
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write checkpoint {path}: {e}; the previous "
                                  f"checkpoint there is intact") from e
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; anything else in the file is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it is not a weights-only file (it holds "
                              f"objects other than tensors and plain data, so it may run code when "
                              f"unpickled; weights_only=True rejected it: "
                              f"{str(e).splitlines()[0]}). Only load checkpoints you trust, "
                              f"converted to plain state dicts.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({e})") from None


def is_readable(path: Path) -> bool:
    try:
        ckpt = load(path)
    except CheckpointError as e:
        log.warning("skipping checkpoint: %s", e)
        return False
    return isinstance(ckpt, dict) and "model" in ckpt and "global_step" in ckpt


def find_resume(output_dir: str | Path) -> Path | None:
    """The newest readable training checkpoint in a run folder, or None for a fresh run."""
    folder = Path(output_dir)
    candidates = [folder / LAST, folder / BEST, *(folder / TOP_DIR).glob("*.pth")]
    candidates = sorted((p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime,
                        reverse=True)
    return next((p for p in candidates if is_readable(p)), None)


class TopK:
    """The k best epochs by validation top-1, each kept as `top/epoch_XXXX.pth`."""

    def __init__(self, folder: str | Path, k: int, entries: list | None = None):
        self.folder = Path(folder) / TOP_DIR
        self.k = k
        self.entries: list[list] = [list(e) for e in entries or []]  # [top1, epoch], best first

    def offer(self, top1: float, epoch: int, state: dict) -> None:
        if self.k == 0:
            return
        ranked = sorted(self.entries + [[top1, epoch]], key=lambda e: (-e[0], e[1]))
        if [top1, epoch] not in ranked[: self.k]:
            return
        save_atomic(state, self.folder / f"epoch_{epoch:04d}.pth")
        for _, old in ranked[self.k:]:
            (self.folder / f"epoch_{old:04d}.pth").unlink(missing_ok=True)
        self.entries = ranked[: self.k]
