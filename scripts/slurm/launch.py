"""`torchrun` for SLURM job steps: same arguments, but the trainer's exit code comes back.

The job scripts need the trainer's exit code to decide what to do: 75 means "stopped on SIGUSR1/SIGTERM
after writing a resumable checkpoint" and the job requeues itself. Plain torchrun loses it, measured with
torch 2.14 on slurm-wlm 22.05:
  * any failed worker makes torchrun exit 1 (ChildFailedError), so 75 reads as a crash;
  * on SIGUSR1 torchrun dies (default action, unless --signals-to-handle lists it), and on SIGTERM it
    forwards the signal, waits, then raises SignalException: exit 1 again, the workers' codes are gone.

So this launcher runs torch's own `torch.distributed.run` with two changes:
  1. SIGUSR1 and SIGTERM do not stop the agent. They are passed on to its worker processes (SLURM usually
     signals every process of the step itself, with proctrack/cgroup or linuxproc; the copy covers
     proctrack/pgid, where torchrun's workers sit in their own process groups and would be missed).
     The trainer treats a repeated signal like one. The agent keeps monitoring and sees the workers exit.
  2. The exit code is the workers': 0 when all finished, 75 when the workers stopped on a signal, else
     the first other failure (a worker killed by signal N reads 128+N, as in a shell). "Stopped" means
     at least one worker exited 75 and every other one exited 75 or died of the agent's SIGTERM: when
     the first worker exits 75, torchrun terminates the rest, and a worker still finalizing the Python
     interpreter (its handlers reset to the default) dies of that SIGTERM. Nothing is lost by then: the
     trainer exits 75 only after all ranks passed a barrier behind the written checkpoint.
  3. Ctrl-C (SIGINT) is passed on the same way: the workers write a checkpoint at the next step and exit
     130, and so does the launcher, with the trainer's one line and no launcher traceback (plain torchrun
     raises SignalException and prints its stack). A second Ctrl-C reaches the workers too, which then
     exit at once.
Everything else (rendezvous, --nproc-per-node, --shutdown-timeout, ...) is torchrun's.
"""
from __future__ import annotations

import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
STOPPED = 75  # the trainer's "checkpointed on a signal, resume me" exit code
INTERRUPTED = 130  # the trainer's "checkpointed on Ctrl-C" exit code


def _children() -> list[int]:
    """PIDs of this process's direct children (torchrun's workers), from /proc."""
    pids: list[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def _pass_on(signum, frame) -> None:
    for pid in _children():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def exit_code(failures: dict) -> int:
    """One exit code for the node from torchrun's per-rank failures ({rank: ProcessFailure})."""
    codes = [f.exitcode for _, f in sorted(failures.items())]
    codes = [128 - c if c < 0 else c for c in codes]  # -N: killed by signal N
    terminated = 128 + signal.SIGTERM
    for stop in (STOPPED, INTERRUPTED):
        if stop in codes and all(c in (stop, terminated) for c in codes):
            return stop
    others = [c for c in codes if c not in (STOPPED, INTERRUPTED)]
    return others[0] if others else codes[0]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    handled = [s.strip() for s in args.signals_to_handle.split(",")]
    ours = {sig.name for sig in STOP_SIGNALS}
    args.signals_to_handle = ",".join(s for s in handled if s not in ours)
    for sig in STOP_SIGNALS:  # a handler, not SIG_IGN: workers start with the default action again
        signal.signal(sig, _pass_on)
    try:
        run(args)
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in sorted(e.failures.items())}
        rc = exit_code(e.failures)
        if rc != INTERRUPTED:  # after Ctrl-C the trainer's own line says it all
            print(f"launch.py: workers exited with {codes}; exit code {rc}", file=sys.stderr, flush=True)
        return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
