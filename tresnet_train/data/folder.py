"""ImageNet-style folders (`root/train/<class>/*.JPEG`, `root/val/<class>/*.JPEG`): listing and checks.

Labels are the indices of the sorted class folder names and files are listed in torchvision's
`ImageFolder` order (`torchvision.datasets.folder.make_dataset`), so both loader backends and any
torchvision-trained checkpoint agree on what label 3 means.

Undecodable files (zero bytes, truncated, not an image, a format the decoders do not read) are found
once at indexing, before training, because DALI's readers cannot skip a file that fails to decode.
The check is cheap for the common case: PIL parses the header (and verifies PNG chunk CRCs); a JPEG
whose data does not end with the EOI marker, and any other format, is decoded in full. The result
is cached per split in a small JSON file under the user's cache folder (never inside the dataset,
which may be read-only), keyed by a fingerprint of every file's relative path and size. Under
`torch.distributed` each rank checks a slice of the files and the results are shared, so all ranks
train on the same list.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

log = logging.getLogger(__name__)

# Formats both backends decode (PIL and DALI's image decoder). MPO is a camera JPEG with extra frames.
DECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "PPM", "WEBP", "TIFF")
_CACHE_VERSION = 1
_MAX_NAMED = 50  # undecodable files named in the console log; the cache JSON holds the full list


class DataError(ValueError):
    """A dataset problem the user can fix; the message names the path and what to do."""


def cache_dir() -> Path:
    """`$TRESNET_TRAIN_CACHE`, else `~/.cache/tresnet_train` (verification results, the digits demo)."""
    return Path(os.environ.get("TRESNET_TRAIN_CACHE") or Path.home() / ".cache" / "tresnet_train")


def _class_folders(split_dir: Path) -> list[str]:
    # torchvision's find_classes: every sub-directory, sorted by name
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def _list_split(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    class_to_idx = {c: i for i, c in enumerate(classes)}
    return make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)


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


def _require_nonempty(split_dir: Path, classes: list[str], samples: list[tuple[str, int]],
                      what: str = "images") -> None:
    counts = [0] * len(classes)
    for _, label in samples:
        counts[label] += 1
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


def _fingerprint(split_dir: Path, samples: list[tuple[str, int]], threads: int) -> str:
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(lambda s: os.stat(s[0]).st_size, samples, chunksize=256))
    h = hashlib.sha1(f"v{_CACHE_VERSION}\n".encode())
    for (path, _), size in zip(samples, sizes):
        h.update(f"{os.path.relpath(path, split_dir)}\0{size}\n".encode())
    return h.hexdigest()


def _cache_file(split_dir: Path) -> Path:
    key = hashlib.sha1(str(split_dir.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "verify" / f"{split_dir.name}-{key}.json"


def _read_cache(split_dir: Path, fingerprint: str) -> dict[str, str] | None:
    try:
        data = json.loads(_cache_file(split_dir).read_text())
    except (OSError, ValueError):
        return None
    if data.get("version") != _CACHE_VERSION or data.get("fingerprint") != fingerprint:
        return None
    return dict(data["bad"])


def _write_cache(split_dir: Path, fingerprint: str, num_files: int, bad: dict[str, str]) -> None:
    path = _cache_file(split_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": _CACHE_VERSION, "folder": str(split_dir.resolve()),
                "fingerprint": fingerprint, "num_files": num_files, "bad": bad}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)  # atomic: ranks sharing a cache folder never read half a file
    except OSError as e:
        log.warning("could not write the image check cache %s (%s); the check will rerun next time",
                    path, e)


def _check_files(split_dir: Path, paths: list[str], threads: int) -> dict[str, str]:
    with ThreadPoolExecutor(threads) as pool:
        reasons = pool.map(check_image, paths, chunksize=64)
        return {os.path.relpath(p, split_dir): r for p, r in zip(paths, reasons) if r is not None}


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _find_undecodable(split_dir: Path, samples: list[tuple[str, int]], threads: int) -> dict[str, str]:
    """{relative path: reason} for files that cannot be decoded; cached, shared across ranks."""
    fingerprint = _fingerprint(split_dir, samples, threads)
    cached = _read_cache(split_dir, fingerprint)
    dist = _dist()
    if dist is None:
        if cached is None:
            cached = _check_files(split_dir, [p for p, _ in samples], threads)
            _write_cache(split_dir, fingerprint, len(samples), cached)
        return cached
    # Same collectives on every rank, whatever each rank's cache holds.
    rank, world = dist.get_rank(), dist.get_world_size()
    views = [None] * world
    dist.all_gather_object(views, (fingerprint, cached))
    if any(fp != fingerprint for fp, _ in views):
        other = next(r for r, (fp, _) in enumerate(views) if fp != fingerprint)
        raise DataError(f"{split_dir}: rank {rank} and rank {other} see different files (names or "
                        f"sizes differ); every node needs an identical copy of the dataset")
    hit = next((c for _, c in views if c is not None), None)
    if hit is not None:
        if cached is None:
            _write_cache(split_dir, fingerprint, len(samples), hit)
        return hit
    mine = _check_files(split_dir, [p for p, _ in samples[rank::world]], threads)
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    bad = {k: v for part in parts for k, v in part.items()}
    _write_cache(split_dir, fingerprint, len(samples), bad)
    return bad


@dataclass
class Split:
    """One split's decodable samples, in ImageFolder order."""
    folder: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (path, label)
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
    keep = [s for s in samples if os.path.relpath(s[0], split_dir) not in bad]
    _require_nonempty(split_dir, classes, keep, what="decodable images")
    skipped = [str(split_dir / rel) for rel in sorted(bad)]
    return Split(split_dir, classes, keep, skipped)
