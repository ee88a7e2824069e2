"""train.val_every > 1: validation runs on every N-th epoch and on the last, and only there."""
from __future__ import annotations

import json

import pytest

from trainer_helpers import tiny_overrides, train


@pytest.mark.slow
def test_validation_only_on_every_second_epoch_and_the_last(tmp_path, digits):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = train(tiny_overrides(out, digits, **{
        "train.epochs": 5, "train.steps_per_epoch": 2, "train.val_every": 2}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["epoch"] for r in val] == [2, 4, 5]
    assert [r["step"] for r in val] == [4, 8, 10]  # steps done at the end of those epochs
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 11))  # all trained
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/top1")] == [4, 8, 10]
    assert proc.stdout.count("val top-1") == 3
