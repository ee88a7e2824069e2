"""Faults injected on purpose: kills (one mid checkpoint write), two runs on one folder, full disk,
bad configs, untrusted files, fp16 overflow, a failing rank. Each must lose nothing and say clearly
what happened."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from data_helpers import real_photos
from trainer_helpers import (NO_STDERR_FD, ROOT, assert_same_weights, env, kill_run, load,
                             main_in_process, start_train, tiny_overrides, train, wait_for_step)
from tresnet_train import checkpoint
from tresnet_train.cli import train_main
from tresnet_train.run_lock import LOCK_NAME


def _readable_or_absent(path):
    return not path.exists() or checkpoint.is_readable(path)


@pytest.mark.slow
def test_kill_at_three_points_one_mid_write_ends_identical(tmp_path, digits, reference):
    out = tmp_path / "run"
    overrides = tiny_overrides(out, digits, **{"run.ckpt_every_steps": 1})
    # 1) mid-epoch, 2) right after an epoch boundary, 3) inside a checkpoint write (slowed down so
    # the kill lands between the first and second half of the bytes).
    for step in (3, 7):
        proc = start_train(overrides)
        wait_for_step(out / "last.pth", step, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert checkpoint.is_readable(out / "last.pth")
    marker = tmp_path / "mid_write"
    proc = subprocess.Popen([sys.executable, "tests/slow_checkpoint_train.py", str(marker), "3",
                             "--config", "configs/demo.yaml", *overrides], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 900  # a hang guard, not a pace
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(out.glob(".*.tmp")), "the kill should have left a partial temp file"
    assert checkpoint.is_readable(out / "last.pth")  # the previous one, whole
    assert all(_readable_or_absent(p) for p in out.rglob("*.pth"))
    resumed = train(overrides)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "taking over the run lock" in resumed.stdout and "its process is dead" in resumed.stdout
    assert_same_weights(load(out / "last.pth"), load(reference.out / "last.pth"))


@pytest.mark.slow
def test_second_run_on_a_busy_folder_is_refused_and_the_first_is_untouched(tmp_path, digits,
                                                                            reference):
    out, ready, go = tmp_path / "run", tmp_path / "ready", tmp_path / "go"
    overrides = tiny_overrides(out, digits)
    first = subprocess.Popen([sys.executable, "tests/gated_train.py", str(ready), str(go),
                              "--config", "configs/demo.yaml", *overrides], cwd=ROOT, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 900  # a hang guard, not a pace
        while not ready.exists():
            assert first.poll() is None, first.stdout.read()
            assert time.time() < deadline
            time.sleep(0.05)
        second = train(overrides)
        assert second.returncode == 2, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"run folder {out} is in use by another run (pid {first.pid} on " \
            f"host {socket.gethostname()}" in lines[0] and "choose another run.output_dir" in lines[0], \
            second.stderr
    finally:
        go.touch()
        stdout, _ = first.communicate(timeout=900)
    assert first.returncode == 0, stdout
    assert_same_weights(load(out / "last.pth"), load(reference.out / "last.pth"))
    records = (out / "metrics.jsonl").read_text().splitlines()
    assert len(records) == len((reference.out / "metrics.jsonl").read_text().splitlines())
    assert not (out / LOCK_NAME).exists()  # handed back at the end


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    checkpoint.save_atomic({"model": {"w": torch.ones(3)}, "global_step": 1}, path)

    def full_disk_save(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_save)
    with pytest.raises(checkpoint.CheckpointError, match="disk full .* previous checkpoint there is intact"):
        checkpoint.save_atomic({"model": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind


def test_a_write_that_torch_reports_as_unexpected_pos_is_a_disk_error(tmp_path, monkeypatch):
    """torch's zip writer turns a full disk into `RuntimeError: [enforce fail ...] unexpected pos`;
    the checkpoint writer still names it, with the bytes, and leaves the previous file."""
    path = tmp_path / "last.pth"
    checkpoint.save_atomic({"model": {"w": torch.ones(3)}, "global_step": 1}, path)
    real_fdopen = os.fdopen

    class FullAfter4KiB:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written + len(data) > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: FullAfter4KiB(real_fdopen(fd, mode)))
    with pytest.raises(checkpoint.CheckpointWriteError) as raised:
        checkpoint.save_atomic({"model": {"w": torch.zeros(100_000)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert str(raised.value).startswith(f"disk full while writing checkpoint {path}: 400,000 bytes "
                                        f"attempted, ")
    assert "bytes free in" in str(raised.value) and "\n" not in str(raised.value)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(megabytes)`: a fresh tmpfs of that size (needs root: skipped otherwise)."""
    mounts = []

    def mount(megabytes: int):
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs",
                               str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); "
                        f"test_a_write_that_torch_reports_as_unexpected_pos_is_a_disk_error "
                        f"injects the same fault")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_a_run_folder_too_small_for_its_checkpoints_fails_at_start(small_disk, digits):
    disk = small_disk(12)  # tresnet_tiny's checkpoint is ~6 MB; last + best + the next need 3
    proc = train(tiny_overrides(disk / "run", digits))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: run.output_dir {disk / 'run'} has "
                                                   f"12,5"), proc.stderr
    assert "bytes free but this run's checkpoints need about 18," in lines[0]
    assert "(3 files of 6," in lines[0] and "lower run.keep_top_k" in lines[0]


