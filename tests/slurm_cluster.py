"""A throw-away one-node SLURM cluster on this machine, for testing `scripts/slurm/`.

Debian's `slurm-wlm` 22.05 and `munge`, installed with apt when missing only if
TRESNET_TEST_INSTALL_SLURM=1 asks for it (.ci/run sets it) and we are root. Everything the daemons
write lives in one fresh folder: the munge key and socket, slurm.conf, state, spool, pid and log
files. Ports are picked free at start, so a second cluster (a second test run) does not collide with
this one. The daemons run in the foreground as our own children; `stop()` cancels the cluster's jobs and
ends each daemon by the PID we started. Configuration (measured with Debian 12's slurm-wlm 22.05):
proctrack/linuxproc, task/none, select/cons_tres with CR_CPU, accounting off.

The node also declares 8 count-only GPUs (`Gres=gpu:8`, no device files), so the job scripts' real
`--gpus-per-node=8` request is scheduled as written; the trainer is told `run.device=cpu`.

Manual use (leaves the cluster running until `down`):
    python tests/slurm_cluster.py up /tmp/slurm-dev      # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py down /tmp/slurm-dev
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "srun", "sinfo")
APT_PACKAGES = ("slurm-wlm", "munge")
INSTALL_ENV = "TRESNET_TEST_INSTALL_SLURM"  # =1: apt-get install APT_PACKAGES when missing


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be brought up here; the message says why (tests skip with it)."""


def _sbin(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt when a daemon or client is missing and INSTALL_ENV=1 asks
    for it (root only): running the tests changes the system's packages only when the caller says so."""
    missing = [n for n in DAEMONS + CLIENTS if _sbin(n) is None]
    if not missing:
        return
    if os.environ.get(INSTALL_ENV) != "1":
        raise ClusterUnavailable(f"SLURM/munge not installed ({', '.join(missing)} missing); set "
                                 f"{INSTALL_ENV}=1 to apt-get install {' '.join(APT_PACKAGES)} (as root)")
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"SLURM/munge not installed ({', '.join(missing)} missing) and not root "
                                 f"to apt-get install {' '.join(APT_PACKAGES)}")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"{', '.join(missing)} missing and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", *APT_PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    still = [n for n in DAEMONS + CLIENTS if _sbin(n) is None]
    if still:
        raise ClusterUnavailable(f"installed {' '.join(APT_PACKAGES)} but {', '.join(still)} still missing")


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    """One node `localhost` (127.0.0.1, CPUs=2, 8 count-only GPUs), one partition `debug`."""

    def __init__(self, root: str | Path, cpus: int = 2):
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"

    @property
    def env(self) -> dict[str, str]:
        """The environment every SLURM command (and the jobs they submit) needs."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- configuration -------------------------------------------------------------------------
    def _write_files(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)  # clean state every time: no jobs or node state from a past run
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True)
        self.root.chmod(0o755)
        (self.root / "munge").chmod(0o755)  # clients must reach the socket: world-executable dir
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld_port, slurmd_port = _free_ports(2)
        name = f"tt{os.getpid()}"[:16]
        first_job_id = random.randrange(1000, 1_000_000)  # job ids (and ports derived from them) differ per cluster
        r = self.root
        self.conf.write_text(f"""\
