"""Data pipeline contracts, for the torch and the DALI backend (DALI tests skip where it is absent).

Folder checks and bad files, label order and eval preprocessing agreement between backends (real
photos from $TRESNET_DATA), sharding with 2 processes, exact mid-epoch resume, digits and synthetic
sources. All on CPU; GPU variants are marked `gpu`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import (REPO, index_as_rank, make_id_folder, make_odd_folder, make_photo_folder,
                          photo, real_photos)
from tresnet_train.config import Config
from tresnet_train.data import (DataError, build_loaders, check_image, index_split,
                                scan_image_folder)
from tresnet_train.data import Preprocess
from tresnet_train.data import folder as folder_mod
from tresnet_train.data.build import build_val_loader
from tresnet_train.data.digits import build_digits
from tresnet_train.data.dali_augment import RandAugmentSpec, parse_randaugment
from tresnet_train.data.dali_backend import dali_available
from tresnet_train.data.plan import TrainPlan, ValPlan
from tresnet_train.distributed import World

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]
CPU = torch.device("cpu")
TRESNET = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear",
           "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
log = logging.getLogger(__name__)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRESNET_TRAIN_CACHE", str(tmp_path / "cache"))


def make_cfg(root, backend: str, **data) -> Config:
    cfg = Config()
    cfg.data.root, cfg.data.backend = str(root), backend
    cfg.data.img_size, cfg.data.batch_size, cfg.data.workers = 32, 4, 2
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def collect(loader, limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for images, targets in loader:
        out.append((images.clone(), targets.clone()))
        if limit is not None and len(out) == limit:
            break
    return out


# ---- folder structure and undecodable files --------------------------------------------------------
def test_scan_counts_and_structure_errors(tmp_path):
    make_id_folder(tmp_path / "ok", (3, 2), (1, 1))
    assert scan_image_folder(tmp_path / "ok") == (["class_0", "class_1"], 5, 2)

    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nowhere")
    make_id_folder(tmp_path / "noval", (1, 1), ())
    with pytest.raises(DataError, match=r"noval/val is missing"):
        scan_image_folder(tmp_path / "noval")
    make_id_folder(tmp_path / "empty", (2, 0), (1, 1))
    with pytest.raises(DataError, match=r"hold no images.*empty/train/class_1"):
        scan_image_folder(tmp_path / "empty")
    make_id_folder(tmp_path / "differ", (1, 1), (1,))
    (tmp_path / "differ" / "val" / "class_x").mkdir()
    (tmp_path / "differ" / "val" / "class_0" / "0002.JPEG").rename(
        tmp_path / "differ" / "val" / "class_x" / "0002.JPEG")
    with pytest.raises(DataError, match=r"class folders differ.*only in train: class_1; only in val: "
                                        r"class_x"):
        scan_image_folder(tmp_path / "differ")
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    (tmp_path / "noclass" / "val").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        scan_image_folder(tmp_path / "noclass")


def test_check_image_on_each_odd_kind(tmp_path):
    info = make_odd_folder(tmp_path)
    for split in ("train", "val"):
        bad = {str(p.relative_to(tmp_path / split)) for p in (tmp_path / split).rglob("*.JPEG")
               if check_image(str(p)) is not None}
        assert bad == set(info["undecodable"][split])
    assert "empty" in check_image(str(tmp_path / "train/a/zero_bytes.JPEG"))
    assert "truncated" in check_image(str(tmp_path / "train/b/truncated.JPEG"))
    assert "cannot identify" in check_image(str(tmp_path / "train/b/not_an_image.JPEG"))
    # a complete JPEG with bytes after the EOI marker takes the slow path and passes
    (tmp_path / "trailing.JPEG").write_bytes((tmp_path / "train/a/good_0.JPEG").read_bytes() + b"x" * 5000)
    assert check_image(str(tmp_path / "trailing.JPEG")) is None


def test_index_caches_the_check_and_names_skipped_files(tmp_path, monkeypatch, caplog):
    info = make_odd_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tresnet_train.data.folder"):
        split = index_split(tmp_path, "train")
    assert sorted(os.path.relpath(p, tmp_path / "train") for p in split.skipped) == \
        info["undecodable"]["train"]
    assert len(split.samples) == info["decodable"]["train"]
    message = caplog.text
    assert "skipping 3 undecodable image(s) of 21" in message
    for rel in info["undecodable"]["train"]:
        assert rel in message
    # second indexing: served from the cache, no file is checked again
    monkeypatch.setattr(folder_mod, "check_image", lambda path: pytest.fail(f"re-checked {path}"))
    again = index_split(tmp_path, "train")
    assert again.samples == split.samples and again.skipped == split.skipped
    # a new file and a changed one (same size, new modification time) are checked again and named;
    # the other files keep their cached result
    (tmp_path / "train/b/extra.JPEG").write_bytes(b"")
    touched = tmp_path / "train" / os.path.relpath(split.samples[0][0], tmp_path / "train")
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    checked = []
    monkeypatch.setattr(folder_mod, "check_image",
                        lambda path: checked.append(path) or ("x" if "extra" in path else None))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tresnet_train.data.folder"):
        changed = index_split(tmp_path, "train")
    assert sorted(checked) == sorted([str(touched), str(tmp_path / "train/b/extra.JPEG")])
    assert "2 file(s) new or changed" in caplog.text and "b/extra.JPEG" in caplog.text
    assert len(changed.skipped) == len(split.skipped) + 1
    checked.clear()
    index_split(tmp_path, "train")  # and the cache now holds them
    assert checked == []
    # a cache cut short (a crash while it was written elsewhere, a full disk) is never trusted
    cache = folder_mod._cache_file(tmp_path / "train")
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    rebuilt = index_split(tmp_path, "train")
    assert len(checked) == len(changed.samples) + len(changed.skipped)  # everything checked again
    assert [os.path.basename(p) for p in rebuilt.skipped] == ["extra.JPEG"]  # as the check now says


def test_listing_is_torchvisions_imagefolder_order_held_compactly(tmp_path):
    """Nested folders, upper-case and odd extensions, non-images, a symlinked folder: the same
    (path, label) list as torchvision's make_dataset, from arrays rather than a tuple per file."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    for rel in ["b/z.JPEG", "b/a.jpg", "b/A.PNG", "b/notes.txt", "b/sub/x.jpeg", "b/sub/deeper/y.webp",
                "b/Sub2/w.JPEG", "a/1.JPEG", "a/10.JPEG", "a/2.JPEG", "c d/space name.JPEG"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "linked.JPEG").write_bytes(b"x")
    (tmp_path / "a" / "link").symlink_to(tmp_path / "elsewhere")
    classes = ["a", "b", "c d"]
    samples = folder_mod._list_split(tmp_path, classes)
    expected = make_dataset(str(tmp_path), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    assert list(samples) == expected and len(samples) == len(expected) == 11
    assert samples[3] == expected[3] and samples[-1] == expected[-1] and samples[1:3] == expected[1:3]
    assert isinstance(samples.labels, np.ndarray) and isinstance(samples.names, bytes)
    assert samples.without({"b/a.jpg", "a/10.JPEG"}) == [s for s in expected if not
                                                        s[0].endswith(("b/a.jpg", "a/10.JPEG"))]


@pytest.mark.slow
def test_two_ranks_share_the_check_each_reading_half(tmp_path):
    info = make_odd_folder(tmp_path / "data")
    torch.multiprocessing.spawn(index_as_rank, nprocs=2, args=(
        str(tmp_path / "store"), str(tmp_path / "data"), str(tmp_path / "cache"), str(tmp_path / "out")))
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    assert ranks[0]["skipped"] == ranks[1]["skipped"] and len(ranks[0]["skipped"]) == 3
    assert ranks[0]["samples"] == ranks[1]["samples"] == info["decodable"]["train"]
    total = info["decodable"]["train"] + 3
    assert not set(ranks[0]["checked"]) & set(ranks[1]["checked"])  # no file read twice
    assert len(ranks[0]["checked"]) + len(ranks[1]["checked"]) == total
    assert abs(len(ranks[0]["checked"]) - len(ranks[1]["checked"])) <= 1


def test_strict_turns_bad_files_into_a_clear_error(tmp_path):
    make_odd_folder(tmp_path)
    with pytest.raises(DataError, match=r"3 of 21 image\(s\) cannot be decoded.*b/truncated.JPEG.*"
                                        r"data.strict=false"):
        build_loaders(make_cfg(tmp_path, "torch", strict=True), TRESNET, World(), CPU)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_files_one_epoch(tmp_path, backend):
    """Decodable odd files (CMYK, grey, PNG named .JPEG, huge, tiny) train; undecodable are skipped."""
    info = make_odd_folder(tmp_path)
    cfg = make_cfg(tmp_path, backend, batch_size=6, val_batch_size=4, randaugment="rand-m9-inc1")
    train, val = build_loaders(cfg, TRESNET, World(), CPU)
    assert train.classes == ["a", "b"]
    assert sorted(os.path.relpath(p, tmp_path / "train") for p in train.skipped) == \
        info["undecodable"]["train"]
    assert len(train) == info["decodable"]["train"] // 6  # 18 images, batch 6: every one is used
    seen = 0
    for images, targets in train:
        assert images.shape == (6, 3, 32, 32) and images.dtype == torch.float32
        assert images.min() >= 0 and images.max() <= 1 and torch.isfinite(images).all()
        assert targets.dtype == torch.int64 and set(targets.tolist()) <= {0, 1}
        seen += len(targets)
    assert seen == info["decodable"]["train"]
    counted = sum(int((t >= 0).sum()) for _, t in val)
    assert counted == val.num_images == info["decodable"]["val"]


def test_torch_loader_skips_a_file_that_breaks_after_indexing(tmp_path, caplog):
    """The loader's own safety net: a file damaged after the check is replaced and reported (one of
    eight is within data.max_bad_fraction=0.2)."""
    make_photo_folder(tmp_path, (4, 4))
    train, _ = build_loaders(make_cfg(tmp_path, "torch", workers=1, max_bad_fraction=0.2), TRESNET,
                             World(), CPU)
    strict, _ = build_loaders(make_cfg(tmp_path, "torch", workers=0, strict=True), TRESNET,
                              World(), CPU)
    broken = tmp_path / "train" / "c1" / "2.JPEG"
    broken.write_bytes(broken.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="tresnet_train.data.bad_files"):
        batches = collect(train)
    assert len(batches) == 2 and all(len(t) == 4 for _, t in batches)
    assert train.skipped == [str(broken)] and f"skipping training file {broken}" in caplog.text
    with pytest.raises(DataError, match=r"2.JPEG cannot be decoded.*data.strict=false"):
        collect(strict)


# ---- both backends agree ----------------------------------------------------------------------------
def _real_photo_folder(tmp_path) -> Path:
    """Real photos (imagenette-mini-96 val, 2 classes) plus non-square resized copies of them."""
    src = real_photos("imagenette-mini-96")  # this test compares the backends on real images
    root = tmp_path / "photos"
    for split in ("train", "val"):
        for cls in sorted(p.name for p in (src / "val").iterdir())[:2]:
            out = root / split / cls
            out.mkdir(parents=True)
            for i, path in enumerate(sorted((src / "val" / cls).glob("*.JPEG"))[:8]):
                img = Image.open(path).convert("RGB")
                img.save(out / f"sq_{i}.JPEG", quality=90)
                w, h = (150, 101) if i % 2 else (77, 131)  # odd sizes: torchvision's rounding
                img.resize((w, h), Image.BICUBIC).save(out / f"nsq_{i}.JPEG", quality=90)
    return root


@needs_dali
@pytest.mark.parametrize("resize,img_size,interpolation,max_mean_abs", [
    ("crop", 64, "bilinear", 0.5), ("crop", 160, "bilinear", 0.5), ("crop", 64, "bicubic", 1.0),
    ("squash", 64, "bilinear", 0.5), ("squash", 160, "bilinear", 0.5)])
def test_eval_preprocessing_matches_between_backends(tmp_path, resize, img_size, interpolation,
                                                     max_mean_abs):
    """Same images, same labels in the same order, and val tensors within a grey level, for both
    eval protocols (crop: timm's; squash: the official TResNet 448 one, as validate.py runs them)."""
    root = _real_photo_folder(tmp_path)
    data_config = dict(TRESNET, interpolation=interpolation)
    split = index_split(root, "val")
    outs = {}
    for backend in ("torch", "dali"):
        cfg = make_cfg(root, backend, img_size=img_size, val_batch_size=7)
        pre = dataclasses.replace(Preprocess.from_config(cfg.data, data_config), val_resize_mode=resize)
        val = build_val_loader(split, cfg.data, pre, backend, World(), CPU)
        batches = collect(val)
        outs[backend] = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    (x_t, y_t), (x_d, y_d) = outs["torch"], outs["dali"]
    assert torch.equal(y_t, y_d) and y_t.tolist() == sorted(y_t.tolist())
    assert x_t.shape == x_d.shape == (32, 3, img_size, img_size)
    diff = (x_t - x_d).abs() * 255  # grey levels
    report = (f"eval torch vs DALI, {resize} {interpolation} {img_size}px: mean abs diff {diff.mean():.3f} "
              f"grey levels, max {diff.max():.1f}, worst image mean {diff.mean(dim=(1, 2, 3)).max():.3f}")
    print(report)
    log.info(report)
    assert diff.mean() < max_mean_abs
    assert diff.mean(dim=(1, 2, 3)).max() < 2 * max_mean_abs  # no image shifted or mis-rounded
    if interpolation == "bilinear":
        # squash keeps the photo's own border: shrinking, Pillow renormalises the antialias filter
        # cut off by the edge and DALI clamps, up to ~7 grey levels on the outermost pixel ring
        # (measured at 64 px); inside it the backends agree as with crop
        ring = 1 if resize == "squash" else 0
        assert diff[..., ring:img_size - ring, ring:img_size - ring].max() <= 2.01


@needs_dali
def test_backends_read_the_same_plan(tmp_path):
    """Same sample order per step in both backends (labels compared; augmentation differs)."""
    make_photo_folder(tmp_path, (5, 4, 6))
    targets = {}
    for backend in ("torch", "dali"):
        train, _ = build_loaders(make_cfg(tmp_path, backend), TRESNET, World(), CPU)
        train.set_epoch(3)
        targets[backend] = torch.cat([t for _, t in collect(train)])
    assert len(targets["torch"]) == 12
    assert torch.equal(targets["torch"], targets["dali"])


# ---- plans -------------------------------------------------------------------------------------------
def test_train_plan_shards_by_global_rank_and_reshuffles():
    plans = [TrainPlan(103, 8, 4, r, seed=5) for r in range(4)]
    assert {p.steps for p in plans} == {3}  # floor(103 / 4) = 25 per rank -> 3 batches of 8
    for epoch in range(3):
        shards = [p.rank_indices(epoch) for p in plans]
        every = np.concatenate(shards)
        assert all(len(s) == 24 for s in shards) and len(set(every.tolist())) == 96
    assert not np.array_equal(plans[0].rank_indices(0), plans[0].rank_indices(1))
    assert np.array_equal(plans[1].rank_indices(2), TrainPlan(103, 8, 4, 1, seed=5).rank_indices(2))
    seeds = np.concatenate([p.rank_seeds(0) for p in plans])
    assert len(set(seeds.tolist())) == len(seeds)


def test_sample_seeds_depend_on_seed_epoch_and_global_position_alone():
    """The same global position gets the same augmentation seed whatever the world and batch size
    (and so whichever rank reads it); another epoch or run.seed gets other seeds."""
    one = TrainPlan(96, 8, 1, 0, seed=5).rank_seeds(2)
    two = [TrainPlan(99, 4, 2, r, seed=5).rank_seeds(2) for r in range(2)]
    assert len(one) == 96 and np.array_equal(one[0::2], two[0]) and np.array_equal(one[1::2], two[1])
    assert len(set(one.tolist()) & set(TrainPlan(96, 8, 1, 0, seed=5).rank_seeds(3).tolist())) < 2
    assert len(set(one.tolist()) & set(TrainPlan(96, 8, 1, 0, seed=6).rank_seeds(2).tolist())) < 2


def test_repeated_augmentation_puts_copies_on_different_ranks():
    plans = [TrainPlan(40, 2, 4, r, seed=0, repeats=3) for r in range(4)]
    order = plans[0].epoch_order(0)
    assert len(order) == 40 and np.array_equal(order[0:3], [order[0]] * 3)
    for k in range(0, 39, 3):  # each group of 3 copies spans 3 consecutive global positions
        ranks = {(k + j) % 4 for j in range(3)}
        assert len(ranks) == 3


def test_val_plan_counts_each_image_once():
    for n, world, batch in ((7, 3, 2), (12, 4, 5), (1, 2, 4)):
        plans = [ValPlan(n, batch, world, r) for r in range(world)]
        assert len({p.steps for p in plans}) == 1
        real = [int(i) for p in plans for i, pad in zip(*p.rank_indices()) if not pad]
        assert sorted(real) == list(range(n))
        assert sum(int(p.rank_indices()[1].sum()) for p in plans) == plans[0].per_rank * world - n


# ---- two processes -----------------------------------------------------------------------------------
def _launch(root: Path, backend: str, out: Path) -> list[dict]:
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "data_helpers.py"), str(root), backend, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_processes_shard_and_count_each_val_image_once(tmp_path):
    ids = make_id_folder(tmp_path / "data", (13, 12), (6, 5))
    backends = ["torch"] + (["dali"] if dali_available() else [])
    records = {b: _launch(tmp_path / "data", b, tmp_path / b) for b in backends}
    for backend, ranks in records.items():
        assert [r["len"] for r in ranks] == [3, 3]  # floor(25 / 2) = 12 per rank -> 3 batches of 4
        orders = []
        for epoch in range(2):
            per_rank = [r["epochs"][epoch]["ids"] for r in ranks]
            assert [len(x) for x in per_rank] == [12, 12]
            assert not set(per_rank[0]) & set(per_rank[1])  # disjoint shards
            for r in ranks:
                ep = r["epochs"][epoch]
                assert ep["targets"] == [ids["train"][i] for i in ep["ids"]]  # labels follow files
            orders.append(per_rank)
        assert orders[0] != orders[1]  # reshuffled each epoch
        assert [r["val_len"] for r in ranks] == [2, 2]  # ceil(11 / 2) = 6 per rank, batch 3
        real = [(i, t) for r in ranks for i, t in r["val"] if t >= 0]
        assert sorted(i for i, _ in real) == sorted(ids["val"])  # every val image exactly once
        assert all(ids["val"][i] == t for i, t in real)
        assert sum(t < 0 for r in ranks for _, t in r["val"]) == 1
        assert all(r["num_images"] == 11 for r in ranks)
    if len(records) == 2:  # both backends read the same plan
        assert [r["epochs"] for r in records["torch"]] == [r["epochs"] for r in records["dali"]]


