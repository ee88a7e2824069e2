"""run.resume: a named checkpoint file continues that run, `none` starts afresh beside a checkpoint,
another steps-per-epoch is refused with exit 2, another world size is a warning and training goes on.

Every run starts from the shared reference run (conftest.py), 2 epochs of 6 steps."""
from __future__ import annotations

import json
import shutil

import pytest

from trainer_helpers import assert_same_weights, load, tiny_overrides, train


def train_records(out) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


@pytest.mark.slow
def test_a_named_file_continues_its_run_as_auto_does_in_the_runs_folder(tmp_path, digits, reference):
    """run.resume=<path> in an empty folder trains exactly what run.resume=auto trains in the
    folder the file came from: a third epoch, from the file's weights, optimizer and data order."""
    ckpt = reference.out / "last.pth"
    named = tmp_path / "named"
    proc = train(tiny_overrides(named, digits, **{"run.resume": ckpt, "train.epochs": 3}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resumed from {ckpt} at epoch 3, step 0" in proc.stdout
    assert [r["step"] for r in train_records(named)] == [13, 14, 16, 18]  # the third epoch only

    in_place = tmp_path / "in_place"
    shutil.copytree(reference.out, in_place)
    proc = train(tiny_overrides(in_place, digits, **{"train.epochs": 3}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resumed from {in_place / 'last.pth'} at epoch 3, step 0" in proc.stdout

    last = load(named / "last.pth")
    assert (last["epoch"], last["global_step"]) == (3, 18)
    assert_same_weights(last, load(in_place / "last.pth"))


@pytest.mark.slow
def test_none_starts_a_fresh_run_in_a_folder_that_has_a_checkpoint(tmp_path, digits, reference):
    """The folder holds the finished run: auto would find nothing left to train; none trains it
    again from step 0 and, with the same seed, ends on the same weights."""
    out = tmp_path / "run"
    shutil.copytree(reference.out, out)
    proc = train(tiny_overrides(out, digits, **{"run.resume": "none"}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"starting a fresh run in {out}" in proc.stdout and "resumed from" not in proc.stdout
    assert "epoch 1/2 [1/6]" in proc.stdout
    last = load(out / "last.pth")
    assert (last["epoch"], last["global_step"]) == (2, 12)
    assert_same_weights(last, load(reference.out / "last.pth"))


@pytest.mark.slow
def test_another_steps_per_epoch_is_refused_with_exit_2(tmp_path, digits, reference):
    ckpt, out = reference.out / "last.pth", tmp_path / "run"
    proc = train(tiny_overrides(out, digits, **{"run.resume": ckpt, "train.steps_per_epoch": 5}))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"config error: cannot resume from {ckpt}: it has 6 steps per epoch, this run 5 (batch size, "
        f"world size or data changed); use run.resume=none or a new run.output_dir"]
    assert not (out / "last.pth").exists()


@pytest.mark.slow
def test_another_world_size_warns_and_trains_on(tmp_path, digits, reference):
    """Two processes from the one-process reference: the steps per epoch stay 6 (train.steps_per_epoch
    caps both), so the resume is allowed; the data order of the resumed epoch is new, and it says so."""
    out = tmp_path / "run"
    proc = train(tiny_overrides(out, digits, **{"run.resume": reference.out / "last.pth",
                                                "train.epochs": 3}), nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    assert output.count("resuming with world size 2 from a 1-process checkpoint") == 1, output
    last = load(out / "last.pth")
    assert (last["epoch"], last["global_step"], last["world_size"]) == (3, 18, 2)
