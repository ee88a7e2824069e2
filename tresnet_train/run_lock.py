"""One writer per run folder: a lock file that a run holds for its whole life.

`<output_dir>/.run.lock` is a small JSON record (host, pid and its start time, SLURM job id, a token,
a heartbeat time) that rank 0 creates with O_CREAT|O_EXCL and rewrites every `HEARTBEAT_S` seconds.
A lock file rather than `flock` alone: `flock` over NFS depends on the client's lock daemon, and a
lock held by a dead node is never released; a record anyone can read says who holds the folder and
whether the holder is still alive.

A holder is gone, and its lock is taken over with a warning, when
- it ran on this host and its pid is dead (or now belongs to another process: the start time differs);
- it ran on another host and its heartbeat is older than `STALE_S` seconds (clocks in sync, as a
  cluster's are).
A SLURM requeue of the same job (same job id) on another host waits up to `STALE_S` for the old
allocation's heartbeat to stop instead of being refused: the node that ran it may be unreachable but
still writing.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
HEARTBEAT_S = 30.0  # seconds between heartbeats
STALE_S = 300.0  # seconds without a heartbeat after which another host's lock counts as abandoned
TAKEOVER_SETTLE_S = 2.0  # seconds between taking over a lock and checking that it is still ours


class RunLockError(RuntimeError):
    """The run folder is held by another live run; the message names it and what to do."""


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), telling a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the name


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    now = _pid_start(pid)
    return start is None or now is None or now == start


def _job_id() -> str:
    return os.environ.get("SLURM_JOB_ID", "")


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['job_id']}" if holder.get("job_id") else ""
    age = time.time() - float(holder.get("heartbeat", 0))
    return (f"pid {holder.get('pid')} on host {holder.get('host')}{job}, last heartbeat "
            f"{age:.0f}s ago")


class RunLock:
    """Hold `<folder>/.run.lock` from `acquire()` to `release()`; a daemon thread keeps it fresh."""

    def __init__(self, folder: str | Path, wait_s: float = STALE_S):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.wait_s = wait_s  # how long a requeue of the same job waits for its old heartbeat to stop
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "pid_start": _pid_start(os.getpid()), "job_id": _job_id(),
                       "token": uuid.uuid4().hex, "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- taking the lock ---------------------------------------------------------------------
    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.time() + self.wait_s
        while not self._create():
            holder = self._read()
            if holder is None:  # removed (or being replaced) between our two calls: try again
                continue
            why = self._gone(holder)
            if why:
                log.warning("warning: taking over the run lock of %s: %s (%s)", self.folder,
                            describe(holder), why)
                self._write()
                time.sleep(TAKEOVER_SETTLE_S)  # a run taking it over at the same moment shows now
                break
            if holder.get("job_id") and holder["job_id"] == self.record["job_id"] \
                    and time.time() < deadline:
                log.info("run folder %s is held by an earlier allocation of this job (%s); waiting "
                         "up to %.0fs for its heartbeat to stop", self.folder, describe(holder),
                         deadline - time.time())
                time.sleep(min(HEARTBEAT_S, max(0.0, deadline - time.time())) + 1)
                continue
            raise RunLockError(
                f"run folder {self.folder} is in use by another run ({describe(holder)}); wait for "
                f"it to finish or stop it, or choose another run.output_dir. If that run is gone, "
                f"delete {self.path}")
        if self._read_token() != self.record["token"]:  # another process took it at the same time
            raise RunLockError(f"run folder {self.folder} was taken by another run starting at the "
                               f"same moment ({describe(self._read() or {})}); choose another "
                               f"run.output_dir")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _gone(self, holder: dict) -> str:
        """Why the holder is gone ('' while it is alive)."""
        if holder.get("host") == self.record["host"]:
            pid = int(holder.get("pid", -1))
            if pid == os.getpid():
                return "this process (an earlier attempt in it)"
            if not _pid_alive(pid, holder.get("pid_start")):
                return "its process is dead"
            return ""
        age = time.time() - float(holder.get("heartbeat", 0))
        return f"no heartbeat for {age:.0f}s > {STALE_S:.0f}s" if age > STALE_S else ""

    def _create(self) -> bool:
        """Create the lock file exclusively; False when it exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._text())
        return True

    def _text(self) -> str:
        return json.dumps(dict(self.record, heartbeat=time.time()))

    def _write(self) -> None:
        """Replace the lock file with our record (rename: readers see a whole file)."""
        tmp = self.folder / f"{LOCK_NAME}.{self.record['token']}"
        tmp.write_text(self._text())
        os.replace(tmp, self.path)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or cut short: no live holder wrote it whole

    def _read_token(self) -> str | None:
        return (self._read() or {}).get("token")

    # ---- holding and releasing ---------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self._read_token() != self.record["token"]:
                log.error("the run lock %s was taken over by another run (%s); this run keeps "
                          "writing its checkpoints: stop one of the two", self.path,
                          describe(self._read() or {}))
                return
            try:
                self._write()
            except OSError as e:  # a full disk must not end the run here; the checkpoint will say
                log.warning("warning: could not refresh the run lock %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        if self._read_token() == self.record["token"]:
            self.path.unlink(missing_ok=True)