# ---- exact mid-epoch resume ----------------------------------------------------------------------------
def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_mid_epoch_resume_yields_identical_remaining_batches(tmp_path, backend):
    make_photo_folder(tmp_path, (9, 8))
    cfg = make_cfg(tmp_path, backend, randaugment="rand-m9-mstd0.5-inc1")
    full_loader, _ = build_loaders(cfg, TRESNET, World(), CPU)
    full_loader.set_epoch(1)
    full = collect(full_loader)
    assert len(full) == 4

    first, _ = build_loaders(cfg, TRESNET, World(), CPU)
    first.set_epoch(1)
    head = collect(first, limit=2)
    for (a, ta), (b, tb) in zip(head, full):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    state = _roundtrip(first.state_dict())
    assert state["epoch"] == 1 and state["step"] == 2
    del first

    resumed, _ = build_loaders(cfg, TRESNET, World(), CPU)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"], state["step"])  # what the trainer does after loading
    rest = collect(resumed)
    assert len(rest) == 2
    for (a, ta), (b, tb) in zip(rest, full[2:]):
        assert torch.equal(ta, tb)
        assert torch.equal(a, b)  # pixel-identical
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["step"] == 0


@pytest.mark.slow
@needs_dali
def test_dali_epoch_from_the_cached_graph_equals_a_fresh_trace(tmp_path):
    """Epoch pipelines are deserialised from the graph traced for the first epoch."""
    make_photo_folder(tmp_path, (5, 4))
    cfg = make_cfg(tmp_path, "dali", randaugment="rand-m9-inc1")
    fresh, _ = build_loaders(cfg, TRESNET, World(), CPU)
    fresh.set_epoch(1)  # traced directly for epoch 1
    reference = collect(fresh)
    reused, _ = build_loaders(cfg, TRESNET, World(), CPU)
    collect(reused)  # epoch 0 traces the graph; epoch 1 comes from the serialized graph
    assert reused.epoch == 1
    for (a, ta), (b, tb) in zip(collect(reused), reference):
        assert torch.equal(a, b) and torch.equal(ta, tb)