@pytest.mark.slow
def test_disk_full_mid_run_ends_with_one_line_and_keeps_the_last_checkpoint(tmp_path, small_disk,
                                                                            digits):
    disk = small_disk(24)
    out, ready, go = disk / "run", tmp_path / "ready", tmp_path / "go"
    run = subprocess.Popen([sys.executable, "tests/gated_train.py", str(ready), str(go), "--config",
                            "configs/demo.yaml", *tiny_overrides(out, digits, **{
                                "run.ckpt_every_steps": 1})],
                           cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.time() + 900  # a hang guard, not a pace
    while not ready.exists():
        assert run.poll() is None and time.time() < deadline, run.communicate()
        time.sleep(0.05)
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * (free - 9_000_000))  # room for 1.5 checkpoints
    go.touch()
    stdout, stderr = run.communicate(timeout=900)
    assert run.returncode == 1, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: disk full while writing checkpoint {out / 'last.pth'}: 5,"), stderr
    assert "bytes attempted, " in lines[0] and f"bytes free in {out}; the previous" in lines[0]
    assert load(out / "last.pth")["global_step"] == 1  # the first step's, whole
    assert not list(out.rglob("*.tmp")) and "Traceback" not in stdout + stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_training_files_that_vanish_mid_run_are_skipped_then_end_the_run(tmp_path, digits, backend):
    """Two training files deleted after indexing, with room for one (data.max_bad_fraction=0.001 of
    1,438 files): the first is skipped and named and training goes on; the second ends the run."""
    from tresnet_train.data import TrainPlan, index_split

    root, out, ready, go = tmp_path / "digits", tmp_path / "run", tmp_path / "ready", tmp_path / "go"
    shutil.copytree(digits, root)
    samples = index_split(root, "train", verify=False).samples
    order = TrainPlan(len(samples), 16, 1, 0, seed=7).rank_indices(0)  # tiny_overrides' plan
    first, second = (samples[order[k]][0] for k in (20, 90))  # read at steps 2 and 6 (1-based)
    run = subprocess.Popen(
        [sys.executable, "tests/gated_train.py", str(ready), str(go), "--config", "configs/demo.yaml",
         *tiny_overrides(out, root, **{"data.source": "folder", "data.backend": backend,
                                       "data.max_bad_fraction": 0.001})],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900  # a hang guard, not a pace
    while not ready.exists():
        assert run.poll() is None and time.time() < deadline, run.communicate()
        time.sleep(0.05)
    os.unlink(first)
    os.unlink(second)
    go.touch()
    stdout, stderr = run.communicate(timeout=900)
    assert run.returncode == 2, stdout + stderr
    assert f"skipping training file {first} (FileNotFoundError" in stdout
    assert "failed after indexing (deleted, unreadable or corrupt); 1 of 1438 skipped so far, up to " \
           "1 allowed" in stdout
    if backend == "dali":  # its reader stopped at the file: the pipeline was rebuilt without it
        assert "DALI: rebuilding the epoch 1 pipeline at step 1 without the skipped" in stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 4], steps  # trained on past the first file
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: 2 of 1438 training files failed after indexing, more than "
        "data.max_bad_fraction=0.001 allows (1); the last: " + second), stderr


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"model": _Payload(marker), "global_step": 0}, f)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load"):
        checkpoint.load(evil)
    (tmp_path / "run").mkdir()
    os.replace(evil, tmp_path / "run" / "last.pth")
    assert checkpoint.find_resume(tmp_path / "run") is None  # skipped, not loaded
    assert not marker.exists()


