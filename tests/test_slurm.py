"""The SLURM job scripts (scripts/slurm/) on a real one-node SLURM cluster, with the real train.py.

tests/slurm_cluster.py brings up munge + slurmctld + slurmd (Debian slurm-wlm 22.05, installed with apt
when missing and we are root) in a fresh folder with free ports, and stops them by PID at the end. The
scripts are submitted unchanged; the "CPU overrides" are sbatch options (--cpus-per-task=2, --time,
--signal), environment (NPROC_PER_NODE, PYTHON) and trainer overrides (run.device=cpu, tiny digits
runs). The node declares 8 fake GPUs, so the scripts' `--gpus-per-node=8` is scheduled as written.

What is checked, each from SLURM's own record (`scontrol show job`) and the run folder:
  * a train job completes (ExitCode 0:0) and leaves its checkpoints and a copy of its log in the run folder;
  * a job stopped three times, by `scancel -b --signal=USR1` (what `--signal=B:USR1@T` delivers),
    `scancel --signal=TERM` (to the steps) and `scancel -b --signal=TERM`, checkpoints, requeues itself
    and resumes each time, and its final last.pth equals an uninterrupted run's, tensor for tensor;
  * a job whose time limit is shorter than the run is stopped by SLURM's own warning signal,
    requeues and finishes across several allocations;
  * train_multinode.sbatch trains with 2 ranks (torchrun rendezvous), survives a stop with both ranks
    exiting 75, and both ranks finish;
  * a bad config fails in seconds: JobState=FAILED, ExitCode=2:0;
  * validate.sbatch reproduces the top-1 the trainer logged and writes it to the run folder.

SLURM holds a requeued job ~2 min before it may start again; the tests release it 3 s after the requeue
(see `Cluster.wait`), which is the only thing they shorten.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from slurm_cluster import Cluster, ClusterUnavailable, ensure_installed

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "slurm"

# A tiny run on 2 CPU cores: digits at 32 px, tresnet_tiny, 2 epochs of 8 steps, validation at the end.
TINY = ["--config", "configs/demo.yaml", "run.device=cpu", "data.workers=0", "data.batch_size=16",
        "train.epochs=2", "train.steps_per_epoch=8", "train.val_every=100", "run.log_every=1",
        "run.tensorboard=false", "run.ckpt_every_steps=1"]
STEP_LINE = re.compile(r"^epoch (\d+)/\d+ \[(\d+)/\d+\]", re.M)


@pytest.fixture(scope="session")
def tiny() -> list[str]:
    """TINY: train.py seeds the model's initialisation with run.seed, so two runs compare tensor for
    tensor."""
    return list(TINY)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    try:
        ensure_installed()
    except ClusterUnavailable as e:
        pytest.skip(f"no SLURM cluster: {e}")
    if os.geteuid() != 0:
        pytest.skip("the one-node test cluster runs slurmd (and its jobs) as root; not root here")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def submit(cluster: Cluster, tmp: Path, script: str, *args: str, sbatch: tuple = (), nproc: int = 1) -> int:
    """sbatch a script from scripts/slurm/ with CPU overrides; the job's --output goes to `tmp`."""
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "REPO": str(REPO), "NPROC_PER_NODE": str(nproc)}
    return cluster.sbatch("--cpus-per-task=2", f"--output={tmp}/%x-%j.out", *sbatch,
                          str(SCRIPTS / script), *args, env=env, cwd=tmp)


def job_log(run_dir: Path, job_id: int) -> str:
    f = run_dir / f"slurm-{job_id}.out"
    return f.read_text(errors="replace") if f.exists() else ""


def wait_for(pred, timeout: float, what: str, cluster: Cluster, job_id: int, poll: float = 0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = pred()
        if value:
            return value
        state = cluster.job(job_id).get("JobState")
        if state in Cluster.FINAL:
            raise AssertionError(f"job {job_id} ended ({state}) while waiting for {what}")
        time.sleep(poll)
    raise TimeoutError(f"job {job_id}: no {what} after {timeout:.0f}s")


def steps_after(text: str, marker: str) -> int:
    """Training-step lines logged after the last occurrence of `marker`."""
    at = text.rfind(marker)
    return len(STEP_LINE.findall(text[at:])) if at >= 0 else 0


def assert_same_weights(a: Path, b: Path) -> None:
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert (ca["epoch"], ca["global_step"]) == (cb["epoch"], cb["global_step"])
    for part in ("model", "ema"):
        assert ca[part].keys() == cb[part].keys()
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), f"{part}.{k} differs"


