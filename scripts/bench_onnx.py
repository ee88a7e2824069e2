"""Inference img/s of a model: PyTorch eager vs its ONNX export under ONNX Runtime, in one run.

    python scripts/bench_onnx.py --out-dir benchmarks                   # TResNet-M at 224, batch 1 and 32
    python scripts/bench_onnx.py --model tresnet_m --img-size 448 --batches 1,8 --repeats 7

On a CPU it measures torch eager (fp32, inference_mode) and ONNX Runtime's CPU provider, with the
same number of threads (--threads, default: the CPUs this process may use). With a GPU it adds torch
eager on CUDA (fp32) and, when onnxruntime-gpu is installed, ONNX Runtime's CUDA provider (fp32,
inputs and outputs bound on the GPU through IOBinding, so neither side copies through the host).

The model is built with random weights (speed does not depend on them) and exported with
`tresnet_train.export.export_onnx`, as scripts/export.py does. Per batch size, every engine runs
`warmup` calls, then `repeats` timed blocks of `iters` calls; the engines take turns block by block,
so a change in machine load falls on all of them alike. Reported: the median block's img/s and the
ratio of each engine to torch eager on the same device, from this run only.

Output: <out-dir>/<date>-<device>-onnx-t<threads>.json and .md: device, CPU threads, library versions, load
average before and after, the exact command, every block's img/s, the medians and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: benchmark.py's helpers
from benchmark import device_slug, environment  # noqa: E402  (also puts the checkout on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tresnet_train.config import DEVICES  # noqa: E402
from tresnet_train.export import OnnxModel, export_onnx  # noqa: E402
from tresnet_train.models import create_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tresnet_m", help="registered name or timm/<name>")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--iters", type=int, default=None,
                   help="calls per timed block (default: 10 at batch 1, 2 above on CPU; 50 on GPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per engine and batch")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per engine and batch")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and ONNX Runtime (default: the CPUs available)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: add the GPU engines when CUDA is available")
    p.add_argument("--out-dir", default="benchmarks")
    return p.parse_args(argv)


def torch_engine(model: torch.nn.Module, device: torch.device):
    model = model.to(device).eval()

    def make(x: torch.Tensor):
        x = x.to(device)

        def call():
            with torch.inference_mode():
                model(x)
        return call
    return make


def ort_cpu_engine(path: Path, threads: int):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    # no busy-waiting between calls: ONNX Runtime's idle threads would otherwise spin on the cores
    # while torch runs its turn (measured: torch eager 50-100x slower beside a spinning session)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def make(x: torch.Tensor):
        feed = {name: x.numpy()}
        return lambda: session.run(None, feed)
    return make


def ort_cuda_engine(path: Path, num_classes: int):
    """ONNX Runtime's CUDA provider with the input and output bound to CUDA tensors (IOBinding)."""
    session = OnnxModel(path, ["CUDAExecutionProvider"]).session
    if "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError("the session fell back to the CPU provider")
    name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    def make(x: torch.Tensor):
        x = x.cuda().contiguous()
        y = torch.empty(x.shape[0], num_classes, device="cuda")
        binding = session.io_binding()
        binding.bind_input(name, "cuda", 0, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(out_name, "cuda", 0, np.float32, tuple(y.shape), y.data_ptr())
        return lambda: session.run_with_iobinding(binding)
    return make


def engines(args, model, path: Path, num_classes: int) -> tuple[dict, dict]:
    """name -> factory(x) -> zero-argument call; and name -> why it was skipped."""
    found, skipped = {"torch-eager-cpu": torch_engine(model, torch.device("cpu")),
                      "onnxruntime-cpu": ort_cpu_engine(path, args.threads)}, {}
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        import copy
        found["torch-eager-cuda"] = torch_engine(copy.deepcopy(model), torch.device("cuda"))
        try:
            found["onnxruntime-cuda"] = ort_cuda_engine(path, num_classes)
        except Exception as e:  # noqa: BLE001 - onnxruntime-gpu absent or its CUDA libraries unusable
            skipped["onnxruntime-cuda"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return found, skipped


def timed_blocks(calls: dict, iters: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call for each block, engines taking turns block by block (wall clock after a
    CUDA sync, the same clock for every engine)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                call()
            sync()
            out[name].append((time.perf_counter() - t0) / iters)
    return out


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's machine string."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def to_markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    lines = [f"# Inference: torch eager vs ONNX Runtime, {s['model']} at {s['img_size']} px", "",
             f"- command: `{report['command']}`",
             f"- device: {env['device']} ({env['device_type']}); CPU {report['cpu']}, "
             f"{s['threads']} threads of "
             f"{env['host_cpus']}; load average before/after: {report['load_before']} / "
             f"{report['load_after']}",
             f"- python {env['python']}, torch {env['torch']}, onnxruntime {report['onnxruntime']}, "
             f"onnx {report['onnx']}, date {env['date']}, commit {env['git_commit']}",
             f"- timing: median of {s['repeats']} blocks per engine and batch, engines taking turns; "
             f"fp32; random weights", "",
             "| batch | engine | img/s (median) | ratio to torch eager, same device | blocks (img/s) |",
             "|---:|---|---:|---:|---|"]
    for r in report["results"]:
        blocks = ", ".join(f"{v:.1f}" for v in r["block_img_per_s"])
        lines.append(f"| {r['batch']} | {r['engine']} | {r['img_per_s']:.1f} | {r['ratio']:.2f}x "
                     f"| {blocks} |")
    for name, why in report["skipped"].items():
        lines.append(f"\n{name}: not measured ({why})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads)
    import onnx
    import onnxruntime
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    model = create_model(args.model, norm="bn").eval()
    num_classes = model.get_classifier().out_features
    report = {"command": shlex.join(["python", *sys.argv]),  # the interpreter: environment.python
              "environment": environment(torch.device("cuda" if torch.cuda.is_available()
                                                      and args.device != "cpu" else "cpu")),
              "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "cpu": cpu_model(),
              "settings": {**vars(args)}, "load_before": round(os.getloadavg()[0], 2), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, args.img_size)
        found, report["skipped"] = engines(args, model, path, num_classes)
        for batch in batches:
            x = torch.rand(batch, 3, args.img_size, args.img_size)
            on_gpu = torch.cuda.is_available() and args.device != "cpu"
            iters = args.iters or (50 if on_gpu else (10 if batch == 1 else 2))
            blocks = timed_blocks({n: make(x) for n, make in found.items()}, iters, args.warmup,
                                  args.repeats)
            for name, seconds in blocks.items():
                img_s = [batch / t for t in seconds]
                report["results"].append({"batch": batch, "engine": name, "iters": iters,
                                          "img_per_s": statistics.median(img_s),
                                          "block_img_per_s": img_s})
                print(f"batch {batch:>3} {name:<18} {statistics.median(img_s):8.1f} img/s", flush=True)
    for r in report["results"]:
        base = next(b for b in report["results"] if b["batch"] == r["batch"]
                    and b["engine"] == "torch-eager-" + r["engine"].rsplit("-", 1)[1])
        r["ratio"] = r["img_per_s"] / base["img_per_s"]
    report["load_after"] = round(os.getloadavg()[0], 2)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{report['environment']['date'][:10]}-{device_slug(report['environment'])}-onnx-t{args.threads}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(report))
    print(to_markdown(report))
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
