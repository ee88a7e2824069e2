"""A run's checkpoint files: written atomically, read with `torch.load(weights_only=True)` only.

(Model weights from other sources, timm and the official TResNet files: models/weights.py.)

A checkpoint is a plain dict of tensors and plain data (no pickled objects), so loading it never runs
code from the file. Writes go to a temporary file in the same folder, are flushed to disk, and are
then renamed over the target: a crash or a full disk mid-write leaves the previous file intact.

Files in a run folder: `last.pth` (every epoch end and every `run.ckpt_every_steps`), `best.pth` (best
validation top-1 of the model or its EMA), and `top/epoch_XXXX.pth` for the `run.keep_top_k` best epochs.
An epoch end writes its state once, as `last.pth`; `best.pth` and the top-k file are hard links to it
(timm's CheckpointSaver habit): a 0.4-0.9 GB write, not three.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

LAST, BEST, TOP_DIR = "last.pth", "best.pth", "top"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and what to do."""


class CheckpointWriteError(CheckpointError):
    """A write failed mid-run (disk full, quota, read-only): the previous file is intact (exit 1)."""


_DISK_ERRORS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename over `path`."""
    _write_atomic(Path(path), lambda f: torch.save(obj, f), tensor_bytes(obj))


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a nested dict/list: about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class _Sink:
    """The file torch.save writes to, keeping the OSError of a failed write: torch's zip writer
    swallows it and raises `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_atomic(path: Path, write, size: int) -> None:
    """`write(f)` (about `size` bytes) into a temp file beside `path`, fsync, then rename over
    `path`. A failure leaves no temp file; a disk error becomes one CheckpointWriteError line."""
    tmp, sink = None, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f)
            write(sink)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = (sink.error if sink is not None else None) or e
        if not isinstance(cause, OSError):
            raise
        raise CheckpointWriteError(write_failure(path, size, cause)) from None
    _fsync_dir(path.parent)


def write_failure(path: Path, size: int, error: OSError) -> str:
    """One line: what failed, where, the bytes attempted and free, that nothing was lost."""
    reason = _DISK_ERRORS.get(error.errno, error.strerror or str(error))
    try:
        free = f"{shutil.disk_usage(path.parent).free:,}"
    except OSError:
        free = "unknown"
    return (f"{reason} while writing checkpoint {path}: {size:,} bytes attempted, {free} bytes "
            f"free in {path.parent}; the previous checkpoint there is intact and no temporary file "
            f"is left. Free space (or fix the quota or permissions) and resume with "
            f"run.resume=auto")


def check_room(folder: Path, size: int, keep_top_k: int) -> tuple[bool, str] | None:
    """(certain, one line with the numbers) when `folder` lacks room for a run's checkpoints of
    `size` bytes each, else None.

    At most max(k, 1) + 2 exist at once: the top-k files (best.pth is one of them, or beside
    last.pth when k = 0), last.pth, and the next one being written. Checkpoints already there (a
    resumed run) are replaced in time, so their bytes count as room; which of them go first is not
    known, so a shortfall is then uncertain (a warning rather than an error).
    """
    files = max(keep_top_k, 1) + 2
    need = files * size
    free = shutil.disk_usage(folder).free
    inodes = {p.stat().st_ino: p.stat().st_size
              for p in [*folder.glob("*.pth"), *(folder / TOP_DIR).glob("*.pth")]}
    held = sum(inodes.values())
    if free + held >= need:
        return None
    have = f"{free:,} bytes free" + (f" (+{held:,} in checkpoints already there)" if held else "")
    return held == 0, (f"run.output_dir {folder} has {have} but this run's checkpoints need about "
                       f"{need:,} bytes ({files} files of {size:,}: last, best and top-{keep_top_k}, "
                       f"plus one being written); free space, lower run.keep_top_k or choose "
                       f"another run.output_dir")


def check_writable(folder: Path) -> str | None:
    """Why `folder` cannot take files (None when a probe file was written, synced and removed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        return f"run.output_dir {folder} is not writable ({e.strerror}); fix it or choose another"
    return None


def link_atomic(src: str | Path, dst: str | Path) -> None:
    """Make `dst` a hard link to the checkpoint `src`, so one write serves last, best and top-k.

    The link is made under a temp name and renamed over `dst`: `dst` is always a whole file, old or
    new. `save_atomic` later renames a new file over `src`, which leaves `dst` on the old contents.
    Where the file system refuses hard links (some network and FUSE mounts), `src` is copied instead,
    atomically and fsynced, keeping its mtime so that `find_resume` still sees the two as a tie.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as e:
        _warn_copying(dst.parent, e.strerror)
        _copy_atomic(src, dst)
        return
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


@functools.cache
def _warn_copying(folder: Path, reason: str) -> None:
    log.warning("no hard links in %s (%s): checkpoints there are copies, using more disk", folder,
                reason)


def _copy_atomic(src: Path, dst: Path) -> None:
    with open(src, "rb") as f:
        _write_atomic(dst, lambda out: shutil.copyfileobj(f, out, 16 << 20),  # 16 MiB chunks
                      src.stat().st_size)
    stat = src.stat()
    os.utime(dst, ns=(stat.st_atime_ns, stat.st_mtime_ns))


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


def load(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; anything else in the file is refused, never run.

    `mmap=True` (zip-format files, as torch.save writes them since 1.6) maps the tensors instead of
    reading them: a check reads only the pickled structure (kilobytes), a resume reads each tensor
    once, when it is copied into the model.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    not_a_checkpoint = _not_a_checkpoint(path)
    if not_a_checkpoint:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {not_a_checkpoint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # torch's own message advises weights_only=False: not repeated
        raise CheckpointError(f"refusing to load {path}: it is not a weights-only file (it holds "
                              f"objects other than tensors and plain data, which could run code "
                              f"when unpickled). Use a checkpoint written by train.py, or convert "
                              f"the file to a plain state dict on a machine where you trust it.") \
            from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'}); use another "
                              f"copy or an earlier checkpoint") from None


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_PROTOCOL = 0x80  # the first byte of a legacy torch.save file (a pickle, protocol >= 2)


def _not_a_checkpoint(path: Path) -> str | None:
    """What the file is instead, when its first bytes say it cannot be a torch.save file."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "it is empty (0 bytes); an interrupted copy?"
    if head.startswith(_ZIP_MAGIC) or head[0] == _PICKLE_PROTOCOL:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with the bytes {head[:8]!r}, neither a zip nor a pickle"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"it is a text file (starts with {first!r})"


def is_readable(path: Path) -> bool:
    """A whole training checkpoint? Cheap: the tensors are mapped, not read."""
    try:
        ckpt = load(path, mmap=True)
    except CheckpointError as e:
        log.warning("skipping checkpoint: %s", e)
        return False
    return isinstance(ckpt, dict) and "model" in ckpt and "global_step" in ckpt


def find_resume(output_dir: str | Path) -> Path | None:
    """The newest readable training checkpoint in a run folder, or None for a fresh run.

    Newest by mtime. Hard links to one write share it, and the sort is stable, so on a tie
    `last.pth` (listed first) wins over `best.pth` and the top-k files.
    """
    folder = Path(output_dir)
    candidates = [folder / LAST, folder / BEST, *sorted((folder / TOP_DIR).glob("*.pth"))]
    candidates = sorted((p for p in candidates if p.is_file()), key=lambda p: -p.stat().st_mtime_ns)
    return next((p for p in candidates if is_readable(p)), None)


class TopK:
    """The k best epochs by validation top-1, each kept as `top/epoch_XXXX.pth`."""

    def __init__(self, folder: str | Path, k: int, entries: list | None = None):
        self.folder = Path(folder) / TOP_DIR
        self.k = k
        self.entries: list[list] = [list(e) for e in entries or []]  # [top1, epoch], best first

    def admit(self, top1: float, epoch: int) -> bool:
        """Rank `epoch` (before its checkpoint is written, which records the ranking); True when it
        made the top k, and its file is then due from `keep`."""
        if self.k == 0:
            return False
        self.entries = sorted(self.entries + [[top1, epoch]], key=lambda e: (-e[0], e[1]))[: self.k]
        return [top1, epoch] in self.entries

    def keep(self, epoch: int, written: Path) -> None:
        """Link `top/epoch_XXXX.pth` to the checkpoint just written, then delete every other file
        in top/: those that fell out of the top k, and any a crash left behind."""
        link_atomic(written, self.path(epoch))
        kept = {self.path(e) for _, e in self.entries}
        for path in self.folder.glob("epoch_*.pth"):
            if path not in kept:
                path.unlink(missing_ok=True)

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch + 1:04d}.pth"  # 1-based, as the logs count epochs