@pytest.fixture(scope="module")
def reference(cluster, tiny, tmp_path_factory):
    """An uninterrupted train.sbatch run of TINY: (run folder, job record, seconds per step)."""
    tmp = tmp_path_factory.mktemp("reference")
    run = tmp / "run"
    t0 = time.monotonic()
    job = submit(cluster, tmp, "train.sbatch", *tiny, f"run.output_dir={run}")
    info = cluster.wait(job, timeout=300)
    sec_per_step = seconds_per_step(run)
    print(f"reference run: {time.monotonic() - t0:.0f}s, {sec_per_step:.2f} s/step")
    return run, job, info, sec_per_step


def test_train_job_completes(reference):
    run, job, info, _ = reference
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    ckpt = torch.load(run / "last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["world_size"]) == (2, 16, 1)
    assert (run / "best.pth").is_file() and (run / "config.yaml").is_file()
    log = job_log(run, job)
    assert "step exited with 0" in log and "done: best top-1" in log  # the trainer's log is in the run folder


def test_signals_checkpoint_requeue_and_resume(cluster, tiny, reference, tmp_path):
    """Three stops by three routes, three requeues, and the weights of an uninterrupted run."""
    ref_run = reference[0]
    run = tmp_path / "run"
    job = submit(cluster, tmp_path, "train.sbatch", *tiny, f"run.output_dir={run}")
    routes = [("--batch", "USR1"), (None, "TERM"), ("--batch", "TERM")]
    for start, (where, sig) in enumerate(routes):
        marker = f"job {job} start {start} "
        # trained at least one step in this start (after the resume, for start > 0)
        wait_for(lambda: steps_after(job_log(run, job), marker) >= 1, 120, f"a step in start {start}",
                 cluster, job)
        cluster.run("scancel", *([where] if where else []), f"--signal={sig}", str(job))
        # requeued (wait() releases SLURM's requeue hold) and running again
        info = cluster.wait(job, timeout=120, until=lambda i: i.get("JobState") in Cluster.FINAL or (
            i.get("JobState") == "RUNNING" and int(i.get("Restarts", 0)) == start + 1))
        assert info["JobState"] == "RUNNING", (sig, info, job_log(run, job)[-3000:])
    info = cluster.wait(job, timeout=300)
    log = job_log(run, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
    assert info["Restarts"] == "3"
    assert log.count("step exited with 75") == 3 and log.count("requeueing job") == 3
    assert "batch shell got SIGUSR1" in log and "batch shell got SIGTERM" in log
    assert len(re.findall(r"resumed from .*last\.pth", log)) == 3
    assert_same_weights(run / "last.pth", ref_run / "last.pth")


def seconds_per_step(run: Path) -> float:
    """Mean wall time of a training step (checkpoint I/O included) from the run's metrics.jsonl."""
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    rates = [r for r in (json.loads(line).get("train/img_per_s") for line in lines) if r]
    return sum(16 / r for r in rates) / len(rates) if rates else 1.0  # the mean: I/O is spiky


def test_time_limit_chain(cluster, tiny, reference, tmp_path):
    """--time=2 with the warning 60 s before: SLURM's own USR1 stops each allocation until the run ends.

    The run is sized to ~70 s of training at the last measured pace, plus ~10 s of start-up; SLURM's
    warning comes 30-60 s into an allocation (it checks every 30 s), so the first allocation is cut
    short. A shared machine can suddenly run faster; a run that then fits in one allocation proves
    nothing, so it is redone, longer, at the pace it just showed (at most twice)."""
    pace = reference[3]
    for attempt in range(3):
        total = math.ceil(70 / pace)
        epochs = math.ceil(total / 80)  # digits has 89 batches of 16 per epoch
        steps = math.ceil(total / epochs)
        run = tmp_path / f"run{attempt}"
        args = [*tiny, f"train.epochs={epochs}", f"train.steps_per_epoch={steps}", f"run.output_dir={run}"]
        job = submit(cluster, tmp_path, "train.sbatch", *args, sbatch=("--time=2", "--signal=B:USR1@60"))
        info = cluster.wait(job, timeout=420)
        log = job_log(run, job)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
        restarts = int(info["Restarts"])
        if restarts >= 1:
            break
        pace = seconds_per_step(run)
        print(f"time-limit chain: {epochs * steps} steps fit in one allocation; retrying at {pace:.2f} s/step")
    assert restarts >= 1, log[-3000:]
    # every stop came from SLURM's warning signal (the test sends none), and every start resumed
    assert log.count("batch shell got SIGUSR1") == restarts
    assert log.count("requeueing job") == restarts
    # (a warning that comes just after the last epoch restarts a finished run: it resumes, from last.pth
    # or the equally new best.pth, and ends at once)
    assert len(re.findall(r"resumed from \S+\.pth", log)) == restarts
    ckpt = torch.load(run / "last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (epochs, epochs * steps)


def test_multinode_script_two_ranks(cluster, tmp_path):
    """train_multinode.sbatch, 1 node x 2 trainers: rendezvous, a stop with both ranks exiting 75, resume."""
    run = tmp_path / "run"
    job = submit(cluster, tmp_path, "train_multinode.sbatch", *TINY, f"run.output_dir={run}",
                 sbatch=("--nodes=1",), nproc=2)
    wait_for(lambda: steps_after(job_log(run, job), f"job {job} start 0 ") >= 1, 180, "a step", cluster, job)
    cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    info = cluster.wait(job, timeout=300)
    log = job_log(run, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
    assert info["Restarts"] == "1"
    # Both ranks exit 75; one may be terminated by torchrun first while it finalizes (launch.py).
    assert re.search(r"workers exited with \{0: (75|-15), 1: (75|-15)\}; exit code 75", log), log[-3000:]
    assert "2 process(es)" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 16
    assert len(summary["weights_sha256_per_rank"]) == 2  # both ranks reached the end


def test_launcher_exit_code_keeps_a_stop_and_any_real_failure():
    sys.path.insert(0, str(SCRIPTS))
    try:
        from launch import exit_code
    finally:
        sys.path.remove(str(SCRIPTS))

    class Failure:
        def __init__(self, code):
            self.exitcode = code

    def code(*codes):
        return exit_code({rank: Failure(c) for rank, c in enumerate(codes)})

    assert code(75, 75) == 75
    assert code(-15, 75) == 75  # the agent terminated a rank still finalizing after its stop
    assert code(75, 1) == 1 and code(1, 75) == 1  # a crash is never read as a stop
    assert code(-15, -15) == 143  # terminated without any stop: not resumable by this rule
    assert code(-9, 75) == 137


def test_bad_config_fails_with_exit_code(cluster, tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    job = submit(cluster, tmp_path, "train.sbatch", *TINY, "optim.lrr=1", f"run.output_dir={run}")
    info = cluster.wait(job, timeout=120)
    log = job_log(run, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, log)
    assert info["Restarts"] == "0"
    assert "unknown config key 'optim.lrr'" in log
    assert time.monotonic() - t0 < 60


def test_validate_job(cluster, reference, tmp_path):
    from tresnet_train.data.digits import build_digits

    run = reference[0]
    job = submit(cluster, tmp_path, "validate.sbatch", "--ckpt", str(run / "best.pth"),
                 "--data", str(build_digits()), "--device", "cpu", "--workers", "0")
    info = cluster.wait(job, timeout=180)
    out = run / f"val-{job}.out"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        info, out.read_text() if out.exists() else "")
    results = json.loads((run / f"val-{job}.json").read_text())
    best = json.loads((run / "summary.json").read_text())["best"]["top1"]
    assert abs(results["top1"] - best) < 1e-6, (results, best)
