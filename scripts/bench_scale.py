"""ImageNet's size on one machine: indexing, start-up and memory as the file count grows.

    python scripts/bench_scale.py --photos DIR [--work /tmp/tresnet_scale] [--sizes 10000,100000,full]
        [--procs 1,8] [--out benchmarks/scale]

Lays out an ImageNet-shaped tree under --work for each size N (train + val files; `full` is ImageNet's
1,281,167 + 50,000): 1,000 class folders named like ImageNet's (`n01440764`), train files
`<wnid>_<i>.JPEG`, val files `ILSVRC2012_val_<i>.JPEG`, all hard links to a few hundred real JPEGs
taken from --photos (any folder of JPEGs, e.g. an ImageFolder copy of Imagenette), plus one in 2,000
files zero-byte or truncated. Then, for each N:

  * index: seconds to list and check train/ and val/ (`tresnet_train.data.folder.index_split`), on a
    first run (empty cache) and a cached run, with 1 and with 8 processes (torchrun, gloo); the peak
    resident memory of each rank and the part the file lists hold; the cache files' size;
  * a changed file: one train file rewritten with another size, one touched (new mtime): the next
    start checks those two again and names them, and nothing else;
  * train.py: seconds from start to the first optimizer step, tresnet_tiny at 32 px, on each backend,
    with the cache warm; the peak resident memory of the main process and of a loader worker;
  * validate.py: its start-up on the val split (wall time minus the evaluation loop), at the full size.

Writes `<out>.json` and `<out>.md`. Everything runs on the CPU; a GPU is not needed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGENET_TRAIN, IMAGENET_VAL, CLASSES = 1_281_167, 50_000, 1000
BAD_EVERY = 2000  # one zero-byte or truncated file in this many
FIRST_STEP = re.compile(r"epoch 1/\d+ \[\s*1/")


# ---- the tree -------------------------------------------------------------------------------------
def wnids() -> list[str]:
    rng = random.Random(0)
    return sorted(f"n{n:08d}" for n in rng.sample(range(1_000_000, 15_000_000), CLASSES))


def split_sizes(total: int) -> tuple[int, int]:
    """(train, val) files for N in all, in ImageNet's proportion; at least one val file per class."""
    val = max(CLASSES, round(total * IMAGENET_VAL / (IMAGENET_TRAIN + IMAGENET_VAL)))
    return total - val, val


