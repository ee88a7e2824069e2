"""The DALI train loader's resume state: its on-disk form, and the public path taken on a DALI
release whose internals were not verified (tresnet_train/data/dali_backend.py)."""
from __future__ import annotations

import io
import logging

import pytest
import torch

from data_helpers import make_photo_folder
from tresnet_train.config import Config
from tresnet_train.data import build_loaders
from tresnet_train.data import dali_backend
from tresnet_train.distributed import World

pytestmark = pytest.mark.skipif(not dali_backend.dali_available(),
                                reason="nvidia-dali is not installed")
CPU = torch.device("cpu")
TRESNET = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear",
           "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRESNET_TRAIN_CACHE", str(tmp_path / "cache"))


def _loader(root):
    cfg = Config()
    cfg.data.root, cfg.data.backend = str(root), "dali"
    cfg.data.img_size, cfg.data.batch_size, cfg.data.workers = 32, 4, 2
    cfg.data.randaugment = "rand-m9-mstd0.5-inc1"
    loader, _ = build_loaders(cfg, TRESNET, World(), CPU)
    loader.set_epoch(1)
    return loader


def _batches(loader, limit=None):
    out = []
    for images, targets in loader:
        out.append((images.clone(), targets.clone()))
        if len(out) == limit:
            break
    return out


def _through_disk(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_resumes(state: dict, root, full) -> None:
    resumed = _loader(root)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"], state["step"])
    rest = _batches(resumed)
    assert len(rest) == len(full) - state["step"]
    for (a, ta), (b, tb) in zip(rest, full[state["step"]:]):
        assert torch.equal(ta, tb) and torch.equal(a, b)


def _stopped_after_two_steps(tmp_path):
    """(every batch of an uninterrupted epoch, the state of a loader stopped after two, via disk)."""
    make_photo_folder(tmp_path, (9, 8))
    full = _batches(_loader(tmp_path))
    first = _loader(tmp_path)
    _batches(first, limit=2)
    return full, _through_disk(first.state_dict())


@pytest.mark.slow
def test_on_disk_form_is_plain_named_data_and_resumes(tmp_path):
    full, written = _stopped_after_two_steps(tmp_path)

    # The form checkpoints hold, field by field: a state dict built from these plain values (as
    # every checkpoint written so far holds them) resumes pixel-identically.
    assert set(written) == {"backend", "epoch", "step", "plan", "dali"}
    assert set(written["dali"]) == {"origin", "checkpoint"}
    assert written["dali"]["checkpoint"].dtype == torch.uint8
    stored = {"backend": "dali", "epoch": 1, "step": 2, "plan": dict(written["plan"]),
              "dali": {"origin": 0, "checkpoint": written["dali"]["checkpoint"].clone()}}
    _assert_resumes(stored, tmp_path, full)


@pytest.mark.slow
def test_unverified_dali_release_takes_the_public_path_with_the_same_batches(tmp_path,
                                                                             monkeypatch):
    full, state = _stopped_after_two_steps(tmp_path)

    calls = []
    monkeypatch.setattr(dali_backend, "dali_internals_verified", lambda: calls.append(1) or False)
    monkeypatch.setattr(dali_backend, "_rebuild", None)  # a private-path call would fail
    _assert_resumes(state, tmp_path, full)
    assert calls


def test_unverified_release_is_named_in_one_warning(monkeypatch, caplog):
    import nvidia.dali
    monkeypatch.setattr(nvidia.dali, "__version__", "99.1.0")
    dali_backend.dali_internals_verified.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=dali_backend.log.name):
            assert not dali_backend.dali_internals_verified()
            assert not dali_backend.dali_internals_verified()
    finally:
        dali_backend.dali_internals_verified.cache_clear()
    assert len(caplog.records) == 1
    assert "99.1.0" in caplog.text and "verified only for 2.4" in caplog.text
    monkeypatch.undo()  # the installed release is one of the verified ones
    assert dali_backend.dali_internals_verified()
    dali_backend.dali_internals_verified.cache_clear()
