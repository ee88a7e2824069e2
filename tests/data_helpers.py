"""Helpers for the data tests: the real-photo datasets, folders of odd files, folders whose images
encode their own id, and the per-rank worker that tests/test_data.py launches with torchrun.

    torchrun --standalone --nproc_per_node=2 tests/data_helpers.py ROOT BACKEND OUT_DIR

Real photos: `$TRESNET_DATA` is a folder holding ImageFolder datasets by name (`imagenette-mini-96/`,
`imagenette-128/`, each with train/ and val/). Tests that need one call `real_photos(name)`, which
skips with a reason naming the variable when the dataset is absent.
"""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "TRESNET_DATA"  # folder of real-photo datasets, one subfolder per name
_SIBLING_DATA = REPO.parent / "shared" / "data"  # used when the variable is unset and this exists

TRAIN_GOOD = 6  # plain JPEGs per class in the odd-files folder
ID_LEVELS = 16  # id colour encoding: 16 levels per channel, 256 ids


def real_photos_root() -> Path | None:
    """$TRESNET_DATA, else the data folder beside the checkout when there is one, else None."""
    value = os.environ.get(DATA_ENV)
    if value:
        return Path(value).expanduser().resolve()
    return _SIBLING_DATA if _SIBLING_DATA.is_dir() else None


def find_real_photos(name: str) -> Path | None:
    """`<real_photos_root()>/<name>` when it holds a train/ folder, else None (no skip)."""
    root = real_photos_root()
    path = root / name if root is not None else None
    return path if path is not None and (path / "train").is_dir() else None


def real_photos(name: str = "imagenette-mini-96") -> Path:
    """The real-photo dataset `name` (ImageFolder root with train/ and val/); skips the calling test
    with a reason naming $TRESNET_DATA when it is absent."""
    path = find_real_photos(name)
    if path is None:
        root = real_photos_root()
        if os.environ.get(DATA_ENV):
            where = f"{DATA_ENV}={root} has no {name}/train"
        else:
            where = f"{DATA_ENV} is not set" + (f" and {root} has no {name}/train" if root else "")
        pytest.skip(f"real photos {name!r} not found ({where}): set {DATA_ENV} to a folder holding "
                    f"{name}/train and {name}/val (README, Tests)")
    return path


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random RGB picture (low-frequency noise), cheap and JPEG-friendly."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def make_photo_folder(root: Path, per_class: tuple[int, ...], val_per_class: int = 2) -> None:
    """Plain photo-like JPEGs of varied sizes, class folders c0, c1, ..."""
    seed = 1000
    for label, n in enumerate(per_class):
        for split, count in (("train", n), ("val", val_per_class)):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                photo(60 + 9 * (seed % 7), 50 + 11 * (seed % 5), seed).save(folder / f"{i}.JPEG",
                                                                          quality=90)


