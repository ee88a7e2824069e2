"""scripts/bench_overhead.py in miniature: every variant runs (side by side, in turns) and lands in
the report; the ratio and timing arithmetic; processes stopped outside their turns; the overrides are
valid train.py config keys. No speed is asserted: the measured numbers live in benchmarks/ (a loaded
machine would fail any pace assertion)."""
import json
import math
import signal
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
           "--turns", "0.5", "--out-dir", str(out), "--tag", "mini"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (json_path,) = out.glob("*-cpu-mini.json")
    report = json.loads(json_path.read_text())
    (round_,) = report["rounds"]
    assert set(round_) == {"torch/bare", "torch/bare_again", "torch/trainpy", "torch/trainpy_full",
                           "torch/loader", "timm/bare_timm", "timm/timm_loader"}
    for key, result in round_.items():
        assert "error" not in result, (key, result)
        assert result["img_per_s"] > 0 and math.isfinite(result["img_per_s"])
        assert 0 < result["timed_s"] <= result["wall_s"] and result["load_before"] >= 0
    ratios = {(r["numerator"], r["denominator"]): r for r in report["ratios"]}
    overhead = ratios[("torch/trainpy", "torch/bare")]
    assert overhead["ratio"] == pytest.approx(round_["torch/trainpy"]["img_per_s"]
                                              / round_["torch/bare"]["img_per_s"])
    assert overhead["goal"] == 0.98 and overhead["status"] in ("met", "missed")
    assert ratios[("torch/loader", "timm/timm_loader")]["goal"] == 1.0
    assert ratios[("torch/bare_again", "torch/bare")]["goal"] is None  # the control
    md = json_path.with_suffix(".md").read_text()
    assert report["command"] in md and "scripts/bench_overhead.py" in report["command"]
    assert "train.py, full recipe" in md and report["env"]["torch"] in md


def test_trainpy_is_timed_between_its_records_after_warmup_and_after_the_timed_steps(tmp_path):
    bo = load_script()
    args = SimpleNamespace(warmup=4, steps=4, batch=10)
    rows = [{"kind": "train", "step": s, "time": t} for s, t in ((1, 100.0), (4, 103.0), (6, 104.0),
                                                                  (8, 108.0))]
    rows.insert(2, {"kind": "val", "step": 4, "time": 103.5, "val/top1": 50.0})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert bo.trainpy_stamps(metrics, args) == {"images": 40, "t0": 103.0, "t1": 108.0}
    with pytest.raises(RuntimeError, match="no train record at step 4 or 10"):
        bo.trainpy_stamps(metrics, SimpleNamespace(warmup=4, steps=6, batch=10))


def test_only_the_seconds_inside_its_own_turns_count():
    bo = load_script()
    turns = [(0.0, 3.0), (6.0, 9.0), (12.0, 15.0)]  # stopped 3-6 and 9-12
    assert bo.running_seconds(2.0, 13.0, turns) == pytest.approx(1.0 + 3.0 + 1.0)
    assert bo.running_seconds(7.0, 8.0, turns) == pytest.approx(1.0)
    assert bo.running_seconds(1.0, 14.0, [(0.0, math.inf)]) == pytest.approx(13.0)


STAMPER = """
import os, sys, time
child = os.fork()  # a second process in the group, as a loader worker is
with open(f"{sys.argv[1]}-{'parent' if child else 'worker'}", "w", buffering=1) as out:
    for _ in range(120):
        out.write(f"{time.time()}\\n")
        time.sleep(0.005)
if child:
    os.waitpid(child, 0)
"""


def test_processes_take_turns_and_each_stamps_only_inside_its_own(tmp_path):
    """Two process groups with a forked child each: every time stamp a process wrote after its start-up
    (before the first turns, both run until stopped) falls inside one of its own group's turns."""
    bo = load_script()
    procs = [subprocess.Popen([sys.executable, "-c", STAMPER, str(tmp_path / name)],
                              start_new_session=True) for name in ("a", "b")]
    turns = bo.take_turns(procs, 0.1, timeout=600)
    assert [p.returncode for p in procs] == [0, 0]
    for name, own in zip(("a", "b"), turns):
        assert len(own) >= 2
        for role in ("parent", "worker"):
            stamps = [float(t) for t in (tmp_path / f"{name}-{role}").read_text().split()]
            assert len(stamps) == 120
            outside = [t for t in stamps if t >= own[0][0]
                       and not any(start <= t <= end for start, end in own)]
            assert not outside, (name, role, outside[:3], own)
    (alone,) = bo.take_turns([subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)],
                             math.inf, timeout=600)
    assert len(alone) == 1


KILLED_HARNESS = """
import subprocess, sys
sys.path.insert(0, sys.argv[1])
import bench_overhead as bo

def sleeper(args, backend, variant, folder, env):
    # the child says its pid once it runs: by then the harness holds it in its list of children
    return subprocess.Popen([sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); "
                             "time.sleep(600)"], start_new_session=True)

bo.start_child = sleeper
bo.stop_on_signals()
bo.run_children(None, [("torch", "bare"), ("torch", "trainpy")], 0.1)
"""


def test_a_killed_run_takes_its_stopped_children_with_it():
    harness = subprocess.Popen([sys.executable, "-c", KILLED_HARNESS, str(SCRIPT.parent)],
                               stdout=subprocess.PIPE, text=True)
    pids = [int(harness.stdout.readline()) for _ in range(2)]
    harness.terminate()
    assert harness.wait(timeout=600) == 128 + signal.SIGTERM
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"child {pid} outlived the killed benchmark"


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
