"""scripts/bench_overhead.py in miniature: every variant runs and lands in the report; the ratio and
train.py-window arithmetic; the overrides are valid train.py config keys. No speed is asserted: the
measured numbers live in benchmarks/ (a loaded machine would fail any pace assertion)."""
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from data_helpers import make_photo_folder

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "bench_overhead.py"


def load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_overhead
    return bench_overhead


@pytest.mark.slow
def test_miniature_run_reports_every_variant_and_the_ratios(tmp_path):
    make_photo_folder(tmp_path / "photos", (10, 10))
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--data", str(tmp_path / "photos"), "--model", "tresnet_tiny",
           "--img-size", "32", "--batch", "4", "--workers", "1", "--steps", "2", "--warmup", "2",
           "--log-every", "2", "--repeats", "1", "--backends", "torch", "--device", "cpu",
           "--out-dir", str(out), "--tag", "mini"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (json_path,) = out.glob("*-cpu-mini.json")
    report = json.loads(json_path.read_text())
    (round_,) = report["rounds"]
    assert set(round_) == {"torch/bare", "torch/trainpy", "torch/trainpy_full", "torch/loader",
                           "timm/bare_timm", "timm/timm_loader"}
    for key, result in round_.items():
        assert "error" not in result, (key, result)
        assert result["img_per_s"] > 0 and math.isfinite(result["img_per_s"])
        assert result["load_before"] >= 0
    ratios = {(r["numerator"], r["denominator"]): r for r in report["ratios"]}
    overhead = ratios[("torch/trainpy", "torch/bare")]
    assert overhead["ratio"] == pytest.approx(round_["torch/trainpy"]["img_per_s"]
                                              / round_["torch/bare"]["img_per_s"])
    assert overhead["goal"] == 0.98 and overhead["status"] in ("met", "missed")
    assert ratios[("torch/loader", "timm/timm_loader")]["goal"] == 1.0
    md = json_path.with_suffix(".md").read_text()
    assert report["command"] in md and "scripts/bench_overhead.py" in report["command"]
    assert "train.py, full recipe" in md and report["env"]["torch"] in md


def test_trainpy_rate_counts_only_the_windows_after_warmup(tmp_path):
    bo = load_script()
    args = SimpleNamespace(warmup=4, steps=4, batch=10)
    rows = [{"kind": "train", "step": s, "train/img_per_s": r}
            for s, r in ((1, 1.0), (4, 2.0), (6, 20.0), (8, 5.0))]  # windows of steps done
    rows.insert(2, {"kind": "val", "step": 4, "val/top1": 50.0})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # steps 5-6 at 20 img/s (1 s), steps 7-8 at 5 img/s (4 s): 40 images in 5 s
    assert bo.trainpy_img_per_s(metrics, args) == pytest.approx(8.0)
    with pytest.raises(RuntimeError, match="expected 60"):
        bo.trainpy_img_per_s(metrics, SimpleNamespace(warmup=4, steps=6, batch=10))


def test_ratios_are_medians_of_per_round_ratios():
    bo = load_script()
    rounds = [{"torch/bare": {"img_per_s": b}, "torch/trainpy": {"img_per_s": t},
               "torch/loader": {"img_per_s": 10.0}, "timm/timm_loader": {"img_per_s": 9.0}}
              for b, t in ((100, 99), (50, 45), (80, 80))]
    rows = {r["what"]: r for r in bo.ratios(rounds)}
    assert rows["trainpy_vs_bare"]["ratio"] == pytest.approx(0.99)  # median of 0.99, 0.9, 1.0
    assert rows["trainpy_vs_bare"]["status"] == "met"
    assert rows["loader_vs_timm_loader"]["ratio"] == pytest.approx(10 / 9)
    assert "trainpy_full_vs_bare" not in rows  # not measured: no row
    assert bo.load_range({"rounds": [{"a": {"load_before": 3.0}}, {"b": {"load_before": 12.5}}]}) == (
        "3.0-12.5")


def test_overrides_are_valid_config_and_differ_only_in_the_recipe(tmp_path):
    from tresnet_train.config import load_config
    bo = load_script()
    make_photo_folder(tmp_path, (1, 1))  # two classes
    args = bo.parse_args(["--data", str(tmp_path), "--device", "cpu"])
    off = load_config(None, bo.overrides(args, "torch", "trainpy"))
    full = load_config(None, bo.overrides(args, "torch", "trainpy_full"))
    assert (off.train.ema, off.data.mixup, off.data.randaugment, off.train.label_smoothing) == (
        False, 0.0, "", 0.0)
    assert (full.train.ema, full.data.mixup, full.data.randaugment) == (True, 0.2,
                                                                        "rand-m9-mstd0.5-inc1")
    assert full.run.ckpt_every_steps == args.warmup + args.steps // 2  # inside the timed steps
    assert off.train.steps_per_epoch == args.warmup + args.steps and off.model.num_classes == 2