def test_torch_pixels_do_not_depend_on_workers_or_resume_path(tmp_path):
    make_photo_folder(tmp_path, (9, 8))
    cfg = make_cfg(tmp_path, "torch", randaugment="rand-m9-mstd0.5-inc1", workers=2)
    two, _ = build_loaders(cfg, TRESNET, World(), CPU)
    two.set_epoch(4)
    reference = collect(two)
    cfg.data.workers = 0
    zero, _ = build_loaders(cfg, TRESNET, World(), CPU)
    zero.set_epoch(4, start_step=1)  # no state_dict: (epoch, step) alone is enough for torch
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    rest = collect(zero)
    # the main process's global RNGs were not touched by the per-sample seeding (workers=0)
    after = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    assert torch.equal(after[0], torch.rand(2)) and np.array_equal(after[1], np.random.rand(2))
    assert after[2] == random.random()
    for (a, ta), (b, tb) in zip(rest, reference[1:]):
        assert torch.equal(a, b) and torch.equal(ta, tb)


# ---- sources and backend choice ------------------------------------------------------------------------
def test_digits_source_builds_once_and_loads(tmp_path):
    cfg = make_cfg(tmp_path / "digits", "torch", source="digits", batch_size=64, workers=0)
    classes, n_train, n_val = scan_image_folder(build_digits(cfg.data.root))
    assert classes == [str(i) for i in range(10)] and n_train + n_val == 1797
    assert 0.18 < n_val / 1797 < 0.22
    stamp = (tmp_path / "digits" / ".complete").stat().st_mtime_ns
    train, val = build_loaders(cfg, TRESNET, World(), CPU)
    assert (tmp_path / "digits" / ".complete").stat().st_mtime_ns == stamp  # reused, not rebuilt
    images, targets = next(iter(train))
    assert images.shape == (64, 3, 32, 32) and targets.max() <= 9
    assert val.num_images == n_val and len(train) == n_train // 64