# Generated by tests/slurm_cluster.py: a one-node test cluster, everything under {r}
ClusterName={name}
FirstJobId={first_job_id}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=10
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        # 8 fake GPU "devices" (plain files): schedulable, enough for `--gpus-per-node=8`.
        (self.root / "dev").mkdir()
        for i in range(8):
            (self.root / "dev" / f"gpu{i}").touch()
        (self.root / "gres.conf").write_text(f"NodeName=localhost Name=gpu File={r}/dev/gpu[0-7]\n")

    # -- daemons -------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.log_dir / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)  # our signals stay ours
        out.close()

    def run(self, *argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def start(self, timeout: float = 300) -> "Cluster":
        ensure_installed()
        self._write_files()
        m = self.root / "munge"
        self._spawn("munged", [_sbin("munged"), "--foreground", "--force",
                               f"--socket={m}/munge.socket", f"--key-file={m}/munge.key",
                               f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
                               f"--log-file={self.log_dir}/munged.log"])
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged socket")
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, timeout,
                   "slurmctld to answer ping")
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(lambda: self.node_state() in ("IDLE", "MIXED", "ALLOCATED"), timeout, "node idle")
        return self

    def _wait(self, ok, timeout: float, what: str) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise ClusterUnavailable(f"{name} exited ({p.returncode}) while waiting for {what}; "
                                             f"logs in {self.log_dir}:\n{self.tail_logs()}")
            if ok():
                return
            time.sleep(0.2)
        raise ClusterUnavailable(f"timed out after {timeout:.0f}s waiting for {what}; logs in "
                                 f"{self.log_dir}:\n{self.tail_logs()}")

    def tail_logs(self, n: int = 15) -> str:
        out = []
        for f in sorted(self.log_dir.glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def node_state(self, flags: bool = False) -> str:
        """The node's state, e.g. IDLE; with `flags`, as SLURM writes it, e.g. IDLE+COMPLETING."""
        r = self.run("scontrol", "show", "node", "localhost", check=False)
        m = re.search(r"State=(\S+)", r.stdout)
        state = m.group(1) if m else ""
        return state if flags else state.split("+")[0]

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end each daemon we started, by its PID."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            ids = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if ids:
                self.run("scancel", *ids, check=False)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 30 and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    # -- jobs ----------------------------------------------------------------------------------
    def sbatch(self, *args: str, env: dict | None = None, cwd: str | Path | None = None) -> int:
        r = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (empty when the job is unknown)."""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if r.returncode != 0:
            return {}
        return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)

    @staticmethod
    def step_processes(job_id: int) -> list[int]:
        """PIDs of this job's slurmstepd processes on this (the only) node: each names itself
        `slurmstepd: [<job id>.<step>]`, the batch step included."""
        prefix = f"slurmstepd: [{job_id}.".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(prefix):
                    pids.append(int(proc.name))
            except OSError:  # exited while we looked
                continue
        return pids

    FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
             "DEADLINE", "PREEMPTED")

    def old_start_ended(self, job_id: int) -> bool:
        """Whether the previous start of a requeued job has ended everywhere: its slurmstepd processes
        have exited (they send the old batch step's exit status) and the node is no longer COMPLETING
        (slurmctld has heard that the old allocation is cleaned up)."""
        return not self.step_processes(job_id) and "COMPLETING" not in self.node_state(flags=True)

    def wait(self, job_id: int, until=FINAL, timeout: float = 300, poll: float = 0.25) -> dict[str, str]:
        """Poll `scontrol show job` every `poll` s (much faster than `sbatch --wait`) until JobState is in
        `until` (or `until(info)` is true, for a callable). `timeout` s is a hang guard.

        SLURM holds a requeued job ~2 min (Reason=BeginTime) so that its previous start can finish
        reporting; we release it (`StartTime=now`) as soon as that is done, which two things decide:
          * `old_start_ended`: releasing before the old slurmstepd processes exited let the old batch
            step's exit status land on the new start (measured);
          * the clock has entered a later second than the one in which the old start was seen ended:
            slurmd revoked the old start's credential (whole seconds) when it began ending it, and it
            refuses a new one created in that same second ("Job credential revoked", measured: the
            job then fails with exit 1).
        Both are conditions, not fixed waits, so the release stays safe on a loaded machine, where the
        old start takes longer to end."""
        t0, ended_second = time.monotonic(), None
        while True:
            info = self.job(job_id)
            if until(info) if callable(until) else info.get("JobState") in until:
                return info
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                if ended_second is None and self.old_start_ended(job_id):
                    ended_second = int(time.time())
                if ended_second is not None and int(time.time()) > ended_second:
                    self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
                    ended_second = None
            else:
                ended_second = None
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"job {job_id} not in {until} after {timeout:.0f}s: {info}\n"
                                   f"{self.tail_logs()}")
            time.sleep(poll)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print(__doc__)
        return 2
    root = Path(argv[1]).resolve()
    if argv[0] == "up":
        c = Cluster(root)
        try:
            c.start()
        except BaseException:
            c.stop()
            raise
        (root / "pids.json").write_text(json.dumps({k: p.pid for k, p in c.procs.items()}))
        print(f"export SLURM_CONF={c.conf}")
        return 0
    pids = json.loads((root / "pids.json").read_text())
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    ids = subprocess.run(["squeue", "-h", "-o", "%A"], env=env, capture_output=True, text=True).stdout.split()
    if ids:
        subprocess.run(["scancel", *ids], env=env)
        time.sleep(3)
    for name in ("slurmd", "slurmctld", "munged"):
        try:
            os.kill(pids[name], signal.SIGTERM)
        except ProcessLookupError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
