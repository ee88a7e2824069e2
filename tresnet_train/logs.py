"""What a run tells people: console progress, a JSON-lines metrics file, TensorBoard scalars.

Everything here runs on rank 0 only (other ranks get a `MetricsLog(enabled=False)` that drops every
call). Values arrive as Python floats: the trainer calls `.item()` at log points only.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from .distributed import MainProcessFilter, World


def setup_console(world: World, level: int = logging.INFO) -> None:
    """Log lines to stdout on rank 0; warnings with `extra={'all_ranks': True}` on every rank."""
    handler = logging.StreamHandler(sys.stdout)
    prefix = f"[rank {world.rank}] " if world.distributed else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    handler.addFilter(MainProcessFilter(world))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """One progress line per epoch: step, loss, lr, img/s, the epoch's and the run's ETA (redrawn in
    place on a terminal). The run's ETA counts training steps at this epoch's pace, not validation."""

    def __init__(self, enabled: bool, epoch: int, epochs: int, steps: int, start_step: int = 0):
        self.enabled = enabled
        self.head = f"epoch {epoch + 1}/{epochs}"
        self.steps = steps
        self.later_steps = (epochs - epoch - 1) * steps  # in the epochs after this one
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.tty = sys.stdout.isatty()

    def update(self, step: int, loss: float, lr: float, img_per_s: float) -> None:
        if not self.enabled:
            return
        done = step + 1 - self.start_step
        per_step = (time.perf_counter() - self.t0) / max(done, 1)
        left = self.steps - step - 1
        line = (f"{self.head} [{step + 1:>{len(str(self.steps))}}/{self.steps}] loss {loss:.4f} "
                f"lr {lr:.3e} {img_per_s:,.0f} img/s eta {duration(per_step * left)} "
                f"(run {duration(per_step * (left + self.later_steps))})")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(flush=True)


class MetricsLog:
    """metrics.jsonl (one JSON object per record) and TensorBoard scalars under `<run>/tb`."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool,
                 resume_step: int = 0):
        """`resume_step`: the optimizer steps done by the checkpoint this run starts from. Records
        after it (written before a kill, and about to be written again) are dropped from
        metrics.jsonl and hidden in TensorBoard (purge_step), so each step appears once."""
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        path = Path(output_dir) / "metrics.jsonl"
        _drop_records_after(path, resume_step)
        self.file = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tb"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def write(self, kind: str, step: int, **values: float) -> None:
        """Record `values` (e.g. train/loss) at global step `step` in both sinks."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _drop_records_after(path: Path, step: int) -> None:
    """Keep the records of `path` up to optimizer step `step`; rewritten whole, then renamed."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _record_step(line: str) -> float:
    """The step of one metrics.jsonl line; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