def test_synthetic_source_needs_no_files():
    cfg = make_cfg("", "torch", source="synthetic", synthetic_size=40, batch_size=8)
    cfg.model.num_classes = 5
    train, val = build_loaders(cfg, TRESNET, World(world_size=2, rank=1), CPU)
    assert len(train) == 2 and train.classes == ["0", "1", "2", "3", "4"]
    batches = collect(train)
    assert len(batches) == 2 and batches[0][0].shape == (8, 3, 32, 32)
    assert sum(int((t >= 0).sum()) for _, t in val) == 20 and val.num_images == 40


def test_backend_choice(monkeypatch, tmp_path):
    from tresnet_train.data import build as build_mod
    make_photo_folder(tmp_path, (4, 4))
    monkeypatch.setattr(build_mod, "dali_available", lambda: False)
    assert build_mod.resolve_backend("auto") == "torch"
    with pytest.raises(DataError, match="DALI is not installed"):
        build_loaders(make_cfg(tmp_path, "dali"), TRESNET, World(), CPU)
    with pytest.raises(DataError, match="not a valid timm RandAugment"):
        build_loaders(make_cfg(tmp_path, "torch", randaugment="rand-q9"), TRESNET, World(), CPU)


def test_randaugment_posterize_at_full_magnitude_works_with_current_pillow():
    """timm's increasing posterize keeps 0 bits at magnitude 10; Pillow 13 refuses 0 bits."""
    from tresnet_train.data.transforms import Preprocess, train_transform
    pre = Preprocess(32, 32, 0.875, "bilinear", (0, 0, 0), (1, 1, 1), (0.5, 1.0), 0.0,
                     "rand-m10-n1-inc1")
    ra = train_transform(pre).transforms[2]
    (op,) = [o for o in ra.ops if o.name == "PosterizeIncreasing"]
    op.prob, op.magnitude = 1.0, 10
    out = op(photo(40, 30, 0))
    assert out.size == (40, 30) and out.getextrema() == ((0, 0),) * 3


