"""ImageNet-style folders (`root/train/<class>/*.JPEG`, `root/val/<class>/*.JPEG`): listing and checks.

Labels are the indices of the sorted class folder names and files are listed in torchvision's
`ImageFolder` order (`torchvision.datasets.folder.make_dataset`), so both loader backends and any
torchvision-trained checkpoint agree on what label 3 means.

Undecodable files (zero bytes, truncated, not an image, a format the decoders do not read) are found
once at indexing, before training, because DALI's readers cannot skip a file that fails to decode.
The check is cheap for the common case: PIL parses the header (and verifies PNG chunk CRCs); a JPEG
whose data does not end with the EOI marker, and any other format, is decoded in full. The result
is cached per split under the user's cache folder (never inside the dataset, which may be read-only):
every file's relative path, size and modification time, and the reasons for the bad ones. A later
start checks again only the files that are new or changed, and names them. Under `torch.distributed`
each rank reads the sizes of, and checks, a slice of the files and the results are shared, so all
ranks train on the same list and no rank reads every file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger(__name__)

# Formats both backends decode (PIL and DALI's image decoder). MPO is a camera JPEG with extra frames.
DECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "PPM", "WEBP", "TIFF")
_CACHE_VERSION = 2
_STAT_CHUNK = 4096  # files per thread task when reading sizes
_CHECK_CHUNK = 256  # files per thread task when checking headers
_MAX_NAMED = 50  # undecodable files named in the console log; the cache JSON holds the full list


class DataError(ValueError):
    """A dataset problem the user can fix; the message names the path and what to do."""


def cache_dir() -> Path:
    """`$TRESNET_TRAIN_CACHE`, else `~/.cache/tresnet_train` (verification results, the digits demo)."""
    return Path(os.environ.get("TRESNET_TRAIN_CACHE") or Path.home() / ".cache" / "tresnet_train")


def _class_folders(split_dir: Path) -> list[str]:
    # torchvision's find_classes: every sub-directory, sorted by name
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


class Samples(Sequence):
    """One split's (path, label) pairs in ImageFolder order, held compactly.

    The paths relative to the split folder sit in one bytes string (NUL-separated: no file name
    holds a NUL) with their offsets, the labels in an int32 array: about 45 bytes a file, where a
    list of (str, int) tuples takes about 200 (ImageNet: 60 MB against 250 MB on every rank).
    `samples[i]` is `(absolute path, label)`.
    """

    def __init__(self, folder: Path, names: bytes, labels: np.ndarray):
        self.folder, self.names, self.labels = folder, names, labels
        self._prefix = os.path.join(str(folder), "")
        cuts = np.flatnonzero(np.frombuffer(names, dtype=np.uint8) == 0)
        self._starts = np.concatenate([[0], cuts + 1])[:len(labels)]
        self._ends = np.concatenate([cuts, [len(names)]])[:len(labels)]

    def __len__(self) -> int:
        return len(self.labels)

    def relative(self, i: int) -> str:
        return os.fsdecode(self.names[self._starts[i]:self._ends[i]])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._prefix + self.relative(i), int(self.labels[i])

    def __eq__(self, other) -> bool:
        if isinstance(other, Samples):
            return (self.folder, self.names) == (other.folder, other.names) and \
                np.array_equal(self.labels, other.labels)
        return list(self) == list(other)

    def without(self, names: set[str]) -> Samples:
        """These samples less the ones whose relative path is in `names`."""
        parts = self.names.split(b"\0") if len(self) else []
        drop = {os.fsencode(name) for name in names}
        keep = [i for i, rel in enumerate(parts) if rel not in drop]
        return Samples(self.folder, b"\0".join(parts[i] for i in keep), self.labels[keep])

    def encoded_paths(self, start: int = 0, step: int = 1) -> list[bytes]:
        """Every `step`-th absolute path from `start`, as bytes (what os.stat takes, cheaply)."""
        prefix = os.fsencode(self._prefix)
        return [prefix + rel for rel in self.names.split(b"\0")[start::step]] if len(self) else []


def _list_split(split_dir: Path, classes: list[str]) -> Samples:
    """torchvision's `make_dataset` order and extension rule, without a Python object per file."""
    chunks, labels = [], []
    for label, name in enumerate(classes):
        files = []
        for folder, _, fnames in sorted(os.walk(split_dir / name, followlinks=True)):
            sub = os.fsencode(os.path.relpath(folder, split_dir)) + os.sep.encode()
            files += [sub + os.fsencode(f) for f in sorted(fnames) if f.lower().endswith(IMG_EXTENSIONS)]
        if files:
            chunks.append(b"\0".join(files))
            labels.append(np.full(len(files), label, dtype=np.int32))
    return Samples(split_dir, b"\0".join(chunks),
                   np.concatenate(labels) if labels else np.zeros(0, dtype=np.int32))


