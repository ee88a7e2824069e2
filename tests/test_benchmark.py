"""scripts/benchmark.py on CPU: a tiny model, two iterations; the report files, targets and merging.

The speed numbers themselves are measured on a GPU (benchmarks/README.md); these tests pin the
contract of the files a GPU run brings back.
"""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from data_helpers import real_photos

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One CPU run: tresnet_tiny at 32 px in three variants, plus a size its stem cannot take (30 px)."""
    out = tmp_path_factory.mktemp("bench")
    prior = out.parent / "prior.json"  # an earlier run's max batch: the 90%-of-max run uses it
    prior.write_text(json.dumps({"results": [
        {"model": "tresnet_tiny", "size": 32, "variant": "eager", "max_batch": {"max_batch": 10}}]}))
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--models", "tresnet_tiny,tresnet_tiny@30",
           "--max-batch-from", str(prior), "--mirror-dir", str(out.parent / "mirror"),
           "--sizes", "32", "--variants", "eager,channels_last,cudagraphs", "--batch", "2",
           "--iters", "2", "--warmup", "1", "--repeats", "2", "--out-dir", str(out),
           "--ours", "tresnet_tiny", "--timm-ref", "tresnet_tiny", "--resnet-ref", "tresnet_tiny",
           "--ratio-size", "32"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (json_path,) = out.glob("*.json")
    (md_path,) = out.glob("*.md")
    return json.loads(json_path.read_text()), md_path.read_text(), json_path, proc.stdout


@pytest.mark.slow
def test_cpu_report_has_environment_and_command(cpu_run):
    report, md, json_path, _ = cpu_run
    assert json_path.name.endswith("-cpu.json") and json_path.name[:4].isdigit()  # <date>-cpu.json
    env = report["device"]
    for key in ("device", "driver", "torch", "cuda", "cudnn", "timm", "date", "python"):
        assert key in env
    assert (json_path.parent.parent / "mirror" / json_path.name).read_text() == json_path.read_text()
    (run,) = report["runs"]
    assert "scripts/benchmark.py" in run["command"] and "--models" in run["command"]
    assert run["peak_bf16_matmul"] is None  # no matmul ceiling on CPU, so no MFU
    assert run["command"] in md and env["torch"] in md


@pytest.mark.slow
def test_cpu_measurements_are_sane(cpu_run):
    report = cpu_run[0]
    by_variant = {(r["size"], r["variant"]): r for r in report["results"]}
    for variant in ("eager", "channels_last"):
        r = by_variant[(32, variant)]
        assert r["status"] == "ok", r
        assert r["fwd_gflops"] > 0 and r["params_m"] > 0
        for kind in ("train", "infer"):
            m = r[kind]
            assert m["batch"] == 2 and m["img_per_s"] > 0 and math.isfinite(m["img_per_s"])
            assert len(m["img_per_s_repeats"]) == 2
            assert m["mfu"] is None and m["peak_mem_gib"] is None
        assert "max_batch" not in r  # the search is GPU-only
        big = r["train_big"]  # 90% of the earlier run's 10, down to a multiple of 8
        assert big["batch"] == 8 and big["img_per_s"] > 0 and "earlier run" in r["train_big_from"]
    assert by_variant[(32, "eager")]["memory_format"] == "nchw"
    assert by_variant[(32, "channels_last")]["memory_format"] == "channels_last"
    assert by_variant[(32, "cudagraphs")]["status"] == "skipped"


@pytest.mark.slow
def test_a_failing_model_is_recorded_not_fatal(cpu_run):
    report, md, _, _ = cpu_run
    bad = [r for r in report["results"] if r["size"] == 30]
    assert {r["variant"] for r in bad} == {"eager", "channels_last", "cudagraphs"}
    eager = next(r for r in bad if r["variant"] == "eager")
    assert eager["status"] == "error" and "error" in eager["train"]
    assert any(e.startswith("train: ") for e in eager["errors"])
    assert "train: " in md


@pytest.mark.slow
def test_targets_in_report(cpu_run):
    report, md, _, stdout = cpu_run
    targets = {t["target"]: t for t in report["targets"]}
    # ours is every reference here: best variant over best variant is exactly 1.
    assert targets["train_vs_resnet50"]["ratio"] == pytest.approx(1.0)
    assert targets["train_vs_resnet50"]["status"] == "met"  # goal 0.9
    eager = targets["train_vs_timm_eager"]  # best variant over eager: >= 1
    assert eager["ratio"] >= 1.0 and eager["status"] == ("met" if eager["ratio"] >= 1.25 else "missed")
    assert targets["max_batch_vs_resnet50"]["status"] == "not measured"
    assert targets["train_vs_timm_compile"]["status"] == "not measured"
    assert "target train_vs_timm_eager" in stdout


def fake_result(model, variant, train, infer, max_batch=None, size=224):
    r = {"model": model, "size": size, "variant": variant, "status": "ok",
         "train": {"img_per_s": train, "batch": 256}, "infer": {"img_per_s": infer, "batch": 256}}
    if max_batch:
        r["max_batch"] = {"max_batch": max_batch, "limit_reached": False}
    return r


def fake_report(bm, results, e2e=()):
    args = bm.parse_args(["--device", "cpu"])
    report = bm.new_report(args)
    report["results"], report["e2e"] = list(results), list(e2e)
    return report


def test_targets_use_best_variant_and_the_right_baselines():
    bm = load_benchmark()
    report = fake_report(bm, [
        fake_result("tresnet_m", "eager", 1000, 3000, max_batch=800),
        fake_result("tresnet_m", "iabn", 1100, 3100, max_batch=1000),
        fake_result("tresnet_m", "compile", 1300, 3500),
        fake_result("timm/tresnet_m", "eager", 1000, 2900, max_batch=700),
        fake_result("timm/tresnet_m", "compile", 1400, 3600),
        fake_result("timm/tresnet_m", "channels_last", 5000, 1),  # not the baseline: ignored
        fake_result("timm/resnet50", "eager", 1200, 4000, max_batch=500),
        fake_result("timm/resnet50", "channels_last", 1500, 3000),
        fake_result("tresnet_m", "eager", 1, 1, size=448),  # other size: ignored
    ], e2e=[{"model": "tresnet_m", "size": 224, "batch": 256, "epochs": 3, "train_images": 9469,
             "workers": 14, "runs": {
        "synthetic": {"img_per_s": 1000.0}, "dali": {"img_per_s": 960.0}}}])
    t = {x["target"]: x for x in bm.compute_targets(report)}
    assert t["train_vs_timm_eager"]["ratio"] == pytest.approx(1.3)
    assert t["train_vs_timm_eager"]["numerator"]["variant"] == "compile"
    assert t["train_vs_timm_eager"]["status"] == "met"
    assert t["train_vs_timm_compile"]["ratio"] == pytest.approx(1300 / 1400)
    assert t["train_vs_timm_compile"]["status"] == "missed"
    assert t["train_vs_resnet50"]["denominator"]["variant"] == "channels_last"
    assert t["train_vs_resnet50"]["ratio"] == pytest.approx(1300 / 1500)
    assert t["max_batch_vs_resnet50"]["ratio"] == pytest.approx(2.0)
    assert t["max_batch_vs_resnet50"]["numerator"]["variant"] == "iabn"
    assert t["infer_vs_resnet50"]["ratio"] == pytest.approx(3500 / 4000)
    assert t["e2e_dali_vs_synthetic"]["ratio"] == pytest.approx(0.96)
    assert t["e2e_dali_vs_synthetic"]["status"] == "met"
    report["targets"] = list(t.values())
    md = bm.to_markdown({**report, "device": {"device": "GPU"},
                         "runs": [{"command": "x", "env": {"date": "2026-01-01T00:00:00Z"}}]})
    assert "**MISSED** (measured 0.93x)" in md and "| met |" in md


@pytest.mark.slow
def test_merge_combines_runs_and_recomputes_targets(cpu_run, tmp_path):
    bm = load_benchmark()
    report, _, json_path, _ = cpu_run
    extra = json.loads(json_path.read_text())
    extra["results"] = [fake_result("tresnet_tiny", "compile", 1e9, 1e9, size=32)]
    extra["runs"][0]["command"] = "python scripts/benchmark.py --variants compile"
    extra_path = tmp_path / "extra.json"
    extra_path.write_text(json.dumps(extra))
    out = tmp_path / "merged"
    imagenette = tmp_path / "imagenette_result.json"
    imagenette.write_text(json.dumps({"epochs": 5, "top1": 80.5, "top1_ema": 81.25, "wall_s": 60.0,
                                      "reference_top1_fastai": 87.43, "command": "python train.py"}))
    assert bm.main(["--merge", str(json_path), str(extra_path), "--out-dir", str(out),
                    "--tag", "all", "--imagenette", str(imagenette)]) == 0
    (merged_path,) = out.glob("*-all.json")
    merged = json.loads(merged_path.read_text())
    assert len(merged["runs"]) == 3 and merged["runs"][-1]["merged_from"]
    assert len(merged["results"]) == len(report["results"]) + 1
    compiled = next(r for r in merged["results"] if r["variant"] == "compile")
    assert compiled["run"] == 1
    t = {x["target"]: x for x in merged["targets"]}
    assert t["train_vs_timm_compile"]["status"] == "met"  # the compile result came from file 2
    md = (out / merged_path.name.replace(".json", ".md")).read_text()
    assert "--variants compile" in md
    assert "| 5 | 80.50% | 81.25% | 87.43% | 60 |" in md


def test_e2e_reads_metrics_windows(tmp_path):
    bm = load_benchmark()
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": 9, "train/img_per_s": 50.0},
            {"kind": "train", "step": 19, "train/img_per_s": 100.0},
            {"kind": "val", "step": 20, "val/top1": 1.0},
            {"kind": "train", "step": 29, "train/img_per_s": 110.0}]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert bm.read_img_per_s(metrics) == [50.0, 100.0, 110.0]


@pytest.mark.slow
def test_e2e_runs_train_py_on_cpu(tmp_path):
    """Two short train.py runs (synthetic vs JPEGs through the torch loader): img/s and their ratio."""
    mini = real_photos("imagenette-mini-96")
    cmd = [sys.executable, str(SCRIPT), "--mode", "e2e", "--data-root", str(mini),
           "--e2e-model", "tresnet_tiny", "--e2e-size", "32", "--e2e-batch", "8",
           "--e2e-epochs", "1", "--e2e-steps", "6", "--e2e-log-every", "2", "--e2e-workers", "1",
           "--e2e-backends", "torch", "--e2e-override", "run.device=cpu",
           "--e2e-override", "train.ema=false", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    (entry,) = report["e2e"]
    assert entry["train_images"] == 400
    for label in ("synthetic", "torch"):
        run = entry["runs"][label]
        assert run["returncode"] == 0 and "error" not in run, run
        assert len(run["windows_img_per_s"]) == 4 and run["img_per_s"] > 0  # step 1, 2, 4, 6
    assert entry["runs"]["torch"]["ratio_vs_synthetic"] > 0
    t = {x["target"]: x for x in report["targets"]}
    assert t["e2e_torch_vs_synthetic"]["status"] in ("met", "missed")


@pytest.mark.parametrize("threshold,limit,expected,capped", [
    (1000, 4096, 1000, False),   # doubling 64..512 fits, 1024 fails, bisection to a multiple of 8
    (70, 4096, 64, False),       # 128 fails: bisection between 64 and 128 finds nothing larger
    (10**6, 512, 512, True),     # never fails: stops at the cap and says so
    (30, 4096, 24, False),       # the first probe (64) fails: bisection below it
])
def test_max_batch_search(monkeypatch, threshold, limit, expected, capped):
    """Doubling then bisection, on a stand-in for 'does one step fit in GPU memory'."""
    bm = load_benchmark()
    tried = []

    def fake_fits(bench, batch, size):
        tried.append(batch)
        return batch <= threshold
    monkeypatch.setattr(bm, "fits", fake_fits)
    found = bm.find_max_batch(bench=None, size=224, limit=limit, granularity=8)
    assert found["max_batch"] == expected and found["limit_reached"] is capped
    assert found["max_batch"] % 8 == 0 and found["probes"] == len(tried)
    assert all(b <= limit for b in tried)


def test_oom_errors_are_recognised():
    bm = load_benchmark()
    assert bm.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert bm.is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not bm.is_oom(RuntimeError("shape '[2, 3]' is invalid"))