def test_randaugment_spec_is_parsed_as_timm_parses_it():
    assert parse_randaugment("rand-m9-mstd0.5-inc1") == RandAugmentSpec(
        magnitude=9, num_ops=2, prob=0.5, magnitude_std=0.5, increasing=True)
    assert parse_randaugment("rand-n3-m7-p0.3-mmax0") == RandAugmentSpec(
        magnitude=7, num_ops=3, prob=0.3, magnitude_max=10)  # timm: mmax0 -> 10
    assert parse_randaugment("rand-m9-mstd101").magnitude_std == float("inf")  # uniform [0, m]
    for bad in ("augmix-m5", "rand-m9-tweights", "rand-mx"):
        with pytest.raises(DataError):
            parse_randaugment(bad)


# ---- GPU ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_gpu
@needs_dali
def test_dali_gpu_outputs_on_device_and_matches_torch(tmp_path):
    root = _real_photo_folder(tmp_path)
    device = torch.device("cuda", 0)
    outs = {}
    for backend in ("torch", "dali"):
        train, val = build_loaders(make_cfg(root, backend, img_size=64), TRESNET, World(), device)
        images, targets = next(iter(train))
        assert images.device == device and targets.device == device
        outs[backend] = torch.cat([x for x, _ in collect(val)]).cpu()
    diff = (outs["torch"] - outs["dali"]).abs() * 255
    print(f"eval torch vs DALI (nvJPEG) on GPU: mean abs diff {diff.mean():.3f} grey levels")
    assert diff.mean() < 1.5  # nvJPEG's IDCT differs slightly from libjpeg-turbo's


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_autoaugment_jitter_and_random_filter_change_pixels_and_repeat_exactly(tmp_path, backend):
    """ResNeSt's and timm's train ingredients on each backend: they change the batches, and the
    same seed and epoch give the same pixels (what exact resume relies on)."""
    make_photo_folder(tmp_path, (5, 4))
    plain = make_cfg(tmp_path, backend)
    augmented = make_cfg(tmp_path, backend, autoaugment="original", color_jitter=0.4,
                         train_interpolation="random")

    def epoch(loader):
        loader.set_epoch(1)
        return collect(loader)

    loader, _ = build_loaders(augmented, TRESNET, World(), CPU)
    base, once, again = epoch(build_loaders(plain, TRESNET, World(), CPU)[0]), epoch(loader), epoch(loader)
    assert len(base) == len(once) == 2
    for (a, ta), (b, tb), (c, tc) in zip(base, once, again):
        assert torch.equal(ta, tb) and torch.equal(tb, tc)
        assert torch.equal(b, c)
        assert (a - b).abs().mean() > 1 / 255  # well beyond a rounding difference


