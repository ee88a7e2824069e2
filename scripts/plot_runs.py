"""One PNG comparing training runs: what people look at first.

    python scripts/plot_runs.py runs/a runs/b [...] [--out runs.png]

Reads each run folder's `metrics.jsonl` (written by the trainer: "train" records with train/loss and
train/lr every `run.log_every` steps, "val" records with val/top1 and val_ema/top1 per validation)
and, when present, `summary.json` (best top-1, for the legend). Six panels: train loss, learning
rate and val top-1 (model solid, EMA dashed) against epoch (top row) and against wall-clock hours
since the run started (bottom row; a resumed run's time away counts). Runs are overlaid, one colour
each. A run still training is plotted as far as it got.

Needs matplotlib (`pip install -e '.[plot]'`). Exit codes: 0 written; 2 a run folder without
metrics, or no matplotlib (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

EXIT_USAGE = 2
PANELS = (("train/loss", "train loss", False), ("train/lr", "learning rate", False),
          ("val/top1", "val top-1 (%)", True))  # (metric, title, has an EMA twin)


class RunError(Exception):
    """A run folder that cannot be plotted; the message names it."""


@dataclass
class Run:
    name: str
    steps_per_epoch: float | None  # None: no validation or summary yet, epoch unknown
    start_time: float  # unix seconds
    train: list[dict] = field(default_factory=list)  # train records, by step, last write wins
    val: list[dict] = field(default_factory=list)
    best: float | None = None

    def epoch(self, record: dict) -> float | None:
        if "epoch" in record:
            return float(record["epoch"])
        return (record["step"] + 1) / self.steps_per_epoch if self.steps_per_epoch else None

    def hours(self, record: dict) -> float:
        return (record["time"] - self.start_time) / 3600.0


def read_run(folder: Path, name: str) -> Run:
    """Parse one run folder (a half-written last line of a running run is skipped)."""
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise RunError(f"{folder}: no metrics.jsonl (not a run folder, or the run has not logged yet)")
    latest: dict[tuple[str, int], dict] = {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("kind") in ("train", "val") and "step" in record:
            latest[(record["kind"], int(record["step"]))] = record  # a resumed run redoes some steps
    if not latest:
        raise RunError(f"{folder}: metrics.jsonl holds no train or val records yet")
    records = sorted(latest.values(), key=lambda r: r["step"])
    summary = {}
    if (folder / "summary.json").is_file():
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except json.JSONDecodeError:
            pass
    val = [r for r in records if r["kind"] == "val"]
    steps_per_epoch = None
    if val and val[-1].get("epoch"):
        steps_per_epoch = val[-1]["step"] / val[-1]["epoch"]
    elif summary.get("epochs") and summary.get("global_step"):
        steps_per_epoch = summary["global_step"] / summary["epochs"]
    start = min(r["time"] for r in records)
    if (folder / "config.yaml").is_file():  # written when the run starts: counts the set-up time too
        start = min(start, (folder / "config.yaml").stat().st_mtime)
    best = (summary.get("best") or {}).get("top1")
    if best is None and val:
        best = max(max(r.get("val/top1", 0.0), r.get("val_ema/top1", 0.0)) for r in val)
    return Run(name, steps_per_epoch, start, [r for r in records if r["kind"] == "train"], val, best)


def plot(runs: list[Run], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        for col, (metric, _, has_ema) in enumerate(PANELS):
            records = run.val if metric.startswith("val") else run.train
            series = [(metric, "-")] + ([(metric.replace("val/", "val_ema/"), "--")] if has_ema else [])
            for key, style in series:
                points = [r for r in records if key in r]
                if not points:
                    continue
                epochs = [run.epoch(r) for r in points]
                if None not in epochs:
                    axes[0, col].plot(epochs, [r[key] for r in points], style, color=colour,
                                      marker="o" if metric.startswith("val") else None, markersize=3)
                axes[1, col].plot([run.hours(r) for r in points], [r[key] for r in points], style,
                                  color=colour, marker="o" if metric.startswith("val") else None,
                                  markersize=3)
    for col, (metric, title, _) in enumerate(PANELS):
        for row, xlabel in enumerate(("epoch", "wall-clock hours")):
            ax = axes[row, col]
            ax.set_title(f"{title} vs {xlabel.split()[-1]}")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if metric == "train/lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    handles = [Line2D([], [], color=colours[i % len(colours)],
                      label=run.name + (f" (best {run.best:.2f}%)" if run.best is not None else ""))
               for i, run in enumerate(runs)]
    handles += [Line2D([], [], color="grey", linestyle="-", label="model"),
                Line2D([], [], color="grey", linestyle="--", label="EMA")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (run.output_dir)")
    parser.add_argument("--out", default="runs.png", help="PNG to write (default: runs.png)")
    args = parser.parse_args(argv)
    folders = [Path(r) for r in args.runs]
    # Legend names: the folder name, or the path where two runs share a name.
    names = [f.name if [g.name for g in folders].count(f.name) == 1 else str(f) for f in folders]
    try:
        runs = [read_run(f, n) for f, n in zip(folders, names)]
        import matplotlib  # noqa: F401
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError:
        print("error: matplotlib is not installed: pip install matplotlib (or pip install -e '.[plot]')",
              file=sys.stderr)
        return EXIT_USAGE
    plot(runs, Path(args.out))
    print(f"wrote {args.out} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
