"""Seconds and bytes an improving epoch spends writing checkpoints: three writes, or one and two links.

    python scripts/bench_checkpoint.py                      # TResNet-XL, 3 repeats, a temp dir beside --out-dir
    python scripts/bench_checkpoint.py --model tresnet_tiny --repeats 1 --out-dir /tmp/b   # smoke

An improving epoch that enters the top-k leaves three names on disk: `last.pth`, `best.pth` and
`top/epoch_XXXX.pth` (tresnet_train/checkpoint.py). The state is a real end-of-epoch state: the
model's weights, its EMA and SGD's momentum buffers (Nesterov, as the recipes train), plus the
trainer's small entries. Three ways are measured, each `--repeats` times in a fresh temp folder on
the disk of `--dir`, median reported:

- three writes: `checkpoint.save_atomic` three times (serialise, fsync, rename each time);
- one write + links: `save_atomic` once, then `checkpoint.link_atomic` twice (what the trainer does);
- one write + copies: the same with `os.link` refused (a file system without hard links), so
  `link_atomic` falls back to its atomic, fsynced copy.

Bytes: the disk blocks (st_blocks) of the distinct files behind the three names, and, where Linux
reports it, the bytes this process sent to storage (`write_bytes` of /proc/self/io). Seconds: wall
clock of the three names' writing, fsyncs included, measured on a machine others may share.

Output: <out-dir>/checkpoint-write.json and .md with the command, device, file system and versions.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import environment  # noqa: E402
from tresnet_train import checkpoint  # noqa: E402
from tresnet_train.models import create_model  # noqa: E402

WAYS = ("three writes", "one write + links", "one write + copies")
NAMES = (checkpoint.LAST, checkpoint.BEST, f"{checkpoint.TOP_DIR}/epoch_0001.pth")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tresnet_xl", help="registered model name")
    p.add_argument("--repeats", type=int, default=3, help="runs of each way; the median is reported")
    p.add_argument("--out-dir", default="benchmarks", help="where the .json and .md go")
    p.add_argument("--dir", default=None,
                   help="folder on the disk to measure; temp folders go inside (default: --out-dir)")
    return p.parse_args(argv)


def epoch_state(model_name: str) -> dict:
    """An end-of-epoch checkpoint as the trainer writes it: model, EMA, SGD momentum, small entries."""
    model = create_model(model_name, norm="bn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for p in model.parameters():  # one step fills every momentum buffer
        p.grad = torch.randn_like(p)
    optimizer.step()
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    return {"model": model.state_dict(), "ema": ema, "optimizer": optimizer.state_dict(),
            "epoch": 1, "step_in_epoch": 0, "global_step": 1000, "model_name": model_name}


def proc_write_bytes() -> int | None:
    """Bytes this process caused to be sent to storage so far (Linux), None where not reported."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


@contextmanager
def links_refused():
    """`os.link` fails as on a file system without hard links."""
    def refuse(src, dst, *args, **kwargs):
        raise OSError(1, "Operation not permitted (links refused by the benchmark)")
    with mock.patch.object(os, "link", refuse):
        yield


def write_epoch(state: dict, folder: Path, way: str) -> None:
    """Leave the three names of an improving epoch in `folder`, the `way` way."""
    last, *others = (folder / name for name in NAMES)
    if way == "three writes":
        for path in (last, *others):
            path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.save_atomic(state, path)
        return
    checkpoint.save_atomic(state, last)
    with links_refused() if way == "one write + copies" else nullcontext():
        for path in others:
            checkpoint.link_atomic(last, path)


def disk_bytes(folder: Path) -> tuple[int, int]:
    """(disk blocks in bytes, file sizes) of the distinct files behind the three names."""
    inodes = {}
    for name in NAMES:
        st = (folder / name).stat()
        inodes[(st.st_dev, st.st_ino)] = st
    return (sum(st.st_blocks * 512 for st in inodes.values()),
            sum(st.st_size for st in inodes.values()))


def measure(state: dict, root: Path, way: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=root) as tmp:
        before = proc_write_bytes()
        t0 = time.perf_counter()
        write_epoch(state, Path(tmp), way)
        seconds = time.perf_counter() - t0
        after = proc_write_bytes()
        blocks, sizes = disk_bytes(Path(tmp))
        distinct = len({(Path(tmp) / n).stat().st_ino for n in NAMES})
    return {"seconds": seconds, "disk_bytes": blocks, "file_bytes": sizes, "distinct_files": distinct,
            "process_write_bytes": None if before is None else after - before}


def summarise(runs: list[dict]) -> dict:
    out = {"repeats": runs}
    for key in ("seconds", "disk_bytes", "file_bytes", "process_write_bytes"):
        values = [r[key] for r in runs if r[key] is not None]
        out[f"median_{key}"] = statistics.median(values) if values else None
    out["distinct_files"] = runs[0]["distinct_files"]
    return out


def file_system(path: Path) -> str:
    """The type and mount point of the file system holding `path` (/proc/mounts), for the report."""
    path = path.resolve()
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown file system"
    mounts = [(mount, fstype) for _, mount, fstype, *_ in map(str.split, lines)
              if path.is_relative_to(mount)]
    mount, fstype = max(mounts, key=lambda m: len(m[0]), default=("?", "unknown"))
    return f"{fstype} at {mount}"


def to_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Checkpoint writes per improving epoch: {report['model']}", "",
             f"`{report['command']}`", "",
             f"{env['device']} ({env['host_cpus']} CPUs), {report['file_system']}; torch "
             f"{env['torch']}, Python {env['python']}, {env['date']}, commit {env['git_commit']}. "
             f"State: {report['state_bytes'] / 1e9:.2f} GB of tensors (model + EMA + SGD momentum). "
             f"Median of {report['repeats']} runs; wall clock on a shared machine.", "",
             "| way | seconds | disk bytes (st_blocks) | bytes sent to storage | files |",
             "|---|---|---|---|---|"]
    for way in WAYS:
        r = report["ways"][way]
        sent = r["median_process_write_bytes"]
        lines.append(f"| {way} | {r['median_seconds']:.2f} | {r['median_disk_bytes'] / 1e9:.2f} GB | "
                     f"{'n/a' if sent is None else f'{sent / 1e9:.2f} GB'} | {r['distinct_files']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    # link_atomic warns that it copies where links fail: here that is the way being measured
    logging.getLogger(checkpoint.__name__).setLevel(logging.ERROR)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.dir or out)
    state = epoch_state(args.model)
    report = {"command": "python " + shlex.join([sys.argv[0], *(argv if argv is not None
                                                                 else sys.argv[1:])]),
              "model": args.model, "repeats": args.repeats, "names": list(NAMES),
              "state_bytes": checkpoint.tensor_bytes(state), "file_system": file_system(root),
              "environment": environment(torch.device("cpu")), "ways": {}}
    for way in WAYS:
        report["ways"][way] = summarise([measure(state, root, way) for _ in range(args.repeats)])
        r = report["ways"][way]
        print(f"{way}: {r['median_seconds']:.2f} s, {r['median_disk_bytes'] / 1e9:.2f} GB on disk",
              flush=True)
    (out / "checkpoint-write.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "checkpoint-write.md").write_text(to_markdown(report))
    print(f"wrote {out / 'checkpoint-write'}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
