"""One writer per run folder (tresnet_train/run_lock.py): who holds a lock, when a holder counts as
gone, and a requeue waiting for its old allocation. Two real runs on one folder: tests/test_faults.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tresnet_train import run_lock
from tresnet_train.run_lock import LOCK_NAME, RunLock, RunLockError


def _write_lock(folder, **record):
    folder.mkdir(parents=True, exist_ok=True)
    base = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "job_id": "",
            "token": "theirs", "started": time.time(), "heartbeat": time.time()}
    (folder / LOCK_NAME).write_text(json.dumps(dict(base, **record)))


def test_dead_holder_on_this_host_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, pid=dead.pid)
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        assert "taking over the run lock" in caplog.text and "its process is dead" in caplog.text
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_live_holder_on_this_host_is_refused(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _write_lock(tmp_path, pid=alive.pid, pid_start=run_lock._pid_start(alive.pid))
        with pytest.raises(RunLockError, match=f"in use by another run \\(pid {alive.pid} "):
            RunLock(tmp_path).acquire()
        _write_lock(tmp_path, pid=alive.pid, pid_start="1")  # the pid was reused by another process
        lock = RunLock(tmp_path)
        lock.acquire()
        lock.release()
    finally:
        alive.kill()
        alive.wait()


def test_other_host_is_judged_by_its_heartbeat(tmp_path, caplog):
    _write_lock(tmp_path, host="node-a", pid=1)
    with pytest.raises(RunLockError, match="pid 1 on host node-a, last heartbeat 0s ago"):
        RunLock(tmp_path).acquire()
    _write_lock(tmp_path, host="node-a", pid=1, heartbeat=time.time() - run_lock.STALE_S - 5)
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()
    assert "no heartbeat for 30" in caplog.text


def test_a_requeue_of_the_same_job_waits_for_the_old_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(run_lock, "STALE_S", 2.0)
    _write_lock(tmp_path, host="node-a", pid=1, job_id="4242")  # its heartbeat stops now
    lock = RunLock(tmp_path, wait_s=900)
    lock.acquire()  # waits until the record is older than STALE_S, then takes it over
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.record["token"]
    lock.release()
