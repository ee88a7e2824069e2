"""The SLURM job scripts (scripts/slurm/) on a real one-node SLURM cluster, with the real train.py.

tests/slurm_cluster.py brings up munge + slurmctld + slurmd (Debian slurm-wlm 22.05; when missing,
installed with apt only if TRESNET_TEST_INSTALL_SLURM=1 and we are root, else the cluster tests skip)
in a fresh folder with free ports, and stops them by PID at the end. The scripts are submitted
unchanged; the "CPU overrides" are sbatch options (--cpus-per-task=2, --time, --signal), environment
(NPROC_PER_NODE, PYTHON) and trainer overrides (run.device=cpu, tiny digits runs). The node declares
8 fake GPUs, so the scripts' `--gpus-per-node=8` is scheduled as written.

What is checked, each from SLURM's own record (`scontrol show job`) and the run folder:
  * a train job completes (ExitCode 0:0) and leaves its checkpoints and a copy of its log in the run folder;
  * a job stopped three times, by `scancel -b --signal=USR1` (what `--signal=B:USR1@T` delivers),
    `scancel --signal=TERM` (to the steps) and `scancel -b --signal=TERM`, checkpoints, requeues itself
    and resumes each time, and its final last.pth equals an uninterrupted run's, tensor for tensor;
  * a job whose time limit is shorter than the run is stopped by SLURM's own warning signal,
    requeues and finishes across several allocations, every step trained once and in order;
  * the README's 224 -> 448 chain in miniature: a 448-like config (`base:` the 224-like one,
    `model.init_from` its best.pth, as configs/tresnet_m_448.yaml) submitted with
    `--dependency=afterok` starts after the 224-like job (itself stopped and requeued once) completes,
    from its weights, both in the run folders their configs name;
  * train_multinode.sbatch trains with 2 ranks (torchrun rendezvous), survives a stop with both ranks
    exiting 75, and both ranks finish;
  * a bad config fails before anything is built: JobState=FAILED, ExitCode=2:0, no step, no checkpoint;
  * validate.sbatch reproduces the top-1 the trainer logged and writes it to the run folder.

SLURM holds a requeued job ~2 min before it may start again; the tests release it once its previous
start has ended (see `Cluster.wait`), which is the only thing they shorten.

Nothing here depends on the machine's speed or load (the suite must pass beside another heavy job):
every wait is a hang guard (HANG_GUARD seconds) that a healthy run never reaches, exact counts are
only of stops the test sends itself, and the time-limit chain asserts what must hold however many
allocations it took (at least one restart, each from SLURM's warning, each resuming where the last
start stopped), not how many.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slurm_cluster
from slurm_cluster import Cluster, ClusterUnavailable, ensure_installed

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "slurm"

# A tiny run on 2 CPU cores: digits at 32 px, tresnet_tiny, 2 epochs of 8 steps, validation at the end.
TINY = ["--config", "configs/demo.yaml", "run.device=cpu", "data.workers=0", "data.batch_size=16",
        "train.epochs=2", "train.steps_per_epoch=8", "train.val_every=100", "run.log_every=1",
        "run.tensorboard=false", "run.ckpt_every_steps=1"]
STEP_LINE = re.compile(r"^epoch (\d+)/\d+ \[\s*(\d+)/(\d+)\]", re.M)  # epoch, step, steps per epoch
HANG_GUARD = 900  # s: the longest any wait may take before the test calls it a hang (not a pace)


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


def final_log(run_dir: Path, job_id: int) -> str:
    """The job's log once its last start's closing line ("step exited with ...") is in the file: the
    copy is written by `tee`, which may still be draining when SLURM already reports the job done."""
    def closed():
        text = job_log(run_dir, job_id)
        return text if "step exited with" in text[text.rfind(f"job {job_id} start "):] else ""
    t0 = time.monotonic()
    while not (text := closed()):
        if time.monotonic() - t0 > HANG_GUARD:
            raise AssertionError(f"job {job_id}: log not closed after {HANG_GUARD}s:\n"
                                 f"{job_log(run_dir, job_id)[-3000:]}")
        time.sleep(0.5)
    return text


def trained_steps(log: str) -> list[int]:
    """Global steps (0-based) of the step lines of a job log (run.log_every=1), in the order every
    start logged them: the log keeps each start's lines, so a step trained twice shows twice."""
    return [(int(e) - 1) * int(m) + int(s) - 1 for e, s, m in STEP_LINE.findall(log)]