@NO_STDERR_FD
@pytest.mark.parametrize("overrides, needle", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean lr"),
    (["optim.lr=abc"], "config key 'optim.lr': expected float"),
    (["optim.lr=-1"], "config key 'optim.lr': must be > 0"),
    (["data.batch_size=-8"], "config key 'data.batch_size': must be > 0"),
    (["data.source=folder", "data.root=/nonexistent/imagenet"], "config key 'data.root'"),
    (["model.name=tresnet_mm"], "Did you mean 'tresnet_m'"),
    (["data.source=folder", "data.root=REAL_MINI", "model.num_classes=1000"],
     "model.num_classes' is 1000 but"),
])
def test_bad_configs_fail_fast_with_exit_2(tmp_path, overrides, needle, capsys):
    """train.py's main in this process (test_config.py runs train.py itself on a bad config)."""
    if any("REAL_MINI" in o for o in overrides):
        overrides = [o.replace("REAL_MINI", str(real_photos("imagenette-mini-96"))) for o in overrides]
    proc = main_in_process(train_main, ["--config", str(ROOT / "configs" / "demo.yaml"),
                                        f"run.output_dir={tmp_path / 'run'}", *overrides], capsys)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()  # failed before anything was started


@NO_STDERR_FD
def test_base_cycle_fails_fast(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    proc = main_in_process(train_main, ["--config", str(tmp_path / "a.yaml")], capsys)
    assert proc.returncode == 2 and "cycle" in proc.stderr


@pytest.mark.slow
def test_fp16_overflow_is_absorbed_by_the_scaler(tmp_path, digits):
    from tresnet_train.config import load_config
    from tresnet_train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      tiny_overrides(tmp_path / "run", digits, **{"train.amp": "fp16",
                                                                  "train.epochs": 1}))
    trainer = Trainer(cfg)
    scaler = trainer.precision.scaler
    assert scaler.is_enabled()
    scaler._init_scale = 2.0 ** 100  # the first steps' fp16 gradients overflow to inf
    assert trainer.fit() == 0
    trainer.close()
    assert scaler.get_scale() < 2.0 ** 100  # overflowing steps were skipped and the scale backed off
    final = load(tmp_path / "run" / "last.pth")
    assert all(torch.isfinite(t).all() for t in final["model"].values() if t.is_floating_point())


@pytest.mark.slow
def test_ranks_resume_together_from_rank_0s_choice(tmp_path, digits):
    """Rank 1 cannot read the newest checkpoint: it still resumes where rank 0 does, or fails loudly."""
    out = tmp_path / "run"
    overrides = tiny_overrides(out, digits, **{"run.ckpt_every_steps": 1})
    running = start_train(overrides, nproc=2)
    wait_for_step(out / "last.pth", 8, running)
    kill_run(running)
    newest = load(out / "last.pth")["global_step"]
    assert newest > load(out / "best.pth")["global_step"] == 6  # an older file to fall back to

    def resume(mode):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "tests/unreadable_newest_train.py", mode, "--config", "configs/demo.yaml", *overrides],
            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)

    unreadable = resume("load")  # rank 1 cannot load the file rank 0 chose: an error, no fallback
    assert unreadable.returncode != 0
    assert f"rank 1 cannot read {out / 'last.pth'}" in unreadable.stdout + unreadable.stderr
    assert load(out / "last.pth")["global_step"] == newest

    resumed = resume("check")  # rank 1's own check would have skipped last.pth
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    lines = sorted(line for line in resumed.stdout.splitlines() if "resumed at global step" in line)
    assert lines == [f"rank {r} resumed at global step {newest}" for r in (0, 1)], resumed.stdout
    prints = json.loads((out / "summary.json").read_text())["weights_sha256_per_rank"]
    assert len(prints) == 2 and prints[0] == prints[1]


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_with_its_error(tmp_path, digits):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "tests/failing_rank_train.py", "--config", "configs/demo.yaml",
         *tiny_overrides(tmp_path / "run", digits)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)  # a hang guard
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 3" in proc.stdout + proc.stderr