def make_odd_folder(root: Path) -> dict:
    """train/{a,b} and val/{a,b} with plain photos plus one of each odd kind of file.

    Returns {"undecodable": {split: [relative paths]}, "decodable": {split: count}}.
    """
    def put(rel: str, data: bytes | Image.Image, fmt: str = "JPEG", **kw) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            data.save(path, fmt, **kw)

    seed = 0
    for split, per_class in (("train", TRAIN_GOOD), ("val", 3)):
        for cls in ("a", "b"):
            for i in range(per_class):
                seed += 1
                put(f"{split}/{cls}/good_{i}.JPEG", photo(120 + 7 * i, 90 + 5 * i, seed))
    whole = jpeg_bytes(photo(200, 150, 99))
    # decodable odd files (train/a): must train normally with both backends
    put("train/a/cmyk.JPEG", photo(100, 80, 1).convert("CMYK"), quality=90)
    put("train/a/grey.JPEG", photo(90, 110, 2).convert("L"), quality=90)
    put("train/a/png_named.JPEG", photo(80, 60, 3), "PNG")
    put("train/a/huge.JPEG", photo(4288, 2848, 4), quality=80)
    put("train/a/tiny.JPEG", photo(1, 1, 5))
    put("train/a/tiny_png.JPEG", photo(3, 2, 6), "PNG")
    put("val/b/cmyk.JPEG", photo(110, 70, 7).convert("CMYK"), quality=90)
    # undecodable files
    put("train/a/zero_bytes.JPEG", b"")
    put("train/b/truncated.JPEG", whole[: len(whole) // 2])
    put("train/b/not_an_image.JPEG", b"this is a text file, not a JPEG\n" * 20)
    put("val/a/truncated.JPEG", whole[: len(whole) * 2 // 3])
    return {"undecodable": {"train": ["a/zero_bytes.JPEG", "b/not_an_image.JPEG", "b/truncated.JPEG"],
                            "val": ["a/truncated.JPEG"]},
            "decodable": {"train": 2 * TRAIN_GOOD + 6, "val": 2 * 3 + 1}}


def id_colour(i: int) -> tuple[int, int, int]:
    step = 256 // ID_LEVELS
    return (step // 2 + step * (i % ID_LEVELS), step // 2 + step * (i // ID_LEVELS), 128)


def make_id_folder(root: Path, train_per_class: tuple[int, ...], val_per_class: tuple[int, ...],
                   size: tuple[int, int] = (48, 40)) -> dict:
    """Solid-colour JPEGs whose colour encodes a unique id, so any crop tells which file it came
    from. Returns {split: {id: label}}."""
    ids, next_id = {"train": {}, "val": {}}, 0
    for split, counts in (("train", train_per_class), ("val", val_per_class)):
        for label, n in enumerate(counts):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(n):
                Image.new("RGB", size, id_colour(next_id)).save(folder / f"{next_id:04d}.JPEG",
                                                                quality=95)
                ids[split][next_id] = label
                next_id += 1
    return ids


def decode_ids(images) -> list[int]:
    """Ids of a batch of id images (float NCHW in [0, 1], any crop or flip)."""
    step = 256 // ID_LEVELS
    mean = (images[:, :2].mean(dim=(2, 3)) * 255).cpu().numpy()
    levels = np.floor(mean / step).astype(int)
    return [int(r + ID_LEVELS * g) for r, g in levels]


def _dist_main(root: str, backend: str, out_dir: str) -> None:
    """One rank of the 2-process test: record what each epoch and the validation pass yield."""
    import torch

    from tresnet_train.config import Config
    from tresnet_train.data import build_loaders
    from tresnet_train.distributed import cleanup, init_distributed

    world, device = init_distributed("cpu")
    cfg = Config()
    cfg.data.root, cfg.data.backend, cfg.data.img_size = root, backend, 32
    cfg.data.batch_size, cfg.data.val_batch_size, cfg.data.workers = 4, 3, 1
    cfg.run.seed = 7
    data_config = {"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bilinear",
                   "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    train, val = build_loaders(cfg, data_config, world, device)
    record = {"rank": world.rank, "len": len(train), "epochs": [], "val": [], "val_len": len(val),
              "num_images": val.num_images}
    for epoch in range(2):
        train.set_epoch(epoch)
        ids, targets = [], []
        for images, target in train:
            assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
            ids += decode_ids(images)
            targets += target.tolist()
        record["epochs"].append({"ids": ids, "targets": targets})
    for images, target in val:
        record["val"] += [(i, t) for i, t in zip(decode_ids(images), target.tolist())]
    Path(out_dir, f"rank{world.rank}.json").write_text(json.dumps(record))
    cleanup()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _dist_main(*sys.argv[1:4])


def index_as_rank(rank: int, store: str, root: str, cache: str, out: str) -> None:
    """One of two gloo ranks indexing `root/train`; writes how many files it checked and its result."""
    import torch.distributed as dist

    from tresnet_train.data import folder as folder_mod
    from tresnet_train.data import index_split
    os.environ["TRESNET_TRAIN_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    checked, real_check = [], folder_mod.check_image
    folder_mod.check_image = lambda path: checked.append(path) or real_check(path)
    split = index_split(root, "train")
    Path(f"{out}.{rank}").write_text(json.dumps({"checked": checked, "skipped": split.skipped,
                                                 "samples": len(split.samples)}))
    dist.destroy_process_group()