def copy_photos(src: Path, dest: Path, count: int = 300) -> list[Path]:
    """`count` real JPEGs copied onto the work disk (hard links need one file system), plus damaged ones."""
    photos = sorted(src.rglob("*.JPEG")) or sorted(src.rglob("*.jpg"))
    if not photos:
        raise SystemExit(f"bench_scale.py: no JPEG files under {src} (--photos)")
    dest.mkdir(parents=True, exist_ok=True)
    kept = []
    for i, p in enumerate(photos[:: max(1, len(photos) // count)][:count]):
        kept.append(dest / f"photo{i:04d}.JPEG")
        shutil.copyfile(p, kept[-1])
    (dest / "empty.JPEG").write_bytes(b"")
    data = kept[0].read_bytes()
    (dest / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    return kept


def lay_out(root: Path, total: int, photos: list[Path]) -> dict:
    """An ImageNet-shaped tree of `total` files under root (train/ and val/), hard links to `photos`."""
    stamp = root / "layout.json"
    if stamp.is_file():
        return json.loads(stamp.read_text())
    if root.exists():
        shutil.rmtree(root)
    damaged = [photos[0].parent / "empty.JPEG", photos[0].parent / "truncated.JPEG"]
    t0 = time.perf_counter()
    n_train, n_val = split_sizes(total)
    classes, bad, k = wnids(), 0, 0
    for split, n in (("train", n_train), ("val", n_val)):
        for c, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n // CLASSES + (c < n % CLASSES)):
                name = f"{wnid}_{i + 1}.JPEG" if split == "train" else f"ILSVRC2012_val_{k + 1:08d}.JPEG"
                k += 1
                if k % BAD_EVERY == 0 and i > 0:  # every class keeps a good file
                    source, bad = damaged[bad % 2], bad + 1
                else:
                    source = photos[k % len(photos)]
                os.link(source, folder / name)
    layout = {"files": total, "train": n_train, "val": n_val, "damaged": bad,
              "seconds_to_lay_out": round(time.perf_counter() - t0, 1)}
    stamp.write_text(json.dumps(layout))
    return layout


# ---- measuring child processes --------------------------------------------------------------------
def env(cache: Path) -> dict:
    return dict(os.environ, TRESNET_TRAIN_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _hwm_kib(pid: int) -> int:
    """Peak resident set (VmHWM) of a live process, KiB; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        return []


def run_until(command: list[str], cache: Path, pattern: re.Pattern | None, timeout: float = 3600) -> dict:
    """Run `command`; stop it at the first output line matching `pattern` (None: let it finish).

    Returns seconds to that line (or to the end), the output, and the peak resident memory of the main
    process and of its largest child (a loader worker), sampled from /proc while it runs.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    seconds, main_kib, child_kib = None, 0, 0
    while seconds is None:
        main_kib = max(main_kib, _hwm_kib(proc.pid))
        child_kib = max([child_kib] + [_hwm_kib(c) for c in _children(proc.pid)])
        if pattern is not None and any(pattern.search(line) for line in lines):
            seconds = time.perf_counter() - t0
        elif proc.poll() is not None:
            reader.join()
            if pattern is None and proc.returncode == 0:
                seconds = time.perf_counter() - t0
            else:
                raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{''.join(lines)[-3000:]}")
        elif time.perf_counter() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"{' '.join(command)}: no result within {timeout} s")
        time.sleep(0.1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join()
    return {"seconds": round(seconds, 2), "output": "".join(lines), "main_peak_mib": round(main_kib / 1024, 1),
            "worker_peak_mib": round(child_kib / 1024, 1)}


def index_worker(root: str, report: str) -> None:
    """One rank of the index measurement (run by torchrun or directly): writes its numbers as JSON."""
    import gc
    import logging

    import torch.distributed as dist

    from tresnet_train.data import folder
    from tresnet_train.data.folder import index_split
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    checks, check_image = itertools.count(), folder.check_image  # files this rank reads the header of

    def counted(path: str) -> str | None:
        next(checks)
        return check_image(path)
    folder.check_image = counted
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    gc.collect()
    before = _rss_kib()
    t0 = time.perf_counter()
    splits = [index_split(root, split, threads=8) for split in ("train", "val")]
    seconds = time.perf_counter() - t0
    gc.collect()
    rank = dist.get_rank() if world > 1 else 0
    Path(f"{report}.{rank}").write_text(json.dumps({
        "seconds": seconds, "files": sum(len(s.samples) + len(s.skipped) for s in splits),
        "skipped": sum(len(s.skipped) for s in splits), "checked": next(checks),
        "file_list_mib": (_rss_kib() - before) / 1024,
        "peak_mib": _hwm_kib(os.getpid()) / 1024}))
    if world > 1:
        dist.destroy_process_group()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def measure_index(root: Path, cache: Path, procs: int, report: Path) -> dict:
    command = [sys.executable, __file__, "--index-worker", str(root), str(report)]
    if procs > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={procs}", *command[1:]]
    run = run_until(command, cache, None)
    ranks = [json.loads(p.read_text()) for p in sorted(report.parent.glob(report.name + ".*"))]
    for p in report.parent.glob(report.name + ".*"):
        p.unlink()
    return {"procs": procs, "wall_s": run["seconds"], "index_s": round(max(r["seconds"] for r in ranks), 2),
            "peak_mib_per_rank": round(max(r["peak_mib"] for r in ranks), 1),
            "file_list_mib_per_rank": round(max(r["file_list_mib"] for r in ranks), 1),
            "skipped": ranks[0]["skipped"], "checked_per_rank": [r.get("checked") for r in ranks],
            "output": run["output"]}


def cache_mib(cache: Path) -> float:
    return round(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20, 2)


def change_two_files(root: Path) -> list[str]:
    """Rewrite one train file with another size and touch another; returns their relative paths."""
    classes = sorted(os.listdir(root / "train"))
    first = sorted(os.listdir(root / "train" / classes[1]))[0]
    second = sorted(os.listdir(root / "train" / classes[2]))[0]
    resized, touched = root / "train" / classes[1] / first, root / "train" / classes[2] / second
    data = resized.read_bytes()
    resized.unlink()  # a new file, not the shared hard link
    resized.write_bytes(data + b"\0" * 16)
    touched_data = touched.read_bytes()
    touched.unlink()
    touched.write_bytes(touched_data)
    later = time.time() + 5
    os.utime(touched, (later, later))
    return [f"{classes[1]}/{first}", f"{classes[2]}/{second}"]


def train_command(root: Path, out: Path, backend: str) -> list[str]:
    return [sys.executable, "train.py", "--config", "configs/demo.yaml", "data.source=folder",
            f"data.root={root}", f"data.backend={backend}", "model.name=tresnet_tiny",
            f"model.num_classes={CLASSES}", "data.img_size=32", "data.batch_size=32", "data.workers=2",
            "train.epochs=1", "train.steps_per_epoch=5", "run.device=cpu", f"run.output_dir={out}",
            "run.resume=none"]


def validate_startup(root: Path, cache: Path, work: Path) -> dict:
    """validate.py on the whole val split: start-up = wall time minus its evaluation loop."""
    import torch

    from tresnet_train.models import create_model
    ckpt = work / "tiny.pth"
    torch.save(create_model("tresnet_tiny", num_classes=CLASSES, norm="bn").state_dict(), ckpt)
    report = work / "validate.json"
    run = run_until([sys.executable, "validate.py", "--ckpt", str(ckpt), "--model", "tresnet_tiny",
                     "--data", str(root), "--img-size", "32", "--batch-size", "250", "--backend", "torch",
                     "--device", "cpu", "--workers", "2", "--json", str(report)], cache, None)
    result = json.loads(report.read_text())
    return {"wall_s": run["seconds"], "eval_s": round(result["eval_seconds"], 2),
            "startup_s": round(run["seconds"] - result["eval_seconds"], 2),
            "images": result["num_images"], "main_peak_mib": run["main_peak_mib"]}


def measure(n: int, args, photos: list[Path]) -> dict:
    root = args.work / f"tree_{n}"
    row = {"files": n, **lay_out(root, n, photos)}
    print(f"[{n} files] laid out ({row['seconds_to_lay_out']} s)", flush=True)
    for procs in args.procs:
        cache = args.work / f"cache_{n}_{procs}"
        shutil.rmtree(cache, ignore_errors=True)
        first = measure_index(root, cache, procs, args.work / "index")
        cached = measure_index(root, cache, procs, args.work / "index")
        first.pop("output"), cached.pop("output")
        row[f"index_{procs}p"] = {"first": first, "cached": cached, "cache_mib": cache_mib(cache)}
        print(f"[{n} files] index, {procs} process(es): first {first['index_s']} s, cached "
              f"{cached['index_s']} s, file list {cached['file_list_mib_per_rank']} MiB per rank", flush=True)
    cache = args.work / f"cache_{n}_1"
    for backend in args.backends:
        run = run_until(train_command(root, args.work / f"run_{n}_{backend}", backend), cache, FIRST_STEP)
        run.pop("output")
        row[f"train_first_step_{backend}"] = run
        print(f"[{n} files] train.py, {backend}: first step after {run['seconds']} s", flush=True)
    changed = change_two_files(root)
    after = measure_index(root, cache, 1, args.work / "index")
    row["changed_files"] = {"changed": changed, "index_s": after["index_s"],
                            "named": all(c in after["output"] for c in changed),
                            "log": [line for line in after["output"].splitlines() if "changed" in line][:3]}
    if n >= IMAGENET_TRAIN:
        row["validate"] = validate_startup(root, cache, args.work)
        print(f"[{n} files] validate.py start-up {row['validate']['startup_s']} s", flush=True)
    return row


def slope(rows: list[dict], key) -> float | None:
    """Fitted exponent b of seconds = a * files^b (1: linear)."""
    points = [(r["files"], key(r)) for r in rows if key(r)]
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return round(float(np.polyfit(x, y, 1)[0]), 3)


def _most(counts: list | None) -> str:
    return f"{max(counts):,}" if counts and None not in counts else "-"


def markdown(result: dict) -> str:
    rows, procs = result["rows"], result["procs"]
    head = ["files"] + [f"index {p}p first / cached (s)" for p in procs] + \
        [f"file list per rank, {p}p (MiB)" for p in procs] + \
        [f"headers read per rank, {p}p first" for p in procs] + ["cache (MiB)"] + \
        [f"train.py to 1st step, {b} (s)" for b in result["backends"]] + \
        [f"train.py peak, {b}: main / worker (MiB)" for b in result["backends"]] + \
        ["2 changed files: re-index (s), named"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['files']:,}"]
        cells += [f"{r[f'index_{p}p']['first']['index_s']} / {r[f'index_{p}p']['cached']['index_s']}"
                  for p in procs]
        cells += [f"{r[f'index_{p}p']['cached']['file_list_mib_per_rank']}" for p in procs]
        cells += [_most(r[f"index_{p}p"]["first"].get("checked_per_rank")) for p in procs]
        cells += [f"{r[f'index_{procs[0]}p']['cache_mib']}"]
        cells += [f"{r[f'train_first_step_{b}']['seconds']}" for b in result["backends"]]
        cells += [f"{r[f'train_first_step_{b}']['main_peak_mib']} / "
                  f"{r[f'train_first_step_{b}']['worker_peak_mib']}" for b in result["backends"]]
        cells += [f"{r['changed_files']['index_s']}, {'yes' if r['changed_files']['named'] else 'no'}"]
        lines.append("| " + " | ".join(cells) + " |")
    text = ["# Scale: indexing, start-up and memory against the number of files\n",
            f"Command: `{result['command']}`  ",
            f"Machine: {result['machine']}; {result['versions']}  ",
            f"Date: {result['date']}\n", *lines, ""]
    text.append("Fitted exponent b of seconds = a * files^b (1 = linear): " + ", ".join(
        f"{k} {v}" for k, v in result["slopes"].items()) + "\n")
    full = next((r for r in rows if "validate" in r), None)
    if full:
        v = full["validate"]
        text.append(f"validate.py on the {v['images']:,}-image val split: start-up {v['startup_s']} s "
                    f"(wall {v['wall_s']} s, evaluation loop {v['eval_s']} s, peak {v['main_peak_mib']} MiB).\n")
    return "\n".join(text)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--index-worker":
        index_worker(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=Path, required=True, help="a folder with real JPEGs (searched recursively)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tresnet_scale"),
                    help="where the trees and caches go (a local disk with a few GB free)")
    ap.add_argument("--sizes", default="10000,100000,full", help="files in all (train + val); full = ImageNet's")
    ap.add_argument("--procs", default="1,8", help="process counts for the index measurement")
    ap.add_argument("--backends", default="torch,dali")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scale")
    args = ap.parse_args()
    args.procs = [int(p) for p in args.procs.split(",")]
    args.backends = args.backends.split(",")
    sizes = [IMAGENET_TRAIN + IMAGENET_VAL if s == "full" else int(s) for s in args.sizes.split(",")]
    photos = copy_photos(args.photos, args.work / "photos")
    rows = [measure(n, args, photos) for n in sizes]

    import torch
    versions = f"Python {platform.python_version()}, torch {torch.__version__}"
    try:
        import nvidia.dali
        versions += f", DALI {nvidia.dali.__version__}"
    except ImportError:
        pass
    result = {
        "command": "python scripts/bench_scale.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}",
        "versions": versions, "date": time.strftime("%Y-%m-%d"), "procs": args.procs,
        "backends": args.backends, "rows": rows,
        "slopes": {
            **{f"index {p}p first": slope(rows, lambda r, p=p: r[f"index_{p}p"]["first"]["index_s"])
               for p in args.procs},
            **{f"index {p}p cached": slope(rows, lambda r, p=p: r[f"index_{p}p"]["cached"]["index_s"])
               for p in args.procs},
            "file list MiB": slope(rows, lambda r: r[f"index_{args.procs[0]}p"]["cached"]["file_list_mib_per_rank"]),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
