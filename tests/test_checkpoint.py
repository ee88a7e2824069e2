"""Checkpoint files: one write per epoch end with hard links, cheap checks, resume choice."""
from __future__ import annotations

import errno

import pytest
import torch

from trainer_helpers import ROOT, load, tiny_overrides
from tresnet_train import checkpoint


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "global_step": step}


def test_a_link_keeps_the_old_file_when_the_source_is_replaced(tmp_path):
    last, best = tmp_path / "last.pth", tmp_path / "best.pth"
    checkpoint.save_atomic(_state(1), last)
    checkpoint.link_atomic(last, best)
    assert best.stat().st_ino == last.stat().st_ino
    checkpoint.save_atomic(_state(2), last)  # renamed over last.pth: best.pth keeps the old inode
    assert best.stat().st_ino != last.stat().st_ino
    assert checkpoint.load(best)["global_step"] == 1 and checkpoint.load(last)["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "last.pth"]  # no temp files


def test_without_hard_links_a_copy_is_made_with_the_same_mtime(tmp_path, monkeypatch):
    last, best = tmp_path / "last.pth", tmp_path / "best.pth"
    checkpoint.save_atomic(_state(3), last)

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(checkpoint.os, "link", no_links)
    checkpoint.link_atomic(last, best)
    assert best.stat().st_ino != last.stat().st_ino
    assert best.read_bytes() == last.read_bytes()
    assert best.stat().st_mtime_ns == last.stat().st_mtime_ns
    assert checkpoint.find_resume(tmp_path) == last  # a tie, and last.pth wins it


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_the_cheap_check_still_refuses_a_truncated_file(tmp_path, keep):
    path = tmp_path / "last.pth"
    checkpoint.save_atomic({"model": {"w": torch.randn(1000)}, "global_step": 1}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert not checkpoint.is_readable(path)


def test_epoch_ends_write_once_and_link_best_and_top_k(tmp_path, digits, monkeypatch):
    from tresnet_train.config import load_config
    from tresnet_train.trainer import Trainer

    out = tmp_path / "run"
    trainer = Trainer(load_config(ROOT / "configs" / "demo.yaml", tiny_overrides(
        out, digits, **{"run.keep_top_k": 2, "train.ema": False})))
    real_save, saves = checkpoint.torch.save, []
    monkeypatch.setattr(checkpoint.torch, "save", lambda obj, f: (saves.append(1), real_save(obj, f)))
    last, best, top = out / "last.pth", out / "best.pth", out / "top"

    def epoch_end(epoch, top1):
        trainer.end_of_epoch_checkpoints(epoch, {"model": {"top1": top1, "top5": 100.0, "loss": 1.0}})

    try:
        epoch_end(0, 50.0)  # improves: last, best and top/epoch_0001 (1-based) are one file
        assert len(saves) == 1
        assert best.stat().st_ino == last.stat().st_ino == (top / "epoch_0001.pth").stat().st_ino
        assert checkpoint.find_resume(out) == last  # the three tie on mtime: last.pth wins
        trainer.save(1, 3)  # mid-epoch: a new last.pth renamed over the old name
        assert best.stat().st_ino != last.stat().st_ino
        assert load(best)["global_step"] == trainer.steps and load(best)["topk"] == [[50.0, 0]]
        assert load(last)["global_step"] == trainer.steps + 3
        assert checkpoint.find_resume(out) == last

        epoch_end(1, 40.0)  # no better, but second of two: a top-k link, best.pth untouched
        epoch_end(2, 45.0)  # pushes epoch 1 out of the top 2
        assert len(saves) == 4
        assert sorted(p.name for p in top.iterdir()) == ["epoch_0001.pth", "epoch_0003.pth"]
        assert (top / "epoch_0003.pth").stat().st_ino == last.stat().st_ino != best.stat().st_ino
        assert load(last)["topk"] == [[50.0, 0], [45.0, 2]]
        assert load(best)["best"]["epoch"] == 0
    finally:
        trainer.close()
