"""The trainer end to end on CPU: outputs, exact resume after SIGKILL, signals, NaN, 2 processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from data_helpers import real_photos
from trainer_helpers import (ROOT, assert_same_weights, env, kill_run, load,
                             start_train, tiny_overrides, train, wait_for_step)


def test_run_writes_config_checkpoints_metrics_and_tensorboard(reference):
    out, proc = reference
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (out / "config.yaml").is_file()
    last, best = load(out / "last.pth"), load(out / "best.pth")
    assert last["global_step"] == 12 and last["epoch"] == 2 and last["step_in_epoch"] == 0
    assert last["config"]["model"]["name"] == "tresnet_tiny"
    assert {"model", "ema", "optimizer", "scaler", "loader", "classes"} <= last.keys()
    assert "rng" not in last  # every stream is reseeded from the step (data/plan.py)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # train.report auto with EMA on: best.pth ranks epochs by the EMA's top-1 alone (as timm
    # reports it), never by the higher of model and EMA; both are still logged every epoch.
    ema_top1 = [r["val_ema/top1"] for r in records if r["kind"] == "val"]
    assert best["best_source"] == best["best"]["source"] == "ema"
    assert best["best"]["top1"] == best["val"]["ema_top1"] == max(ema_top1)
    assert best["best"]["epoch"] == ema_top1.index(max(ema_top1))
    assert all("val/top1" in r for r in records if r["kind"] == "val")
    assert {r["kind"] for r in records} == {"train", "val"}
    assert all(0 <= r["val/top1"] <= 100 for r in records if r["kind"] == "val")
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/img_per_s", "val/top1", "val/top5", "val/loss",
            "val_ema/top1", "time/epoch_s"} <= tags
    assert [e.value for e in acc.Scalars("val/top1")] == pytest.approx(
        [r["val/top1"] for r in records if r["kind"] == "val"])
    assert "val top-1" in proc.stdout and "done: best top-1" in proc.stdout


def test_run_tells_progress_time_and_1_based_epochs(reference):
    out, proc = reference
    lines = proc.stdout.splitlines()
    assert any("epoch 1/2 [1/6]" in line for line in lines)  # the first step, whatever log_every
    assert any("(run 0:" in line for line in lines)  # the run's ETA beside the epoch's
    assert any("validating on 359 images" in line for line in lines)
    assert "wall time 0:" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_time_s"] > 0 and summary["best"]["epoch"] in (1, 2)
    assert f"epoch {summary['best']['epoch']})" in proc.stdout  # the done line and the file agree


def test_run_in_process_resumes_a_checkpoint_with_rng_states_and_restores_signal_handlers(
        tmp_path, digits, reference):
    """Older checkpoints also hold each rank's RNG states ("rng"); a resume ignores them. A run
    inside this process leaves the signal handlers as it found them."""
    from tresnet_train.config import load_config
    from tresnet_train.trainer import EXIT_OK, run

    ref_out, _ = reference
    out = tmp_path / "run"
    out.mkdir()
    old = load(ref_out / "last.pth")
    old["rng"] = [{"torch": torch.get_rng_state(), "python": None, "numpy": None, "cuda": None}]
    torch.save(old, out / "last.pth")

    def ours(signum, frame):
        pass

    before = signal.signal(signal.SIGINT, ours)
    try:
        assert run(load_config(ROOT / "configs" / "demo.yaml", tiny_overrides(out, digits))) == EXIT_OK
        assert signal.getsignal(signal.SIGINT) is ours
    finally:
        signal.signal(signal.SIGINT, before)
    summary = json.loads((out / "summary.json").read_text())
    reference_summary = json.loads((ref_out / "summary.json").read_text())
    assert summary["weights_sha256_per_rank"] == reference_summary["weights_sha256_per_rank"]


def _records_once(out) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for kind in ("train", "val"):
        steps = [r["step"] for r in records if r["kind"] == kind]
        assert steps == sorted(set(steps)), (kind, steps)
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(set(steps)), steps


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, digits, reference):
    ref_out, _ = reference
    out = tmp_path / "run"
    overrides = tiny_overrides(out, digits, **{"run.ckpt_every_steps": 1})
    proc = start_train(overrides)
    wait_for_step(out / "last.pth", 8, proc)  # mid-way through the second epoch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = train(overrides)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    assert_same_weights(load(out / "last.pth"), load(ref_out / "last.pth"))
    _records_once(out)  # steps logged after the checkpoint and again after the resume: once


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_and_exits_75_then_resumes(tmp_path, digits, reference, sig):
    ref_out, _ = reference
    out = tmp_path / "run"
    overrides = tiny_overrides(out, digits, **{"run.ckpt_every_steps": 1})
    proc = start_train(overrides)
    wait_for_step(out / "last.pth", 3, proc)
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=900) == 75, proc.stdout.read()
    assert "resume with run.resume=auto" in proc.stdout.read()
    resumed = train(overrides)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_weights(load(out / "last.pth"), load(ref_out / "last.pth"))


@pytest.mark.slow
def test_ctrl_c_checkpoints_in_one_line_exits_130_then_resumes_exactly(tmp_path, digits, reference):
    """Ctrl-C as a terminal sends it: to the whole process group, loader workers included."""
    ref_out, _ = reference
    out = tmp_path / "run"
    overrides = tiny_overrides(out, digits, **{"run.ckpt_every_steps": 1, "data.workers": 2})
    proc = start_train(overrides)
    wait_for_step(out / "last.pth", 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=900) == 130
    output = proc.stdout.read()
    assert output.count("Ctrl-C: writing a checkpoint") == 1 and "Traceback" not in output, output
    stopped = load(out / "last.pth")
    assert 0 < stopped["step_in_epoch"] < 6 or stopped["epoch"] > 0  # the partial epoch is kept
    resumed = train(overrides)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"step {stopped['step_in_epoch']}" in resumed.stdout and "last.pth" in resumed.stdout
    assert_same_weights(load(out / "last.pth"), load(ref_out / "last.pth"))


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_leaving_whole_checkpoints(tmp_path, digits):
    """The first Ctrl-C asks for a checkpoint, whose write hangs (a slow disk); the second one ends
    the run during that write, and the checkpoint on disk is still the previous, whole one."""
    out, marker = tmp_path / "run", tmp_path / "mid_write"
    proc = subprocess.Popen(
        [sys.executable, "tests/slow_checkpoint_train.py", str(marker), "3", "--config",
         "configs/demo.yaml", *tiny_overrides(out, digits, **{"run.ckpt_every_steps": 1})],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    lines = []  # read beside the run: the test must see the first Ctrl-C handled before the second
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    wait_for_step(out / "last.pth", 2, proc)  # the 3rd write will hang
    os.killpg(proc.pid, signal.SIGINT)
    deadline = time.time() + 900  # a hang guard, not a pace
    # Two SIGINTs that arrive before Python runs its handler count as one, so wait for the first
    # one's line as well as for the hanging write.
    while not (marker.exists() and any("Ctrl-C: writing a checkpoint" in line for line in lines)):
        assert proc.poll() is None and time.time() < deadline, "".join(lines)
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=900) == 130
    reader.join(timeout=900)  # it ends at the end of the output
    output = "".join(lines)
    assert "second Ctrl-C: exiting now" in output and "Traceback" not in output, output
    assert load(out / "last.pth")["global_step"] == 2  # the previous checkpoint, whole


@pytest.mark.slow
def test_nonfinite_loss_stops_with_step_keeps_last_good_checkpoint_and_resumes(tmp_path, digits):
    from tresnet_train.config import load_config
    from tresnet_train.trainer import NonFiniteLoss, Trainer

    out = tmp_path / "run"
    overrides = tiny_overrides(out, digits, **{"run.ckpt_every_steps": 1})
    trainer = Trainer(load_config(ROOT / "configs" / "demo.yaml", overrides))
    criterion, calls = trainer.parts.criterion, []

    def nan_at_step_5(logits, targets):  # the 6th step's loss is NaN
        calls.append(1)
        loss = criterion(logits, targets)
        return loss * float("nan") if len(calls) == 6 else loss

    trainer.parts.criterion = nan_at_step_5
    with pytest.raises(NonFiniteLoss, match="at global step 5 "):
        trainer.fit()
    trainer.close()
    kept = load(out / "last.pth")
    assert kept["global_step"] == 5
    assert all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())
    resumed = train(overrides)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and load(out / "last.pth")["global_step"] == 12


@pytest.mark.slow
def test_two_processes_match_and_resume_exactly(tmp_path, digits):
    """torchrun --nproc_per_node=2 on gloo: both ranks end identical; SIGKILL + resume is exact."""
    ref = tmp_path / "ref"
    check = ["run.ckpt_every_steps=1"]
    proc = train(tiny_overrides(ref, digits) + check, nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout
    prints = json.loads((ref / "summary.json").read_text())["weights_sha256_per_rank"]
    assert len(prints) == 2 and prints[0] == prints[1]

    out = tmp_path / "killed"
    running = start_train(tiny_overrides(out, digits) + check, nproc=2)
    wait_for_step(out / "last.pth", 7, running)
    kill_run(running)
    killed_at = load(out / "last.pth")["global_step"]
    resumed = train(tiny_overrides(out, digits) + check, nproc=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"at epoch 2, step {killed_at - 6}" in resumed.stdout  # resumed mid-epoch, not finished
    assert_same_weights(load(out / "last.pth"), load(ref / "last.pth"))


@pytest.mark.slow
def test_ctrl_c_under_the_launcher_is_one_line_and_exit_130_on_two_processes(tmp_path, digits):
    """scripts/slurm/launch.py (torchrun's arguments) passes Ctrl-C on: both ranks checkpoint at the
    same step, the launcher exits 130 without a traceback, and the run resumes from that step."""
    out = tmp_path / "run"
    overrides = tiny_overrides(out, digits, **{"run.ckpt_every_steps": 1})
    command = [sys.executable, "scripts/slurm/launch.py", "--standalone", "--nproc_per_node=2",
               "train.py", "--config", "configs/demo.yaml", *overrides]
    proc = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_step(out / "last.pth", 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the launcher's group, not the workers'
    assert proc.wait(timeout=900) == 130
    output = proc.stdout.read()
    assert output.count("Ctrl-C: writing a checkpoint") == 1 and "Traceback" not in output, output
    stopped = load(out / "last.pth")
    resumed = train(overrides, nproc=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"step {stopped['step_in_epoch']}" in resumed.stdout


@pytest.mark.slow
def test_validation_counts_each_image_once_with_two_processes(tmp_path, digits, reference):
    """An odd-sized val set: top-1 with 2 processes equals top-1 with 1 (no padded duplicates)."""
    ref_out, _ = reference
    script = ROOT / "tests" / "eval_checkpoint.py"
    results = {}
    for nproc in (1, 2):
        cmd = ([sys.executable] if nproc == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}"])
        proc = subprocess.run(cmd + [str(script), str(ref_out / "last.pth"), str(digits),
                                     str(tmp_path / f"eval{nproc}.json")],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results[nproc] = json.loads((tmp_path / f"eval{nproc}.json").read_text())
    assert results[1]["num_images"] % 2 == 1  # odd: a padded duplicate would show
    one, two = results[1], results[2]
    assert (one["num_images"], one["top1"], one["top5"]) == (two["num_images"], two["top1"], two["top5"])
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)  # float32 sums in another order


@pytest.mark.slow
def test_real_photos_loss_falls_and_top1_beats_chance(tmp_path):
    out = tmp_path / "run"
    proc = train(["model.name=tresnet_tiny", "model.num_classes=10", "data.source=folder",
                  f"data.root={real_photos('imagenette-mini-96')}", "data.backend=torch",
                  "data.img_size=64", "data.batch_size=25", "data.workers=2", "data.hflip=0.5",
                  "data.scale=[0.35,1.0]", "train.epochs=6", "optim.lr=0.2",
                  "optim.schedule=onecycle", "train.ema=false", f"run.output_dir={out}",
                  "run.device=cpu", "run.log_every=4"], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if r["kind"] == "train"]
    top1 = [r["val/top1"] for r in records if r["kind"] == "val"]
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses
    assert max(top1) > 20.0, top1  # chance is 10%


@pytest.mark.slow
def test_a_warmup_as_long_as_the_run_and_too_many_workers_are_said_once(tmp_path, digits):
    proc = train(tiny_overrides(tmp_path / "run", digits, **{
        "train.epochs": 1, "train.steps_per_epoch": 2, "optim.schedule": "cosine",
        "optim.warmup_epochs": 1,
        "data.workers": 999}))
    assert proc.returncode == 0, proc.stderr
    assert "optim.warmup_epochs=1 is not shorter than train.epochs=1" in proc.stdout
    assert proc.stdout.count(f"data.workers=999 is more than the {len(os.sched_getaffinity(0))} "
                             f"CPU(s) available") == 1
