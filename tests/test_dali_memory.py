"""DALI's decoder memory: buffers sized from the data, one train pipeline alive, per-rank figure.

nvJPEG preallocates per decoder thread one device buffer and two pinned ones of the paddings' sizes
(GPU only). The sizing, what a (mocked) GPU pipeline would be given, and the start-up line run on
CPU; the live-pipeline count runs the CPU DALI pipeline through epoch boundaries.
"""
from __future__ import annotations

import logging
import weakref

import pytest
import torch

from data_helpers import make_photo_folder, photo
from tresnet_train.config import Config
from tresnet_train.data import build_loaders
from tresnet_train.data import dali_backend
from tresnet_train.data.dali_backend import (dali_available, decoder_padding, preallocation,
                                             sample_pixels)
from tresnet_train.distributed import World

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
MIB = 2 ** 20
TRESNET = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear",
           "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
GPU = torch.device("cuda", 0)  # only named: nothing here touches CUDA until a pipeline is built


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRESNET_TRAIN_CACHE", str(tmp_path / "cache"))


def make_cfg(root, **data) -> Config:
    cfg = Config()
    cfg.data.root, cfg.data.backend = str(root), "dali"
    cfg.data.img_size, cfg.data.batch_size, cfg.data.workers = 32, 4, 2
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def sized_folder(root, train_sizes, val_sizes):
    """One class of photos of the given (width, height) in train/ and val/."""
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        folder = root / split / "c0"
        folder.mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            photo(w, h, seed=i).save(folder / f"{i}.JPEG", quality=90)
    return root


def test_padding_is_bytes_per_pixel_of_the_image_rounded_up_to_mib():
    assert decoder_padding(0) == (0, 0)
    assert decoder_padding(500 * 375) == (2 * MIB, 1 * MIB)  # ImageNet's typical size: 1.1, 0.75 MB
    # The largest ImageNet image NVIDIA's paddings were measured for needs them, and not much more.
    device, pinned = decoder_padding(5980 * 6430)
    assert 211025920 <= device < 1.1 * 211025920 and 140544512 <= pinned < 1.1 * 140544512


def test_preallocation_counts_one_device_and_two_pinned_buffers_per_thread():
    nvidia = (211025920, 140544512)
    # The figures: 8 threads, train + next-epoch train + val pipelines with NVIDIA's
    # paddings were ~5 GB of GPU memory per rank and ~54 GB pinned per 8-GPU node.
    gpu, pinned = preallocation(8, nvidia, nvidia, nvidia)
    assert round(gpu / 1e9, 1) == 5.1 and round(8 * pinned / 1e9) == 54
    assert preallocation(8, (2 * MIB, MIB)) == (16 * MIB, 16 * MIB)
    assert preallocation(3) == (0, 0)


def test_sample_reads_headers_spread_over_the_list(tmp_path, monkeypatch):
    paths = []
    for i, (w, h) in enumerate([(40, 30), (64, 48), (50, 20), (33, 33), (80, 10), (16, 16)]):
        photo(w, h, seed=i).save(tmp_path / f"{i}.JPEG")
        paths.append(str(tmp_path / f"{i}.JPEG"))
    (tmp_path / "bad.JPEG").write_bytes(b"not an image")
    assert sample_pixels(paths + [str(tmp_path / "bad.JPEG")], threads=2) == sorted(
        [0, 1200, 3072, 1000, 1089, 800, 256])
    monkeypatch.setattr(dali_backend, "_SIZE_SAMPLE", 3)
    assert sample_pixels(paths, threads=2) == sorted([1200, 1000, 800])  # files 0, 2 and 4


@needs_dali
def test_gpu_pipelines_get_paddings_sized_from_their_split_val_smaller(tmp_path, caplog,
                                                                     monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    root = sized_folder(tmp_path, [(64, 48)] * 6 + [(640, 480)], [(64, 48)] * 4 + [(320, 240)])
    cfg = make_cfg(root)
    with caplog.at_level(logging.INFO, logger="tresnet_train.data.build"):
        train, val = build_loaders(cfg, TRESNET, World(), GPU)
    assert train.padding == decoder_padding(640 * 480)  # the largest train image
    assert val.padding == decoder_padding(64 * 48)  # the median val image
    assert val.padding < train.padding
    kwargs = train._d.decoder_kwargs()
    assert kwargs["device"] == "mixed"
    assert (kwargs["device_memory_padding"], kwargs["host_memory_padding"]) == train.padding
    assert (val._d.decoder_kwargs()["device_memory_padding"],
            val._d.decoder_kwargs()["host_memory_padding"]) == val.padding
    gpu, pinned = preallocation(cfg.data.workers, train.padding, val.padding)
    assert gpu == 2 * (2 * MIB + 1 * MIB) and pinned == 2 * 2 * (2 * MIB + 1 * MIB)
    assert f"DALI preallocates per rank: {gpu // MIB} MiB GPU + {pinned // MIB} MiB pinned host" \
        in caplog.text


@needs_dali
def test_cpu_pipelines_preallocate_nothing(tmp_path, caplog):
    make_photo_folder(tmp_path, (3, 2))
    with caplog.at_level(logging.INFO, logger="tresnet_train.data.build"):
        train, val = build_loaders(make_cfg(tmp_path), TRESNET, World(), torch.device("cpu"))
    assert train.padding == val.padding == (0, 0)
    assert train._d.decoder_kwargs() == {"device": "cpu"}
    assert "DALI preallocates per rank: none on CPU" in caplog.text


@needs_dali
def test_one_train_pipeline_alive_through_epoch_boundaries(tmp_path, monkeypatch):
    """Every pipeline the train loader builds finds the previous one already released."""
    make_photo_folder(tmp_path, (5, 4))  # 9 images: 2 steps of 4 per epoch
    built, alive_at_build = [], []

    def tracking(make):
        def wrapper(*args, **kwargs):
            alive_at_build.append(sum(ref() is not None for ref in built))
            pipe = make(*args, **kwargs)
            built.append(weakref.ref(pipe))
            return pipe
        return wrapper

    monkeypatch.setattr(dali_backend, "_train_pipeline", tracking(dali_backend._train_pipeline))
    monkeypatch.setattr(dali_backend, "_rebuild", tracking(dali_backend._rebuild))
    train, _ = build_loaders(make_cfg(tmp_path), TRESNET, World(), torch.device("cpu"))
    steps = []
    for epoch in range(3):
        steps.append(sum(1 for _ in train))
        assert train.epoch == epoch + 1
    assert steps == [2, 2, 2]
    assert alive_at_build == [0, 0, 0] and len(built) == 3  # one build per epoch
    # Mid-epoch stops and restarts also release the old pipeline first.
    next(iter(train))
    train.set_epoch(3, 1)
    assert sum(1 for _ in train) == 1
    assert alive_at_build == [0] * 5
