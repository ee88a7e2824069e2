"""Soak: train the demo model for thousands of steps and show that nothing grows.

Runs train.py (configs/demo.yaml: tresnet_tiny on the digits, 22 steps an epoch, validation and
checkpoints at every epoch end, here also top-k links and a mid-epoch checkpoint every 500 steps) on
each backend, and every --every steps records the resident memory (VmRSS) and the open file
descriptors of every process of the run: the main process and its loader workers (the torch
backend's DataLoader processes; DALI's are threads of the main process). Descriptors of batches in
flight (torch's workers pass each batch's shared memory as one) are counted apart: how many are
held depends on how full the prefetch queue is at the sample, not on the step.

    python scripts/soak.py --steps 3000 --backends torch dali --md benchmarks/soak.md

Passes (exit 0) when, from step --since to the end, every process that lived through that stretch
grew by less than --max-growth-mb of resident memory and its other descriptors did not grow (`passes`);
exit 1 otherwise. Validation's loader workers live for one pass each: they are counted
but not compared. A sample is taken at the first epoch start at or after each multiple of --every
(metrics.jsonl polled every 50 ms), so it lands mid-training, not inside validation or a checkpoint
write, and at the same point of an epoch each time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled
from tresnet_train.config import DECODERS  # noqa: E402

STEPS_PER_EPOCH = 22  # configs/demo.yaml: 1,438 training digits in batches of 64 (train.steps_per_epoch)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return pids


def is_batch_segment(link: str) -> bool:
    """A descriptor's target is a batch's shared memory: torch's DataLoader hands each batch tensor
    from worker to main as a descriptor to a deleted /dev/shm file (or a memfd)."""
    return link.startswith(("/dev/shm/", "/memfd:")) and link.endswith("(deleted)")


def measure(pid: int) -> tuple[int, int, int] | None:
    """(resident bytes, open descriptors other than batches in flight, descriptors of batches in
    flight) of one process; None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except FileNotFoundError:  # closed between the listing and the read
                continue
    except OSError:
        return None
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    batches = sum(map(is_batch_segment, links))
    return rss_kb * 1024, len(links) - batches, batches


def epoch_start(metrics: Path) -> int:
    """The step of the newest first-step-of-an-epoch record (a train record after a val record, or
    the first record): the run is then training, between validation and the next checkpoint."""
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
    except OSError:
        return 0
    starts = [r["step"] for k, r in enumerate(records)
              if r["kind"] == "train" and (k == 0 or records[k - 1]["kind"] == "val")]
    return max(starts, default=0)


