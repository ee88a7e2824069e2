"""data.source=digits: an offline demo dataset in ImageFolder layout.

scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`: 1,797 8x8 greyscale
images, 10 classes, from the UCI optical digits set) upscaled to 32x32 RGB JPEGs and split 80/20 per
class with a fixed seed. Built once into a cache folder (built in a temporary folder, then renamed,
so an interrupted build or two ranks building at once never leave a half-written dataset).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .folder import DataError, cache_dir

SIZE = 32  # pixels, square
VAL_FRACTION = 0.2
_MARKER = ".complete"


def default_digits_root() -> Path:
    return cache_dir() / "digits"


def check_digits_root(dest: Path) -> None:
    """Refuse a folder that holds something else: the digits are built only into a new or empty
    folder, or found complete (with its marker file) in one."""
    if dest.exists() and not (dest / _MARKER).is_file() and any(dest.iterdir()):
        raise DataError(f"{dest} is not a digits dataset built here (no {_MARKER} file): for a "
                        f"dataset of your own set data.source=folder; for the digits, point "
                        f"data.root at a new folder")


def build_digits(dest: str | Path | None = None) -> Path:
    """The digits dataset folder (train/ and val/), built unless it is already complete."""
    dest = Path(dest).expanduser() if dest else default_digits_root()
    if (dest / _MARKER).is_file():
        return dest
    check_digits_root(dest)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("data.source=digits needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        rng = np.random.default_rng(0)
        for label in range(10):
            idx = rng.permutation(np.flatnonzero(digits.target == label))
            n_val = round(len(idx) * VAL_FRACTION)
            for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
                folder = tmp / split / str(label)
                folder.mkdir(parents=True)
                for i in part:
                    pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
                    img = Image.fromarray(pixels, "L").resize((SIZE, SIZE), Image.BILINEAR)
                    img.convert("RGB").save(folder / f"{i:04d}.jpg", quality=95)
        (tmp / _MARKER).write_text("sklearn load_digits, 32x32 RGB JPEG, seed 0\n")
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        os.rename(tmp, dest)
    except OSError:
        if not (dest / _MARKER).is_file():  # not another process finishing the same build first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