def test_torch_random_train_interpolation_is_bilinear_or_bicubic_per_image():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from tresnet_train.data.transforms import train_transform
    pre = Preprocess(24, 24, 0.875, "bilinear", (0, 0, 0), (1, 1, 1), (0.3, 1.0), 0.0, "",
                     train_interpolation="random")
    crop = train_transform(pre).transforms[0]
    img = photo(70, 50, 3)
    used = set()
    for seed in range(12):
        random.seed(seed)
        out = np.asarray(crop(img))
        random.seed(seed)
        box = crop.get_params(img, crop.scale, crop.ratio)
        matches = [mode for mode in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
                   if np.array_equal(out, np.asarray(TF.resized_crop(img, *box, [24, 24], mode)))]
        assert len(matches) == 1
        used.add(matches[0])
    assert len(used) == 2


@needs_dali
def test_dali_random_train_interpolation_is_linear_or_cubic_per_image():
    from nvidia.dali import fn, pipeline_def, types

    from tresnet_train.data.dali_backend import _Dali, _train_interp
    d = _Dali(CPU, 1, [], largest=False)
    image = np.asarray(photo(70, 50, 5))

    @pipeline_def(batch_size=16, num_threads=1, device_id=None, seed=3)
    def pipe():
        images = fn.external_source(source=lambda: [image] * 16, layout="HWC", batch=True)
        size = dict(size=[24, 24], antialias=True)
        return (fn.resize(images, interp_type=_train_interp(d, "random"), **size),
                fn.resize(images, interp_type=types.INTERP_LINEAR, **size),
                fn.resize(images, interp_type=types.INTERP_CUBIC, **size))

    p = pipe()
    p.build()
    rand, linear, cubic = (np.array(out.as_tensor()) for out in p.run())
    is_linear = [np.array_equal(r, linear[0]) for r in rand]
    is_cubic = [np.array_equal(r, cubic[0]) for r in rand]
    assert not np.array_equal(linear[0], cubic[0])
    assert all(a != b for a, b in zip(is_linear, is_cubic))  # each image: exactly one of the two
    assert any(is_linear) and any(is_cubic)