def _check_root(root: str | Path) -> tuple[Path, list[str]]:
    """The class list of `root`, after the structural checks; raises DataError."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist (set data.root to a folder holding "
                        f"train/ and val/ class folders)")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root / split} is missing: data.root must hold train/ and val/, each "
                            f"with one sub-folder per class (ImageNet layout)")
    classes = _class_folders(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders: put each class's images in "
                        f"{root / 'train'}/<class_name>/")
    val_classes = _class_folders(root / "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise DataError(f"class folders differ between {root / 'train'} and {root / 'val'}: "
                        f"only in train: {_names(only_train)}; only in val: {_names(only_val)}. "
                        f"Both splits need the same class folders (ImageNet val must be sorted into "
                        f"class folders first)")
    return root, classes


def _names(items: list[str], limit: int = 10) -> str:
    if not items:
        return "none"
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _require_nonempty(split_dir: Path, classes: list[str], samples: Samples,
                      what: str = "images") -> None:
    counts = np.bincount(samples.labels, minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise DataError(f"{split_dir}: {len(empty)} class folder(s) hold no {what} "
                        f"({', '.join(IMG_EXTENSIONS)}): {_names([str(split_dir / c) for c in empty])}. "
                        f"Add images or remove the folder from both train/ and val/")


def scan_image_folder(root: str | Path) -> tuple[list[str], int, int]:
    """(classes, number of train files, number of val files): structure checks only, no decoding."""
    root, classes = _check_root(root)
    counts = []
    for split in ("train", "val"):
        samples = _list_split(root / split, classes)
        _require_nonempty(root / split, classes, samples)
        counts.append(len(samples))
    return classes, counts[0], counts[1]


# ---- undecodable-file detection --------------------------------------------------------------------
def check_image(path: str) -> str | None:
    """None when the file decodes, else a short reason. Cheap unless the file looks damaged."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with Image.open(path) as im:  # parses the header; raises on non-images and decompression bombs
            fmt = im.format
            im.verify()  # PNG: chunk CRCs; most other formats: nothing
        if fmt not in DECODABLE_FORMATS:
            return f"unsupported format {fmt}"
        if fmt in ("JPEG", "MPO"):
            with open(path, "rb") as f:
                f.seek(max(0, size - 1024))
                tail = f.read()
            if tail.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9"):  # EOI marker: the data is complete
                return None
        if fmt == "PNG":
            return None
        with Image.open(path) as im:  # anything else: decode it all (rare)
            im.load()
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "cannot be decoded"
        return f"{type(e).__name__}: {e}"[:200]


def _stat_files(paths: list[bytes], threads: int) -> np.ndarray:
    """(size, mtime in ns) of each file, as an int64 array of shape (len(paths), 2)."""
    stats = np.empty((len(paths), 2), dtype=np.int64)

    def fill(start: int) -> None:
        for i in range(start, min(start + _STAT_CHUNK, len(paths))):
            st = os.stat(paths[i])
            stats[i] = st.st_size, st.st_mtime_ns

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fill, range(0, len(paths), _STAT_CHUNK)))
    return stats


