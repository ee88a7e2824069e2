"""A/B of the training augmentation: the same short recipe through DALI and through torch, two seeds each.

    python scripts/bench_augment_ab.py --data ../data/imagenette-mini-96 --out benchmarks/augment-ab

Each run is `train.py` with RandAugment (timm's rand-m9-mstd0.5-inc1), random-resized crops and flips,
differing only in `data.backend` and `run.seed`; it reads top-1 and wall time from each run's
summary.json and writes OUT.json and OUT.md. The backends agree when the gap between their mean top-1
is within the seed-to-seed spread. Runs go one after the other, so they share the machine's load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = [  # dotted overrides on configs/demo.yaml: a tiny TResNet, one-cycle SGD, no EMA
    "data.source=folder", "model.num_classes=10", "data.img_size=64", "data.batch_size=32",
    "data.workers=2", "data.scale=[0.08,1.0]", "data.hflip=0.5",
    "data.randaugment=rand-m9-mstd0.5-inc1", "train.ema=false", "run.keep_top_k=0",
    "run.tensorboard=false", "run.log_every=50", "run.resume=none",
]


def run(backend: str, seed: int, args) -> dict:
    out = Path(args.runs) / f"{backend}-seed{seed}"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/demo.yaml"),
           *RECIPE, f"data.root={args.data}", f"data.backend={backend}", f"run.seed={seed}",
           f"train.epochs={args.epochs}", f"train.val_every={args.epochs}",
           f"run.output_dir={out}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    summary = json.loads((out / "summary.json").read_text())
    return {"backend": backend, "seed": seed, "top1": summary["final"]["model_top1"],
            "wall_s": round(time.perf_counter() - start, 1), "train_wall_s": summary["wall_time_s"]}


def report(results: list[dict], args) -> str:
    lines = [f"# Augmentation A/B: DALI vs torch ({args.epochs} epochs, {Path(args.data).name})", "",
             f"Recipe: configs/demo.yaml + `{' '.join(RECIPE)}`", "",
             "| backend | seed | top-1 (%) | wall time (s) |", "|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['seed']} | {r['top1']:.2f} | {r['wall_s']:.0f} |" for r in results]
    stats = summarize(results)
    lines += ["", f"Mean top-1: dali {stats['dali_mean']:.2f}, torch {stats['torch_mean']:.2f}; gap "
              f"{stats['gap']:.2f} points; seed-to-seed spread (largest within-backend difference) "
              f"{stats['spread']:.2f} points: the gap is {'within' if stats['within'] else 'OUTSIDE'} "
              f"the spread.", "", "Wall times measured one after the other on a shared machine."]
    return "\n".join(lines) + "\n"


def summarize(results: list[dict]) -> dict:
    by = {b: [r["top1"] for r in results if r["backend"] == b] for b in ("dali", "torch")}
    spread = max(max(v) - min(v) for v in by.values())
    gap = statistics.mean(by["dali"]) - statistics.mean(by["torch"])
    return {"dali_mean": statistics.mean(by["dali"]), "torch_mean": statistics.mean(by["torch"]),
            "gap": gap, "spread": spread, "within": abs(gap) <= spread}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="root with train/ and val/ (10 classes)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--runs", default="runs/augment-ab", help="folder for the four run folders")
    p.add_argument("--out", default="benchmarks/augment-ab", help="writes OUT.json and OUT.md")
    args = p.parse_args()
    results = [run(backend, seed, args) for seed in args.seeds for backend in ("dali", "torch")]
    Path(f"{args.out}.json").write_text(json.dumps(
        {"recipe": RECIPE, "data": args.data, "epochs": args.epochs, "runs": results,
         "summary": summarize(results)}, indent=1))
    Path(f"{args.out}.md").write_text(report(results, args))
    print(report(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
