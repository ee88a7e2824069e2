"""Shared pieces of the trainer tests: tiny CPU configs and launching train.py for real."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(out: Path, digits_root: Path, **extra) -> list[str]:
    """A few-second CPU run: tresnet_tiny on the digits at 32 px, deterministic settings."""
    opts = {
        "model.name": "tresnet_tiny", "model.num_classes": 10,
        "data.source": "digits", "data.root": str(digits_root), "data.backend": "torch",
        "data.img_size": 32, "data.batch_size": 16, "data.workers": 0,
        "train.epochs": 2, "train.steps_per_epoch": 6, "train.ema_decay": 0.9,
        "optim.lr": 0.2, "optim.warmup_epochs": 0.5,
        "run.output_dir": str(out), "run.device": "cpu", "run.log_every": 2, "run.seed": 7,
    }
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def env() -> dict:
    # PYTHONPATH: helper scripts under tests/ import the package from the checkout.
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    e.pop("RANK", None)
    return e


def _command(overrides: list[str], nproc: int) -> list[str]:
    """train.py as a user would run it (torchrun --standalone for nproc > 1) on the demo config."""
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + ["train.py", "--config", "configs/demo.yaml", *overrides]


def train(overrides: list[str], nproc: int = 1, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(_command(overrides, nproc), cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout, **kw)


def start_train(overrides: list[str], nproc: int = 1) -> subprocess.Popen:
    return subprocess.Popen(_command(overrides, nproc), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL a run from `start_train`, torchrun's workers included.

    torchrun starts each worker in a session of its own, so killing the launcher's process group
    alone leaves the workers training (and writing checkpoints) on their own.
    """
    workers = [int(pid) for task in Path(f"/proc/{proc.pid}/task").iterdir()
               for pid in (task / "children").read_text().split()]
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for_step(path: Path, step: int, proc: subprocess.Popen, timeout: float = 900) -> None:
    """Poll a checkpoint until its global_step reaches `step` (or the process ends)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early (rc {proc.returncode}):\n{proc.stdout.read()}")
        if path.is_file():
            try:
                if torch.load(path, weights_only=True)["global_step"] >= step:
                    return
            except Exception:
                pass  # being replaced right now; the rename makes the next read whole
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict, keys=("model", "ema")) -> None:
    for key in keys:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"


def main_in_process(main, argv: list[str], capsys) -> subprocess.CompletedProcess:
    """`main(argv)` of train.py or validate.py (tresnet_train.cli.train_main, .validation.main) in
    this process, as its script would exit: no torch import per call. For refusals found before
    anything is built and for validate.py on a tiny run (cheap in-process); tests/test_config.py and
    test_wrong_files.py run the scripts themselves."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()
    try:
        rc = main(argv)
    finally:  # validate.py's main() installs its console handler on the root logger; give pytest's back
        root.handlers[:], root.level = handlers, level
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, rc, out, err)


# torch's @record around train_main enables a fault handler on stderr, which pytest's capture has no
# file descriptor for: it warns and carries on (a real train.py gets one).
NO_STDERR_FD = pytest.mark.filterwarnings("ignore:Unable to enable fault handler:UserWarning")