def _cache_file(split_dir: Path) -> Path:
    key = hashlib.sha1(str(split_dir.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "verify" / f"{split_dir.name}-{key}.npz"


@dataclass
class _Checked:
    """What the last check of a split saw: every file's relative path, size and mtime, and the bad ones."""
    names: bytes  # relative paths joined by newlines, in ImageFolder order
    stats: np.ndarray  # (files, 2) int64: size, mtime_ns
    bad: dict[str, str]  # relative path -> why it cannot be decoded


def _read_cache(split_dir: Path) -> _Checked | None:
    """The cached check, or None when there is none or it is unreadable (then everything is checked)."""
    try:
        with np.load(_cache_file(split_dir), allow_pickle=False) as f:
            if int(f["version"]) != _CACHE_VERSION:
                return None
            return _Checked(f["names"].tobytes(), f["stats"], json.loads(f["bad"].tobytes()))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # e.g. a truncated file
        return None


def _write_cache(split_dir: Path, checked: _Checked) -> None:
    path = _cache_file(split_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, version=np.array(_CACHE_VERSION),
                     names=np.frombuffer(checked.names, dtype=np.uint8),
                     stats=checked.stats, bad=np.frombuffer(json.dumps(checked.bad).encode(), np.uint8))
        os.replace(tmp, path)  # atomic: a crash or another rank never leaves half a cache to read
    except OSError as e:
        log.warning("could not write the image check cache %s (%s); the check will rerun next time",
                    path, e)


def _to_check(samples: Samples, stats: np.ndarray, cached: _Checked | None
              ) -> tuple[np.ndarray, dict[str, str], bool]:
    """(indices of the files to check, the cached reasons that still hold, whether the cache is stale)."""
    if cached is None:
        return np.arange(len(samples)), {}, True
    same_files = cached.names == samples.names
    if same_files:  # the usual case: the same files, compared as two arrays
        changed = np.flatnonzero((cached.stats != stats).any(axis=1))
        still_there = None
    else:
        before = {rel: i for i, rel in enumerate(cached.names.split(b"\0"))} if len(cached.stats) else {}
        now = samples.names.split(b"\0") if len(samples) else []
        old = np.array([before.get(rel, -1) for rel in now], dtype=np.int64)
        changed = np.flatnonzero((old < 0) | (cached.stats[old] != stats).any(axis=1)) if before else \
            np.arange(len(samples))
        still_there = {os.fsdecode(rel) for rel in now}
    changed_names = [samples.relative(i) for i in changed]
    recheck = set(changed_names)
    still_bad = {rel: why for rel, why in cached.bad.items()
                 if rel not in recheck and (still_there is None or rel in still_there)}
    if changed_names:
        log.warning("%s: %d file(s) new or changed (size or modification time) since the last check, "
                    "checking them again: %s", samples.folder, len(changed_names),
                    _names(changed_names, _MAX_NAMED))
    return changed, still_bad, bool(changed_names) or not same_files


def _check_files(samples: Samples, indices: np.ndarray, threads: int) -> dict[str, str]:
    """{relative path: reason} for the files of `samples[indices]` that cannot be decoded."""
    def check(start: int) -> list[tuple[str, str]]:
        chunk = indices[start:start + _CHECK_CHUNK]
        return [(samples.relative(i), why) for i in chunk if (why := check_image(samples[i][0]))]

    # One task per chunk, paths made as needed: a thread pool makes a Future per task (chunksize
    # is ignored for threads), and a Future or a path string per file costs gigabytes at 1.3M files.
    with ThreadPoolExecutor(threads) as pool:
        return {rel: why for part in pool.map(check, range(0, len(indices), _CHECK_CHUNK))
                for rel, why in part}


def _find_undecodable(split_dir: Path, samples: Samples, threads: int) -> dict[str, str]:
    """{relative path: reason} for files that cannot be decoded.

    Cached: a file is checked again only when it is new or its size or modification time changed
    (each such file is named in the log). Under torch.distributed the work is shared: each rank
    reads the sizes of, and checks, the files of its own slice, and rank 0's cache decides what to
    check, so eight ranks of a node never each read every file.
    """
    import torch.distributed as dist

    from ..distributed import broadcast_object, gather_objects, world_from_env
    grouped = dist.is_available() and dist.is_initialized()
    rank, size = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
    names = samples.names
    digests = gather_objects(hashlib.sha1(names).hexdigest())  # same collectives on every rank
    if len(set(digests)) > 1:
        other = next(r for r, d in enumerate(digests) if d != digests[rank])
        raise DataError(f"{split_dir}: rank {rank} and rank {other} see different files; every node "
                        f"needs an identical copy of the dataset")
    stats = np.empty((len(samples), 2), dtype=np.int64)
    for r, part in enumerate(gather_objects(_stat_files(samples.encoded_paths(rank, size), threads))):
        stats[r::size] = part
    decision = _to_check(samples, stats, _read_cache(split_dir)) if rank == 0 else None
    to_check, bad, stale = broadcast_object(decision)
    for part in gather_objects(_check_files(samples, to_check[rank::size], threads)):
        bad.update(part)
    bad = {rel: bad[rel] for rel in sorted(bad)}
    if stale and (not grouped or world_from_env().local_rank == 0):  # one writer per node
        _write_cache(split_dir, _Checked(names, stats, bad))
    return bad


@dataclass
class Split:
    """One split's decodable samples, in ImageFolder order."""
    folder: Path
    classes: list[str]
    samples: Samples  # (path, label) pairs
    skipped: list[str] = field(default_factory=list)  # paths of undecodable files left out


def index_split(root: str | Path, split: str, *, strict: bool = False, verify: bool = True,
                threads: int = 8) -> Split:
    """List `root/split` ("train" or "val"), leave out undecodable files (DataError when `strict`)."""
    root, classes = _check_root(root)
    return index_images(root / split, classes, strict=strict, verify=verify, threads=threads)


def index_images(split_dir: str | Path, classes: list[str] | None = None, *, strict: bool = False,
                 verify: bool = True, threads: int = 8) -> Split:
    """List one folder of class folders (classes: its sub-folders unless given)."""
    split_dir = Path(split_dir).expanduser()
    if classes is None:
        if not split_dir.is_dir():
            raise DataError(f"image folder {split_dir} does not exist")
        classes = _class_folders(split_dir)
        if not classes:
            raise DataError(f"{split_dir} has no class folders (expected {split_dir}/<class>/*.JPEG)")
    samples = _list_split(split_dir, classes)
    _require_nonempty(split_dir, classes, samples)
    if not verify:
        return Split(split_dir, classes, samples)
    bad = _find_undecodable(split_dir, samples, max(1, threads))
    if not bad:
        return Split(split_dir, classes, samples)
    named = [f"{rel} ({why})" for rel, why in sorted(bad.items())]
    if strict:
        raise DataError(f"{split_dir}: {len(bad)} of {len(samples)} image(s) cannot be decoded: "
                        f"{_names(named, _MAX_NAMED)}. Fix or delete them, or set data.strict=false "
                        f"to skip them")
    log.warning("skipping %d undecodable image(s) of %d in %s (data.strict=false): %s%s", len(bad),
                len(samples), split_dir, _names(named, _MAX_NAMED),
                f" (full list: {_cache_file(split_dir)})" if len(bad) > _MAX_NAMED else "")
    keep = samples.without(set(bad))
    _require_nonempty(split_dir, classes, keep, what="decodable images")
    skipped = [str(split_dir / rel) for rel in sorted(bad)]
    return Split(split_dir, classes, keep, skipped)