def wait_for(pred, what: str, cluster: Cluster, job_id: int, timeout: float = HANG_GUARD,
             poll: float = 0.2):
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
    info = cluster.wait(job, timeout=HANG_GUARD)
    sec_per_step = seconds_per_step(run)
    print(f"reference run: {time.monotonic() - t0:.0f}s, {sec_per_step:.2f} s/step")
    return run, job, info, sec_per_step


@pytest.mark.slow
def test_train_job_completes(reference):
    run, job, info, _ = reference
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    ckpt = torch.load(run / "last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["world_size"]) == (2, 16, 1)
    assert (run / "best.pth").is_file() and (run / "config.yaml").is_file()
    log = final_log(run, job)
    assert trained_steps(log) == list(range(16))
    assert "step exited with 0" in log and "done: best top-1" in log  # the trainer's log is in the run folder


@pytest.mark.slow
def test_signals_checkpoint_requeue_and_resume(cluster, tiny, reference, tmp_path):
    """Three stops by three routes, three requeues, and the weights of an uninterrupted run."""
    ref_run = reference[0]
    run = tmp_path / "run"
    job = submit(cluster, tmp_path, "train.sbatch", *tiny, f"run.output_dir={run}")
    routes = [("--batch", "USR1"), (None, "TERM"), ("--batch", "TERM")]
    for start, (where, sig) in enumerate(routes):
        marker = f"job {job} start {start} "
        # trained at least one step in this start (after the resume, for start > 0)
        wait_for(lambda: steps_after(job_log(run, job), marker) >= 1, f"a step in start {start}",
                 cluster, job)
        cluster.run("scancel", *([where] if where else []), f"--signal={sig}", str(job))
        # requeued (wait() releases SLURM's requeue hold) and running again
        info = cluster.wait(job, timeout=HANG_GUARD, until=lambda i: i.get("JobState") in Cluster.FINAL
                            or (i.get("JobState") == "RUNNING" and int(i.get("Restarts", 0)) == start + 1))
        assert info["JobState"] == "RUNNING", (sig, info, job_log(run, job)[-3000:])
    info = cluster.wait(job, timeout=HANG_GUARD)
    log = final_log(run, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
    assert info["Restarts"] == "3"
    assert log.count("step exited with 75") == 3 and log.count("requeueing job") == 3
    assert "batch shell got SIGUSR1" in log and "batch shell got SIGTERM" in log
    assert len(re.findall(r"resumed from .*last\.pth", log)) == 3
    assert trained_steps(log) == list(range(16))  # each start took over at the step after the last
    assert_same_weights(run / "last.pth", ref_run / "last.pth")


def seconds_per_step(run: Path) -> float:
    """Mean wall time of a training step (checkpoint I/O included) from the run's metrics.jsonl."""
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    rates = [r for r in (json.loads(line).get("train/img_per_s") for line in lines) if r]
    return sum(16 / r for r in rates) / len(rates) if rates else 1.0  # the mean: I/O is spiky


@pytest.mark.slow
def test_time_limit_chain(cluster, tiny, reference, tmp_path):
    """--time=2 with the warning 30 s before: SLURM's own USR1 stops each allocation until the run ends.

    SLURM sends the warning up to ~30 s early (it checks every 30 s), so 60-90 s into each 2-minute
    allocation (the shortest --time is one minute), which leaves the stopped trainer 30 s or more to
    checkpoint and exit before the limit; the run is sized to 110 s of training at the last measured
    pace, so it needs a second allocation unless the machine gets faster than that: a run that never
    resumed proves nothing and is redone, longer, at the pace it just showed (at most twice). A slower
    machine only means more allocations: the checks below hold for any number of them, and each start
    still trains for the 40 s or more between its start-up and the warning."""
    pace = reference[3]
    for attempt in range(3):
        total = math.ceil(110 / pace)
        epochs = math.ceil(total / 80)  # digits has 89 batches of 16 per epoch
        steps = math.ceil(total / epochs)
        run = tmp_path / f"run{attempt}"
        args = [*tiny, f"train.epochs={epochs}", f"train.steps_per_epoch={steps}", f"run.output_dir={run}"]
        job = submit(cluster, tmp_path, "train.sbatch", *args, sbatch=("--time=2", "--signal=B:USR1@30"))
        info = cluster.wait(job, timeout=2 * HANG_GUARD)  # several allocations of 2 min
        log = final_log(run, job)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
        if re.search(r"resumed from \S+\.pth", log):
            break
        pace = seconds_per_step(run)
        print(f"time-limit chain: {epochs * steps} steps ran in one start; retrying at {pace:.2f} s/step")
    restarts = int(info["Restarts"])
    assert re.search(r"resumed from \S+\.pth", log) and restarts >= 1, log[-3000:]
    # every stop came from SLURM's warning (the test sends none) and requeued the job; the warning may
    # also reach the last allocation as the run ends, which then just finishes
    assert log.count("requeueing job") == restarts, log[-3000:]
    assert log.count("batch shell got SIGUSR1") >= restarts and "got SIGTERM" not in log
    # every start took over where the previous one stopped: each step trained once, in order (a start
    # that SLURM stops while it is still starting up trains none)
    assert trained_steps(log) == list(range(epochs * steps))
    ckpt = torch.load(run / "last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (epochs, epochs * steps)


def chain_configs(tmp: Path, digits: Path) -> tuple[Path, Path]:
    """A 224-like and a 448-like config, related as configs/tresnet_m.yaml and tresnet_m_448.yaml are:
    the second has `base:` the first, `model.init_from` the first's best.pth, its own run.output_dir
    and twice the resolution. No run.output_dir on the command line: the job script uses the configs'."""
    q = json.dumps  # YAML flow scalars: quoted paths
    first, second = tmp / "tiny.yaml", tmp / "tiny_448.yaml"
    first.write_text(f"""\
base: {q(str(REPO / "configs" / "demo.yaml"))}
data: {{root: {q(str(digits))}, workers: 0, batch_size: 16}}
train: {{epochs: 2, steps_per_epoch: 8, val_every: 100}}
run: {{output_dir: {q(str(tmp / "runs" / "tiny"))}, device: cpu, log_every: 1, tensorboard: false,
      ckpt_every_steps: 1}}
""")
    second.write_text(f"""\
base: tiny.yaml
model: {{init_from: {q(str(tmp / "runs" / "tiny" / "best.pth"))}}}
data: {{img_size: 64, batch_size: 8}}
optim: {{lr: 0.04, warmup_epochs: 0.5}}
train: {{epochs: 1}}
run: {{output_dir: {q(str(tmp / "runs" / "tiny_448"))}}}
""")
    return first, second


@pytest.mark.slow
def test_224_then_448_chain_with_afterok(cluster, digits, tmp_path):
    """The README's chain: the 448 job waits (--dependency=afterok) for the 224 job, through a requeue
    of it, then starts from its best.pth, found where the 448 config says."""
    first, second = chain_configs(tmp_path, digits)
    run224, run448 = tmp_path / "runs" / "tiny", tmp_path / "runs" / "tiny_448"
    job224 = submit(cluster, tmp_path, "train.sbatch", "--config", str(first))
    job448 = submit(cluster, tmp_path, "train.sbatch", "--config", str(second),
                    sbatch=(f"--dependency=afterok:{job224}",))
    wait_for(lambda: steps_after(job_log(run224, job224), f"job {job224} start 0 ") >= 1, "a step",
             cluster, job224)
    assert cluster.job(job448)["JobState"] == "PENDING"
    cluster.run("scancel", "--batch", "--signal=USR1", str(job224))  # a preemption of the 224 run
    info224 = cluster.wait(job224, timeout=HANG_GUARD)
    log224 = final_log(run224, job224)
    assert info224["JobState"] == "COMPLETED" and info224["Restarts"] == "1", (info224, log224[-3000:])
    assert re.search(rf"resumed from {re.escape(str(run224))}/last\.pth", log224)  # same folder again

    info448 = cluster.wait(job448, timeout=HANG_GUARD, until=lambda i: i.get("JobState") in Cluster.FINAL
                           or i.get("Reason") == "DependencyNeverSatisfied")
    log448 = final_log(run448, job448)
    assert info448["JobState"] == "COMPLETED" and info448["ExitCode"] == "0:0", (info448, log448[-3000:])
    assert f"initialised weights from {run224 / 'best.pth'}" in log448
    ckpt = torch.load(run448 / "last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["config"]["data"]["img_size"]) == (1, 8, 64)
    assert not list(REPO.glob(f"runs/*-{job224}")) and not list(REPO.glob(f"runs/*-{job448}"))


@pytest.mark.slow
def test_multinode_script_two_ranks(cluster, tmp_path):
    """train_multinode.sbatch, 1 node x 2 trainers: rendezvous, a stop with both ranks exiting 75, resume."""
    run = tmp_path / "run"
    job = submit(cluster, tmp_path, "train_multinode.sbatch", *TINY, f"run.output_dir={run}",
                 sbatch=("--nodes=1",), nproc=2)
    wait_for(lambda: steps_after(job_log(run, job), f"job {job} start 0 ") >= 1, "a step", cluster, job)
    cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    info = cluster.wait(job, timeout=HANG_GUARD)
    log = final_log(run, job)
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
    assert code(130, 130) == 130 and code(-15, 130) == 130  # Ctrl-C: both ranks checkpointed
    assert code(130, 1) == 1


def test_run_dir_is_the_folder_train_py_would_use(tmp_path):
    """scripts/slurm/run_dir.py (the job scripts' run folder): the config's run.output_dir, its `base:`
    chain and the overrides included; a bad config exits 2 with the trainer's one-line message."""
    def run_dir(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPTS / "run_dir.py"), *args], cwd=REPO,
                              capture_output=True, text=True, timeout=HANG_GUARD)

    assert run_dir("--config", "configs/tresnet_m.yaml", "data.root=/data").stdout == "runs/tresnet_m\n"
    ft = run_dir("--config", "configs/tresnet_m_448.yaml", "data.root=/data",
                 f"model.init_from={REPO / 'configs' / 'tresnet_m.yaml'}")  # any existing file
    assert ft.stdout == "runs/tresnet_m_448\n"
    assert run_dir("--config=configs/demo.yaml", f"run.output_dir={tmp_path}").stdout == f"{tmp_path}\n"
    bad = run_dir("--config", "configs/demo.yaml", "optim.lrr=1")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("config error: unknown config key 'optim.lrr'")


@pytest.mark.slow
def test_bad_config_fails_with_exit_code(cluster, tmp_path):
    """Fails before building anything (what "in seconds" means, whatever the machine's load)."""
    run = tmp_path / "run"
    job = submit(cluster, tmp_path, "train.sbatch", *TINY, "optim.lrr=1", f"run.output_dir={run}")
    info = cluster.wait(job, timeout=HANG_GUARD)
    log = final_log(run, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, log)
    assert info["Restarts"] == "0"
    assert "unknown config key 'optim.lrr'" in log
    assert "step exited with 2" in log and not STEP_LINE.search(log)
    assert sorted(p.name for p in run.iterdir()) == [f"slurm-{job}.out"]  # no config, no checkpoint


@pytest.mark.slow
def test_validate_job(cluster, reference, tmp_path):
    from tresnet_train.data.digits import build_digits

    run = reference[0]
    job = submit(cluster, tmp_path, "validate.sbatch", "--ckpt", str(run / "best.pth"),
                 "--data", str(build_digits()), "--device", "cpu", "--workers", "0")
    info = cluster.wait(job, timeout=HANG_GUARD)
    out = run / f"val-{job}.out"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        info, out.read_text() if out.exists() else "")
    results = json.loads((run / f"val-{job}.json").read_text())
    best = json.loads((run / "summary.json").read_text())["best"]["top1"]
    assert abs(results["top1"] - best) < 1e-6, (results, best)


def test_missing_slurm_is_installed_only_when_asked(monkeypatch):
    """Without TRESNET_TEST_INSTALL_SLURM=1 a missing SLURM is a skip reason, and apt is never run."""
    ran = []
    monkeypatch.setattr(slurm_cluster, "_sbin", lambda name: None)
    monkeypatch.setattr(slurm_cluster.subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    monkeypatch.delenv(slurm_cluster.INSTALL_ENV, raising=False)
    with pytest.raises(ClusterUnavailable, match="set TRESNET_TEST_INSTALL_SLURM=1 to apt-get install "
                                                 "slurm-wlm munge"):
        ensure_installed()
    assert ran == []