def soak(backend: str, steps: int, every: int, run_dir: Path, overrides: list[str],
         max_minutes: float = 0.0) -> dict:
    """Train `steps` steps (rounded up to whole epochs) on `backend`; samples every `every` steps.
    `max_minutes` > 0: stop the run with SIGTERM after that long (it checkpoints and exits 75)."""
    epochs = math.ceil(steps / STEPS_PER_EPOCH)
    command = [sys.executable, "train.py", "--config", "configs/demo.yaml",
               f"data.backend={backend}", f"train.epochs={epochs}",
               f"train.steps_per_epoch={STEPS_PER_EPOCH}", "run.log_every=10",
               "run.keep_top_k=2", "run.ckpt_every_steps=500", "run.tensorboard=true",
               f"run.output_dir={run_dir}", "run.device=cpu", *overrides]
    log = open(run_dir.with_suffix(".log"), "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    samples, next_sample, stopped = [], every, False
    try:
        while proc.poll() is None:
            step = epoch_start(run_dir / "metrics.jsonl")
            if step >= next_sample:
                per_pid = {p: m for p in process_tree(proc.pid) if (m := measure(p)) is not None}
                samples.append({"step": step,
                                "processes": {str(p): list(m) for p, m in per_pid.items()}})
                next_sample = (step // every + 1) * every
            if max_minutes and not stopped and time.perf_counter() - t0 > 60 * max_minutes:
                proc.send_signal(signal.SIGTERM)
                stopped = True
            time.sleep(0.05)
    finally:
        if proc.poll() is None:  # interrupted: do not leave the run training on its own
            proc.kill()
            proc.wait()
        log.close()
    return {"backend": backend, "command": " ".join(command), "returncode": proc.returncode,
            "wall_s": round(time.perf_counter() - t0, 1), "steps": epochs * STEPS_PER_EPOCH,
            "stopped_at": epoch_start(run_dir / "metrics.jsonl") if stopped else None,
            "main_pid": str(proc.pid), "samples": samples}


def growth(result: dict, since: int) -> list[dict]:
    """Per process alive from the first sample at or after `since` to the last: growth in MB, the
    least-squares slope in MB per 1,000 steps, and descriptors at both ends."""
    samples = [s for s in result["samples"] if s["step"] >= since]
    if len(samples) < 2:
        raise SystemExit(f"{result['backend']}: fewer than two samples from step {since} on "
                         f"(returncode {result['returncode']}); see the run's log")
    first, last = samples[0], samples[-1]
    rows = []
    for pid in first["processes"]:
        if pid not in last["processes"]:
            continue
        alive = [(s["step"], s["processes"][pid]) for s in samples if pid in s["processes"]]
        points = [(step, rss / 1e6) for step, (rss, *_) in alive]
        fds = [measured[1] for _, measured in alive]
        n = len(points)
        mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
        slope = sum((x - mx) * (y - my) for x, y in points) / max(sum((x - mx) ** 2 for x, _ in points),
                                                                   1e-9)
        rows.append({
            "process": "main" if pid == result["main_pid"] else f"loader worker {pid}",
            "from_step": first["step"], "to_step": last["step"], "samples": n,
            "rss_from_mb": round(points[0][1], 1), "rss_to_mb": round(points[-1][1], 1),
            "rss_max_mb": round(max(y for _, y in points), 1),
            "growth_mb": round(points[-1][1] - points[0][1], 1),
            "slope_mb_per_1k_steps": round(slope * 1000, 2),
            "fds_from": first["processes"][pid][1], "fds_to": last["processes"][pid][1],
            "fds_max": max(fds), "fds_growth": min(fds[n // 2:]) - max(fds[:n // 2]),
            "batch_fds_max": max(measured[2] for _, measured in alive)})
    return rows


def passes(row: dict, max_growth_mb: float) -> bool:
    """RSS grew less than `max_growth_mb`; the fewest descriptors (other than batches in flight)
    held in the later half of the samples are no more than the most held in the earlier half (a
    leak raises that floor; a file open for a moment only makes the count wobble). A batch that
    stays in shared memory is resident memory, which the RSS limit catches."""
    return row["growth_mb"] < max_growth_mb and row["fds_growth"] <= 0


def markdown(results: list[dict], since: int, max_growth_mb: float) -> str:
    import torch
    lines = [f"# Soak: resident memory and open descriptors from step {since} to the end", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()}: "
             f"{os.cpu_count()} CPU cores, {platform.platform()}, Python {platform.python_version()}, "
             f"torch {torch.__version__}, no GPU (run.device=cpu).",
             f"Pass: RSS growth < {max_growth_mb:g} MB per process, and fd growth <= 0: the fewest "
             f"descriptors held in the later half of the samples minus the most held in the "
             f"earlier half, not counting those of batches in flight (torch's workers pass each "
             f"batch tensor's shared memory as a descriptor; how many are held depends on how full "
             f"the prefetch queue is at the sample).", ""]
    for r in results:
        rows = growth(r, since)
        transient = len({p for s in r["samples"] for p in s["processes"]}) - len(rows)
        ran = (f"{r['steps']} steps, {r['steps'] // STEPS_PER_EPOCH} epochs" if not r["stopped_at"]
               else f"stopped by --max-minutes after step {r['stopped_at']} of {r['steps']} planned")
        lines += [f"## {r['backend']} backend: {ran}, exit {r['returncode']}, {r['wall_s']:.0f} s", "",
                  f"`{r['soak_command']}` ran `{r['command']}`", "",
                  "| process | steps | samples | RSS MB at start | at end | max | growth MB | "
                  "slope MB/1k steps | fds at start | at end | max | fd growth | batch fds max | "
                  "pass |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['process']} | {row['from_step']}-{row['to_step']} | {row['samples']} | "
                         f"{row['rss_from_mb']} | {row['rss_to_mb']} | {row['rss_max_mb']} | "
                         f"{row['growth_mb']} | {row['slope_mb_per_1k_steps']} | {row['fds_from']} | "
                         f"{row['fds_to']} | {row['fds_max']} | {row['fds_growth']} | "
                         f"{row['batch_fds_max']} | "
                         f"{'yes' if passes(row, max_growth_mb) else '**NO**'} |")
        lines += ["", f"Processes seen in samples but not alive at both ends (validation's loader "
                      f"workers): {transient}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="training steps per backend (>=)")
    parser.add_argument("--every", type=int, default=100, help="steps between samples")
    parser.add_argument("--since", type=int, default=500, help="step the growth is measured from")
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--backends", nargs="+", default=["torch", "dali"], choices=DECODERS)
    parser.add_argument("--max-minutes", type=float, default=0.0,
                        help="stop each run (SIGTERM: checkpoint, exit 75) after this long and "
                             "tabulate what was sampled; 0 = no limit")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra train.py overrides, e.g. data.root=DIR")
    parser.add_argument("--md", type=Path, help="write the table here (markdown)")
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument("--from-json", type=Path, nargs="+", metavar="FILE",
                        help="no run: tabulate the samples of earlier --json files (e.g. one run "
                             "per backend, started side by side)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    results = [r for path in args.from_json for r in json.loads(path.read_text())] \
        if args.from_json else []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        for backend in [] if args.from_json else args.backends:
            result = soak(backend, args.steps, args.every, Path(tmp) / backend, args.set,
                          args.max_minutes)
            result["soak_command"] = "python scripts/soak.py " + " ".join(argv)
            if result["returncode"] != 0:
                print((Path(tmp) / f"{backend}.log").read_text()[-3000:], file=sys.stderr)
            results.append(result)
    text = markdown(results, args.since, args.max_growth_mb)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    ok = all(r["returncode"] == (75 if r["stopped_at"] else 0) and all(passes(row, args.max_growth_mb)
                                          for row in growth(r, args.since)) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
