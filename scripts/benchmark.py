"""Speed, memory and max batch of our TResNets against timm's, side by side on one device.

    python scripts/benchmark.py                                    # GPU: the full table (see below)
    python scripts/benchmark.py --models tresnet_m,timm/tresnet_m --variants compile --time-budget 480
    python scripts/benchmark.py --mode e2e --data-root /data/imagenette-128     # train.py: DALI vs synthetic
    python scripts/benchmark.py --merge a.json b.json c.json       # one report from several calls
    python scripts/benchmark.py --device cpu --models tresnet_tiny --sizes 64 --iters 2   # CPU smoke

Per model, input size and variant it measures, on random data (never zeros):
- training img/s: forward, loss, backward and an SGD-Nesterov step under AMP, at a fixed batch and at
  90% of the largest batch that trains;
- inference img/s (eval mode, inference_mode, AMP) at the fixed batch;
- peak memory (torch.cuda.max_memory_allocated over the timed steps);
- the largest training batch: doubling from 64, then a binary search to a multiple of 8, catching OOM
  and freeing memory between tries;
- model FLOPs utilisation: FLOPs counted once per model and size with torch.utils.flop_counter
  (training = 3 x forward) times img/s, over this GPU's bf16 matmul rate measured here (8192^3
  products on random data).
Variants: eager (NCHW), channels_last, compile (torch.compile, default mode), iabn (InPlace-ABN
instead of BatchNorm + LeakyReLU, our models only), cudagraphs (the whole train step captured in one
CUDA graph; with compile: mode="reduce-overhead"). Combine flags with '+', e.g. compile+channels_last.
The "timm train.py" baseline is timm/tresnet_m in the eager variant: NCHW, AMP, SGD. Note that timm's
train.py defaults to float16 autocast with a GradScaler; this script uses bf16 unless --amp fp16.

Timing: CUDA events around `iters` steps after `warmup` steps, `repeats` times; the median repeat is
reported (wall clock on CPU, where MFU is null). A variant that fails (InPlace-ABN not installed, a
compile error, OOM) is recorded with its error; the run goes on. Results are rewritten after every
measurement, so a call cut off by its time limit still returns what it measured.

Output: <out-dir>/<date>-<device>[-<tag>].json and .md with device, driver, torch, CUDA and cuDNN
versions, the date, the exact command, and the targets (ratios within this run) marked met or missed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from tresnet_train.config import AMP_MODES  # noqa: E402

SCHEMA = 1
FLAGS = ("channels_last", "compile", "iabn", "cudagraphs")
DEFAULT_MODELS = "tresnet_m,timm/tresnet_m,timm/resnet50,tresnet_l,tresnet_xl,tresnet_m@448"
DEFAULT_VARIANTS = "eager,channels_last,compile,iabn,cudagraphs"

# Targets of the performance issue, as ratios within one run on one GPU (all at --ratio-size).
#   key: (what, goal)
TARGETS = {
    "train_vs_timm_eager": ("train img/s: ours (best variant) / timm train.py baseline (eager, NCHW, AMP)", 1.25),
    "train_vs_timm_compile": ("train img/s: ours (best variant) / timm's model under torch.compile", 1.0),
    "train_vs_resnet50": ("train img/s: ours (best variant) / ResNet50 (best variant)", 0.9),
    "max_batch_vs_resnet50": ("max train batch: ours (best variant) / ResNet50", 1.7),
    "infer_vs_resnet50": ("inference img/s: ours (best variant) / ResNet50 (best variant)", 1.0),
    "e2e_dali_vs_synthetic": ("train.py img/s: JPEGs through DALI / synthetic data on the device", 0.95),
}


# ---------------------------------------------------------------------------------------------
# arguments and environment
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("micro", "e2e"), default="micro",
                   help="micro: the model table; e2e: train.py on JPEGs (DALI) vs synthetic data")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help="comma list; name@size pins a size (timm models as timm/<name>)")
    p.add_argument("--sizes", default="224", help="comma list of input sizes for names without @size")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="comma list of eager or '+'-joined flags: " + ", ".join(FLAGS))
    p.add_argument("--batch", type=int, default=None, help="fixed batch (default 256 GPU, 4 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per repeat (20 GPU, 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (10 GPU, 1 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats; median kept (5 GPU, 2 CPU)")
    p.add_argument("--amp", choices=[m for m in AMP_MODES if m != "auto"], default=None,
                   help="autocast dtype (bf16 on GPU, none on CPU); fp16 adds a GradScaler")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--max-batch-search", choices=("on", "off"), default=None,
                   help="find the largest training batch (default on for GPU, off for CPU)")
    p.add_argument("--max-batch-variants", default="eager,iabn",
                   help="variants whose max batch is searched (others reuse eager's for the 90%% run)")
    p.add_argument("--max-batch-limit", type=int, default=4096, help="stop doubling here")
    p.add_argument("--max-batch-granularity", type=int, default=8)
    p.add_argument("--max-batch-from", nargs="+", metavar="JSON", default=[],
                   help="earlier result files whose max batches the 90%% run may use (same device)")
    p.add_argument("--big-batch", choices=("on", "off"), default="on",
                   help="also time training at 90%% of the max batch")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds; start no new model/variant after this (0 = no limit)")
    p.add_argument("--ours", default="tresnet_m", help="numerator model of the target ratios")
    p.add_argument("--timm-ref", default="timm/tresnet_m", help="timm train.py baseline model")
    p.add_argument("--resnet-ref", default="timm/resnet50", help="ResNet50 baseline model")
    p.add_argument("--ratio-size", type=int, default=224, help="input size the targets compare at")
    p.add_argument("--out-dir", default="benchmarks", help="where the .json and .md go")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--mirror-dir", default=None,
                   help="also write the files here (e.g. a folder that outlives the output folder)")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="merge result files of earlier runs (same device) into one report")
    p.add_argument("--imagenette", nargs="+", metavar="JSON", default=[],
                   help="with --merge: imagenette_result.json files of scripts/imagenette.sh to include")
    # e2e
    default_root = os.environ.get("IMAGENETTE_ROOT") or (
        os.path.join(os.environ["TRESNET_DATA"], "imagenette-128") if os.environ.get("TRESNET_DATA") else "")
    p.add_argument("--data-root", default=default_root,
                   help="e2e: ImageFolder root with train/ and val/ "
                        "(default $IMAGENETTE_ROOT, else $TRESNET_DATA/imagenette-128)")
    p.add_argument("--e2e-model", default="tresnet_m")
    p.add_argument("--e2e-size", type=int, default=224)
    p.add_argument("--e2e-batch", type=int, default=256)
    p.add_argument("--e2e-epochs", type=int, default=3, help="train.epochs of each train.py run")
    p.add_argument("--e2e-steps", type=int, default=0, help="train.steps_per_epoch (0 = whole epoch)")
    p.add_argument("--e2e-log-every", type=int, default=10, help="run.log_every: steps per img/s window")
    p.add_argument("--e2e-workers", type=int, default=min(16, os.cpu_count() or 4))
    p.add_argument("--e2e-backends", default="dali", help="comma list of folder backends: dali,torch")
    p.add_argument("--e2e-override", action="append", default=[],
                   help="extra train.py override for every e2e run (repeatable), e.g. run.device=cpu")
    args = p.parse_args(argv)

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device.startswith("cuda")
    for name, gpu_default, cpu_default in (("batch", 256, 4), ("iters", 20, 2), ("warmup", 10, 1),
                                           ("repeats", 5, 2), ("amp", "bf16", "none"),
                                           ("max_batch_search", "on", "off")):
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if gpu else cpu_default)
    args.command = " ".join(["python", shlex.quote(os.path.relpath(__file__, Path.cwd()))]
                            + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    return args


def run_cmd(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """What the numbers were measured on: device, driver, library versions, date, git commit."""
    import timm
    env = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "git_commit": run_cmd(["git", "rev-parse", "--short", "HEAD"]),
        "host_cpus": os.cpu_count(), "device_type": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}",
                   driver=run_cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
        if env["driver"] is None and Path("/proc/driver/nvidia/version").is_file():
            m = re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
            env["driver"] = m.group(1) if m else None
    else:
        env.update(device=platform.processor() or platform.machine() or "cpu", driver=None)
    for mod in ("inplace_abn", "nvidia.dali"):
        try:
            m = __import__(mod, fromlist=["_"])
            env[mod.replace("nvidia.", "")] = getattr(m, "__version__", "installed")
        except Exception:  # noqa: BLE001 - an optional package: absent or broken
            env[mod.replace("nvidia.", "")] = None
    return env


def device_slug(env: dict) -> str:
    name = env["device"] if env["device_type"] == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


# ---------------------------------------------------------------------------------------------
# timing, FLOPs and the matmul ceiling
# ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, iters: int, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per step for each repeat: CUDA events on a GPU, wall clock on a CPU."""
    for _ in range(warmup):
        step()
    sync(device)
    per_step = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            end.synchronize()
            per_step.append(start.elapsed_time(end) / 1000 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            per_step.append((time.perf_counter() - t0) / iters)
    return per_step


def measure_matmul_peak(device: torch.device, n: int = 8192, iters: int = 20,
                        repeats: int = 5) -> dict | None:
    """bf16 matmul TFLOP/s on random data: the ceiling MFU is measured against (GPU only)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    secs = time_steps(lambda: torch.matmul(a, b, out=out), iters, 3, repeats, device)
    del a, b, out
    free_memory()
    rates = [2 * n**3 / s / 1e12 for s in secs]
    return {"n": n, "tflops_median": statistics.median(rates), "tflops_max": max(rates)}


def forward_flops(model_name: str, size: int, num_classes: int, device: torch.device) -> float | None:
    """FLOPs of one forward pass of one image (FlopCounterMode: matmuls and convolutions, 2 per MAC).

    Counted on the meta device (no memory, no time); falls back to a real batch of one on `device`.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from tresnet_train.models import create_model
    for where in ("meta", device):
        try:
            with torch.device(where):
                model = create_model(model_name, num_classes=num_classes, norm="bn").eval()
                x = torch.randn(1, 3, size, size)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model(x)
            return float(counter.get_total_flops())
        except Exception:  # noqa: BLE001 - an op without a meta kernel: count for real
            continue
    return None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "ALLOC_FAILED" in msg
                                             or "CUBLAS_STATUS_ALLOC" in msg)


def short_error(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


# ---------------------------------------------------------------------------------------------
# one model in one variant
# ---------------------------------------------------------------------------------------------
class NotApplicable(Exception):
    """A variant that does not apply to a model or device (recorded as skipped, not as an error)."""


def parse_variant(variant: str) -> set[str]:
    flags = set() if variant == "eager" else set(variant.split("+"))
    unknown = flags - set(FLAGS)
    if unknown:
        raise SystemExit(f"--variants: unknown flag(s) {sorted(unknown)} in {variant!r}; "
                         f"use eager or '+'-joined {', '.join(FLAGS)}")
    return flags


class Bench:
    """A model with its optimizer, loss and autocast: the training step of timm's train.py
    (forward under autocast, loss, backward through the scaler, SGD-Nesterov step) and eval forward."""

    def __init__(self, model_name: str, flags: set[str], args, device: torch.device):
        from tresnet_train.models import create_model
        is_timm = model_name.startswith("timm/")
        if "iabn" in flags and is_timm:
            raise NotApplicable("timm models use BatchNorm (InPlace-ABN applies to ours only)")
        if "cudagraphs" in flags and device.type != "cuda":
            raise NotApplicable("CUDA graphs need a GPU")
        if "cudagraphs" in flags and args.amp == "fp16" and "compile" not in flags:
            raise NotApplicable("a GradScaler step syncs with the host and cannot be captured")
        self.device, self.flags, self.size = device, flags, None
        self.norm = "timm" if is_timm else ("iabn" if "iabn" in flags else "bn")
        self.memory_format = torch.channels_last if "channels_last" in flags else torch.contiguous_format
        model = create_model(model_name, num_classes=args.num_classes,
                             norm="bn" if is_timm or "iabn" not in flags else "iabn")
        self.model = model.to(device=device, memory_format=self.memory_format).train()
        self.num_classes = args.num_classes
        self.params_m = sum(p.numel() for p in self.model.parameters()) / 1e6
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                         weight_decay=1e-4)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
        graphs = "cudagraphs" in flags and "compile" not in flags
        # Graph capture needs autocast's weight-cast cache off.
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=not graphs)) \
            if dtype is not None else nullcontext
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        self.graphs = graphs
        self.call = self.model
        if "compile" in flags:
            mode = "reduce-overhead" if "cudagraphs" in flags else None
            self.call = torch.compile(self.model, mode=mode)

    def inputs(self, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, 3, size, size, device=self.device).contiguous(
            memory_format=self.memory_format)
        y = torch.randint(0, self.num_classes, (batch,), device=self.device)
        return x, y

    def _step(self, x, y) -> None:
        with self.autocast():
            loss = self.criterion(self.call(x), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def train_fn(self, batch: int, size: int):
        """A no-argument callable doing one training step on a fixed random batch."""
        self.model.train()
        x, y = self.inputs(batch, size)

        def step():
            self._step(x, y)
            self.optimizer.zero_grad(set_to_none=True)
        if not self.graphs:
            return step
        # Captured: gradients are set to None once before capture, so backward writes them
        # (not accumulates) into the graph's memory at every replay (PyTorch CUDA graphs docs).
        return self._capture(lambda: self._step(x, y), before=lambda: self.optimizer.zero_grad(True))

    def infer_fn(self, batch: int, size: int):
        self.model.eval()
        x, _ = self.inputs(batch, size)

        def forward():
            with torch.inference_mode(), self.autocast():
                return self.call(x)
        return self._capture(forward) if self.graphs else forward

    def _capture(self, fn, before=lambda: None):
        """Whole-step CUDA graph (PyTorch docs, 'whole network capture'): warm up on a side stream,
        capture once, then each call is one replay."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                before()
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        before()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay


def fits(bench: Bench, batch: int, size: int) -> bool:
    """Does one training step at `batch` fit in GPU memory? Frees everything it allocated."""
    ok = True
    try:
        step = bench.train_fn(batch, size)
        step()
        sync(bench.device)
        del step
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        ok = False
    bench.optimizer.zero_grad(set_to_none=True)
    free_memory()
    return ok


def find_max_batch(bench: Bench, size: int, limit: int, granularity: int) -> dict:
    """Largest batch (a multiple of `granularity`) whose training step fits: doubling from 64, then
    bisection. cuDNN autotuning is off while probing (each new shape would re-tune every conv)."""
    benchmark_flag = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    t0 = time.perf_counter()
    probes = 0
    try:
        lo, hi, b = 0, None, min(64, limit)
        while True:
            probes += 1
            if not fits(bench, b, size):
                hi = b
                break
            lo = b
            if b >= limit:
                break
            b = min(b * 2, limit)
        while hi is not None and hi - lo > granularity:
            mid = (lo + hi) // 2 // granularity * granularity
            if mid <= lo:
                break
            probes += 1
            if fits(bench, mid, size):
                lo = mid
            else:
                hi = mid
    finally:
        torch.backends.cudnn.benchmark = benchmark_flag
    return {"max_batch": lo, "limit_reached": hi is None, "probes": probes,
            "search_s": round(time.perf_counter() - t0, 1)}


def timed(bench: Bench, kind: str, batch: int, size: int, args, flops_per_img: float | None,
          peak: dict | None) -> dict:
    """img/s (median of repeats), step time, peak memory and MFU of training or inference."""
    device = bench.device
    # Keep the images per repeat about constant, so a big batch costs no more time than the fixed one.
    scale = max(1.0, batch / args.batch)
    iters = max(2, round(args.iters / scale))
    warmup = max(2 if device.type == "cuda" else 1, round(args.warmup / scale))
    t0 = time.perf_counter()
    fn = bench.train_fn(batch, size) if kind == "train" else bench.infer_fn(batch, size)
    fn()  # first call: compile / capture / cuDNN autotune, reported as setup time
    sync(device)
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    secs = time_steps(fn, iters, warmup, args.repeats, device)
    step_s = statistics.median(secs)
    out = {"batch": batch, "img_per_s": batch / step_s, "step_ms": step_s * 1e3,
           "img_per_s_repeats": [round(batch / s, 1) for s in secs], "iters": iters,
           "setup_s": round(setup_s, 2),
           "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                            if device.type == "cuda" else None), "mfu": None}
    if flops_per_img and peak:
        mult = 3 if kind == "train" else 1  # backward ~ 2x forward
        out["mfu"] = out["img_per_s"] * mult * flops_per_img / (peak["tflops_median"] * 1e12)
    del fn
    if kind == "train":
        bench.optimizer.zero_grad(set_to_none=True)
    free_memory()
    return out


def guarded(record: dict, key: str, fn) -> None:
    """record[key] = fn(), or {"error": ...} when it fails: one failure never ends the run."""
    try:
        record[key] = fn()
    except Exception as e:  # noqa: BLE001
        record[key] = {"error": short_error(e)}
        record.setdefault("errors", []).append(f"{key}: {short_error(e)}")
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
    free_memory()  # outside the except block: its traceback would keep the failed step's tensors


def measure(model_name: str, size: int, variant: str, args, device, flops: float | None,
            peak: dict | None, known_max: tuple[int, str] | None) -> dict:
    flags = parse_variant(variant)
    rec = {"model": model_name, "size": size, "variant": variant, "status": "ok",
           "fwd_gflops": flops / 1e9 if flops else None, "amp": args.amp}
    try:
        bench = Bench(model_name, flags, args, device)
    except NotApplicable as e:
        return {**rec, "status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - e.g. InPlace-ABN not installed
        free_memory()
        return {**rec, "status": "error", "errors": [f"build: {short_error(e)}"]}
    rec.update(params_m=round(bench.params_m, 2), norm=bench.norm,
               memory_format="channels_last" if "channels_last" in flags else "nchw")
    guarded(rec, "train", lambda: timed(bench, "train", args.batch, size, args, flops, peak))
    guarded(rec, "infer", lambda: timed(bench, "infer", args.batch, size, args, flops, peak))
    searched = args.max_batch_search == "on" and variant in args.max_batch_variants \
        and device.type == "cuda"
    if searched:
        guarded(rec, "max_batch", lambda: find_max_batch(bench, size, args.max_batch_limit,
                                                         args.max_batch_granularity))
    own = (rec.get("max_batch") or {}).get("max_batch")
    max_batch, source = (own, "own search") if own else (known_max or (None, None))
    if args.big_batch == "on" and max_batch and "error" not in rec.get("train", {}):
        rec["train_big_from"] = source
        # cuDNN autotuning (off during the search) may pick algorithms with bigger workspaces:
        # on OOM at 90% of the max, try 80% and say so.
        for fraction in (0.9, 0.8):
            big = max(args.max_batch_granularity, int(fraction * max_batch)
                      // args.max_batch_granularity * args.max_batch_granularity)
            guarded(rec, "train_big", lambda: timed(bench, "train", big, size, args, flops, peak))
            rec["train_big"]["fraction_of_max"] = fraction
            if "OutOfMemoryError" not in rec["train_big"].get("error", ""):
                break
    if "error" in rec.get("train", {}):
        rec["status"] = "error"
    del bench
    if "compile" in flags:
        torch._dynamo.reset()
    free_memory()
    return rec


def model_sizes(args) -> list[tuple[str, int]]:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    out = []
    for spec in (m.strip() for m in args.models.split(",") if m.strip()):
        name, _, size = spec.partition("@")
        out += [(name, int(size))] if size else [(name, s) for s in sizes]
    return out


def run_micro(args, device: torch.device, report: dict, save) -> None:
    from tresnet_train.models import check_model_name
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as the trainer runs
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        parse_variant(v)
    args.max_batch_variants = [v.strip() for v in args.max_batch_variants.split(",")]
    prior = {}  # (model, size, variant) -> max batch, from earlier runs on this device
    for path in args.max_batch_from:
        if not Path(path).is_file():  # e.g. an earlier run on another machine
            print(f"warning: --max-batch-from {path}: no such file; going on without it", file=sys.stderr)
            continue
        for r in json.loads(Path(path).read_text()).get("results", []):
            if (r.get("max_batch") or {}).get("max_batch"):
                prior[(r["model"], r["size"], r["variant"])] = r["max_batch"]["max_batch"]
    run = report["runs"][-1]
    run["peak_bf16_matmul"] = measure_matmul_peak(device)
    if run["peak_bf16_matmul"]:
        print(f"bf16 matmul: {run['peak_bf16_matmul']['tflops_median']:.0f} TFLOP/s (median)")
    t_start = time.perf_counter()
    for model_name, size in model_sizes(args):
        check_model_name(model_name)  # UnknownModelError, with close matches
        flops = forward_flops(model_name, size, args.num_classes, device)
        eager_max = None
        for variant in variants:
            if args.time_budget and time.perf_counter() - t_start > args.time_budget:
                rec = {"model": model_name, "size": size, "variant": variant, "status": "skipped",
                       "reason": f"time budget of {args.time_budget:.0f} s spent"}
            else:
                known = [(b, src) for b, src in (
                    (prior.get((model_name, size, variant)), f"{variant}'s search, earlier run"),
                    (eager_max, "eager's search"),
                    (prior.get((model_name, size, "eager")), "eager's search, earlier run")) if b]
                rec = measure(model_name, size, variant, args, device, flops,
                              run["peak_bf16_matmul"], known[0] if known else None)
            rec["run"] = len(report["runs"]) - 1
            if variant == "eager":
                eager_max = (rec.get("max_batch") or {}).get("max_batch")
            report["results"].append(rec)
            print(summary_line(rec), flush=True)
            save()


def summary_line(r: dict) -> str:
    head = f"{r['model']:<16} {r['size']:>4} {r['variant']:<22}"
    if r["status"] == "skipped":
        return f"{head} skipped: {r.get('reason')}"
    parts = []
    for key, label in (("train", "train"), ("train_big", "train@90%max"), ("infer", "infer")):
        m = r.get(key)
        if m and "img_per_s" in m:
            parts.append(f"{label} {m['img_per_s']:,.0f} img/s (b{m['batch']})")
    if (r.get("max_batch") or {}).get("max_batch"):
        parts.append(f"max batch {r['max_batch']['max_batch']}")
    if r.get("errors"):
        parts.append("errors: " + "; ".join(r["errors"]))
    return f"{head} " + " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# end to end: train.py on JPEGs vs synthetic data
# ---------------------------------------------------------------------------------------------
def count_images(split_dir: Path) -> tuple[int, int]:
    classes = [d for d in split_dir.iterdir() if d.is_dir()]
    return len(classes), sum(1 for c in classes for f in c.iterdir() if f.is_file())


def read_img_per_s(metrics: Path) -> list[float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["train/img_per_s"] for r in rows if r.get("kind") == "train" and "train/img_per_s" in r]


def run_e2e(args, report: dict, save) -> None:
    """train.py twice (or more), same model, batch and steps: synthetic data held on the device vs
    the folder through each backend. img/s from metrics.jsonl, the first log window (start-up,
    cuDNN autotuning, loader warm-up) left out; later epochs' windows include the loader's epoch start."""
    root = Path(args.data_root).expanduser().resolve()  # train.py runs from the repo root
    if not (root / "train").is_dir():
        raise SystemExit(f"--data-root {root!s}: no train/ folder (set --data-root, IMAGENETTE_ROOT or TRESNET_DATA)")
    num_classes, n_train = count_images(root / "train")
    common = [f"model.name={args.e2e_model}", f"model.num_classes={num_classes}",
              f"data.img_size={args.e2e_size}", f"data.batch_size={args.e2e_batch}",
              f"data.workers={args.e2e_workers}", f"train.epochs={args.e2e_epochs}",
              f"train.steps_per_epoch={args.e2e_steps}", "train.val_every=1000",
              f"run.log_every={args.e2e_log_every}", "run.tensorboard=false", "run.resume=none",
              "run.keep_top_k=0", *args.e2e_override]
    runs = [("synthetic", ["data.source=synthetic", f"data.synthetic_size={n_train}"])]
    runs += [(b, ["data.source=folder", f"data.backend={b}", f"data.root={root}"])
             for b in args.e2e_backends.split(",") if b]
    entry = {"model": args.e2e_model, "size": args.e2e_size, "batch": args.e2e_batch,
             "epochs": args.e2e_epochs, "steps_per_epoch": args.e2e_steps, "data_root": str(root),
             "train_images": n_train, "workers": args.e2e_workers, "runs": {},
             "run": len(report["runs"]) - 1}
    report["e2e"].append(entry)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        for label, overrides in runs:
            out_dir = Path(tmp) / label
            cmd = [sys.executable, str(REPO / "train.py"), *common, *overrides,
                   f"run.output_dir={out_dir}"]
            print(f"e2e {label}: {shlex.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            wall = time.perf_counter() - t0
            res = {"command": shlex.join(["python", "train.py", *common, *overrides]),
                   "wall_s": round(wall, 1), "returncode": proc.returncode}
            metrics = out_dir / "metrics.jsonl"
            windows = read_img_per_s(metrics) if metrics.is_file() else []
            if proc.returncode != 0 or len(windows) < 2:
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
                res["error"] = (f"train.py exit {proc.returncode}, {len(windows)} log windows "
                                f"(need >= 2: lower --e2e-log-every)")
                res["log_tail"] = tail
            if windows:
                res["windows_img_per_s"] = [round(w, 1) for w in windows]
                steady = windows[1:] or windows
                res["img_per_s"] = statistics.median(steady)
                res["img_per_s_mean"] = statistics.fmean(steady)
            entry["runs"][label] = res
            print(f"e2e {label}: {res.get('img_per_s', float('nan')):,.0f} img/s "
                  f"(median of {max(len(windows) - 1, 0)} windows), {wall:.0f} s wall"
                  + (f" | {res['error']}" if "error" in res else ""), flush=True)
            save()
    synth = entry["runs"].get("synthetic", {}).get("img_per_s")
    for label, res in entry["runs"].items():
        if label != "synthetic" and synth and res.get("img_per_s"):
            res["ratio_vs_synthetic"] = res["img_per_s"] / synth
    save()


# ---------------------------------------------------------------------------------------------
# targets, report files, merging
# ---------------------------------------------------------------------------------------------
def _value(r: dict, key: str, field: str = "img_per_s"):
    m = r.get(key)
    return m.get(field) if isinstance(m, dict) else None


def _best(results, model, size, key, field="img_per_s", where=lambda r: True):
    cands = [(v, r["variant"]) for r in results
             if r["model"] == model and r["size"] == size and r["status"] == "ok" and where(r)
             and (v := _value(r, key, field)) is not None]
    return max(cands) if cands else (None, None)


def compute_targets(report: dict) -> list[dict]:
    """Each target of the issue as measured in this report: ratio, goal, met / missed / not measured."""
    s = report["settings"]
    res, ours, timm_ref, rn = report["results"], s["ours"], s["timm_ref"], s["resnet_ref"]
    size = s["ratio_size"]
    best_ours_train = _best(res, ours, size, "train")
    rows = {
        "train_vs_timm_eager": (best_ours_train, _best(res, timm_ref, size, "train",
                                                       where=lambda r: r["variant"] == "eager")),
        "train_vs_timm_compile": (best_ours_train, _best(res, timm_ref, size, "train",
                                                         where=lambda r: "compile" in r["variant"])),
        "train_vs_resnet50": (best_ours_train, _best(res, rn, size, "train")),
        "max_batch_vs_resnet50": (_best(res, ours, size, "max_batch", "max_batch"),
                                  _best(res, rn, size, "max_batch", "max_batch")),
        "infer_vs_resnet50": (_best(res, ours, size, "infer"), _best(res, rn, size, "infer")),
    }
    names = {"train_vs_timm_eager": (ours, timm_ref), "train_vs_timm_compile": (ours, timm_ref),
             "train_vs_resnet50": (ours, rn), "max_batch_vs_resnet50": (ours, rn),
             "infer_vs_resnet50": (ours, rn)}
    out = []
    for key, ((num, num_var), (den, den_var)) in rows.items():
        what, goal = TARGETS[key]
        row = {"target": key, "what": what, "goal": goal, "size": size,
               "numerator": {"model": names[key][0], "variant": num_var, "value": num},
               "denominator": {"model": names[key][1], "variant": den_var, "value": den}}
        out.append(_judge(row, num, den, goal))
    for e in report.get("e2e", []):
        synth = e["runs"].get("synthetic", {}).get("img_per_s")
        for label, r in e["runs"].items():
            if label == "synthetic":
                continue
            what, goal = TARGETS["e2e_dali_vs_synthetic"]
            row = {"target": "e2e_dali_vs_synthetic" if label == "dali" else f"e2e_{label}_vs_synthetic",
                   "what": what.replace("DALI", label), "goal": goal, "size": e["size"],
                   "numerator": {"model": e["model"], "variant": label, "value": r.get("img_per_s")},
                   "denominator": {"model": e["model"], "variant": "synthetic", "value": synth}}
            out.append(_judge(row, r.get("img_per_s"), synth, goal))
    return out


def _judge(row: dict, num, den, goal) -> dict:
    if num is None or not den:
        return {**row, "ratio": None, "status": "not measured"}
    ratio = num / den
    return {**row, "ratio": ratio, "status": "met" if ratio >= goal else "missed"}


def _fmt(v, digits=0, unit=""):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}{unit}"


def to_markdown(report: dict) -> str:
    env = report["device"]
    lines = [f"# Benchmark: {env.get('device')} ({report['runs'][0]['env']['date'][:10]})", ""]
    lines += ["| device | driver | torch | CUDA | cuDNN | timm | InPlace-ABN | DALI | GPU memory |",
              "|---|---|---|---|---|---|---|---|---|",
              f"| {env.get('device')} | {env.get('driver') or '–'} | {env.get('torch')} | "
              f"{env.get('cuda') or '–'} | {env.get('cudnn') or '–'} | {env.get('timm')} | "
              f"{env.get('inplace_abn') or 'not installed'} | {env.get('dali') or 'not installed'} | "
              f"{_fmt(env.get('gpu_memory_gib'), 1, ' GiB')} |", ""]
    lines.append("Commands (run from the repository root):")
    lines.append("")
    for i, run in enumerate(report["runs"]):
        peak = run.get("peak_bf16_matmul")
        extra = f"; bf16 matmul {peak['tflops_median']:.0f} TFLOP/s" if peak else ""
        lines.append(f"- run {i} ({run['env']['date']}, commit {run['env'].get('git_commit') or '?'}"
                     f"{extra}): `{run['command']}`")
    lines.append("")

    targets = report.get("targets", [])
    if targets:
        lines += ["## Targets (ratios within this report, one device)", "",
                  "| target | numerator | denominator | ratio | goal | result |",
                  "|---|---|---|---|---|---|"]
        for t in targets:
            n, d = t["numerator"], t["denominator"]
            result = {"met": "met", "not measured": "not measured"}.get(
                t["status"], f"**MISSED** (measured {t['ratio']:.2f}x)" if t["ratio"] is not None else "")
            lines.append(f"| {t['what']} @{t['size']} | {n['model']} {n['variant'] or ''} "
                         f"{_fmt(n['value'])} | {d['model']} {d['variant'] or ''} {_fmt(d['value'])} | "
                         f"{_fmt(t['ratio'], 2, 'x')} | >= {t['goal']}x | {result} |")
        lines.append("")

    if report["results"]:
        lines += ["## Models", "",
                  "| model | size | variant | fwd GFLOPs | train img/s (batch) | train img/s @90% max "
                  "(batch) | infer img/s | train peak GiB | max batch | MFU train | MFU infer | setup s "
                  "| note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["results"]:
            if r["status"] == "skipped":
                lines.append(f"| {r['model']} | {r['size']} | {r['variant']} | | | | | | | | | | "
                             f"skipped: {r.get('reason')} |")
                continue
            tr, big, inf = r.get("train") or {}, r.get("train_big") or {}, r.get("infer") or {}
            mb = r.get("max_batch") or {}
            mb_txt = (f"{'>=' if mb.get('limit_reached') else ''}{mb['max_batch']}"
                      if mb.get("max_batch") is not None else "–")
            note = "; ".join(r.get("errors", []))
            lines.append(
                f"| {r['model']} | {r['size']} | {r['variant']} | {_fmt(r.get('fwd_gflops'), 2)} | "
                f"{_fmt(tr.get('img_per_s'))} ({tr.get('batch', '–')}) | "
                f"{_fmt(big.get('img_per_s'))} ({big.get('batch', '–')}) | {_fmt(inf.get('img_per_s'))} | "
                f"{_fmt(tr.get('peak_mem_gib'), 1)} | {mb_txt} | {_fmt(_pct(tr.get('mfu')), 1, '%')} | "
                f"{_fmt(_pct(inf.get('mfu')), 1, '%')} | {_fmt(tr.get('setup_s'), 1)} | "
                f"{note.replace('|', '/')} |")
        lines.append("")

    for e in report.get("e2e", []):
        lines += [f"## End to end: train.py, {e['model']} @{e['size']}, batch {e.get('batch')}, "
                  f"{e.get('epochs')} epoch(s) of {e.get('train_images')} images, "
                  f"{e.get('workers')} loader workers", "",
                  "| data | img/s (median window, first left out) | vs synthetic | wall s | note |",
                  "|---|---|---|---|---|"]
        for label, r in e["runs"].items():
            lines.append(f"| {label} | {_fmt(r.get('img_per_s'))} | "
                         f"{_fmt(r.get('ratio_vs_synthetic'), 3)} | {_fmt(r.get('wall_s'), 0)} | "
                         f"{r.get('error', '')} |")
        lines.append("")

    if report.get("imagenette"):
        lines += ["## Time to accuracy: TResNet-M from scratch on imagenette-128 (scripts/imagenette.sh)",
                  "", "| epochs | top-1 final weights | top-1 EMA | fast.ai leaderboard (128 px) | wall s |",
                  "|---|---|---|---|---|"]
        for r in sorted(report["imagenette"], key=lambda r: r["epochs"]):
            lines.append(f"| {r['epochs']} | {_fmt(r.get('top1'), 2, '%')} | "
                         f"{_fmt(r.get('top1_ema'), 2, '%')} | "
                         f"{_fmt(r.get('reference_top1_fastai'), 2, '%')} | {_fmt(r.get('wall_s'), 0)} |")
        lines += ["", "Command: `" + report["imagenette"][0].get("command", "") + "` (epochs and "
                  "recipe switches differ per row; see scripts/imagenette.sh)", ""]

    s = report["settings"]
    if not report["results"]:
        return "\n".join(lines) + "\n"
    lines += ["## Method", "",
              f"- AMP: {s['amp']} autocast (timm's train.py defaults to float16 with a GradScaler); "
              "SGD Nesterov momentum 0.9, wd 1e-4, label-smoothed cross-entropy, random inputs "
              "held on the device, cuDNN benchmark mode and TF32 on.",
              f"- Timing: {s['warmup']} warm-up steps, then {s['repeats']} repeats of {s['iters']} "
              "steps (scaled down at the big batch to keep images per repeat constant); the median "
              "repeat; CUDA events on GPU, wall clock on CPU. 'setup s' is the first step (compile, "
              "graph capture, cuDNN autotuning).",
              "- Max batch: one training step must fit; doubling from 64 then bisection to a multiple "
              f"of {s['max_batch_granularity']}, capped at {s['max_batch_limit']} ('>=' when the cap "
              "was reached), cuDNN autotuning off while probing. Variants not searched take eager's "
              "max for the 90% run.",
              "- MFU: FLOPs from torch.utils.flop_counter (convolutions and matmuls, 2 per MAC), "
              "training = 3 x forward, over the bf16 matmul rate measured in the same run.",
              "- Targets use the fixed-batch numbers; 'best variant' is the fastest measured variant "
              "of that model at that size."]
    return "\n".join(lines) + "\n"


def _pct(v):
    return None if v is None else 100 * v


def new_report(args) -> dict:
    return {"schema": SCHEMA, "runs": [], "device": {}, "results": [], "e2e": [], "targets": [],
            "settings": {k: getattr(args, k) for k in (
                "amp", "batch", "iters", "warmup", "repeats", "ours", "timm_ref", "resnet_ref",
                "ratio_size", "max_batch_limit", "max_batch_granularity")}}


def output_paths(args, env: dict) -> tuple[Path, Path]:
    stem = f"{env['date'][:10]}-{device_slug(env)}" + (f"-{args.tag}" if args.tag else "")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{stem}.json", out / f"{stem}.md"


def write(report: dict, json_path: Path, md_path: Path, mirror: str | None = None) -> None:
    report["targets"] = compute_targets(report)
    write_files(json_path, md_path, json.dumps(report, indent=1, default=str), to_markdown(report),
                mirror)


def write_files(json_path: Path, md_path: Path, text: str, md: str, mirror: str | None = None) -> None:
    """The report's .json (atomically: a killed call leaves a whole file) and .md, and their copies."""
    for folder in [json_path.parent] + ([Path(mirror)] if mirror else []):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (json_path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(folder / json_path.name)  # atomic: a killed call leaves a whole file
        (folder / md_path.name).write_text(md)


def merge(args) -> dict:
    """One report from several result files of the same device; later files win on duplicates."""
    reports = [json.loads(Path(p).read_text()) for p in args.merge]
    devices = {r["device"].get("device") for r in reports}
    if len(devices) > 1:
        print(f"warning: merging results from different devices {sorted(devices)}: ratios across "
              f"them mean little", file=sys.stderr)
    out = {**reports[0], "runs": [], "results": [], "e2e": []}
    keyed = {}
    for rep in reports:
        offset = len(out["runs"])
        out["runs"] += rep["runs"]
        for r in rep["results"]:
            keyed[(r["model"], r["size"], r["variant"])] = {**r, "run": r.get("run", 0) + offset}
        out["e2e"] += [{**e, "run": e.get("run", 0) + offset} for e in rep.get("e2e", [])]
    out["results"] = list(keyed.values())
    out["imagenette"] = [r for rep in reports for r in rep.get("imagenette", [])]
    out["imagenette"] += [json.loads(Path(p).read_text()) for p in args.imagenette]
    out["runs"].append({"command": args.command, "env": {**reports[0]["runs"][0]["env"],
                        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")},
                        "merged_from": [str(p) for p in args.merge]})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        report = merge(args)
        json_path, md_path = output_paths(args, report["runs"][0]["env"])
        write(report, json_path, md_path, args.mirror_dir)
        print(f"merged {len(args.merge)} file(s) into {json_path} and {md_path}")
        print_targets(report)
        return 0
    device = torch.device(args.device)
    env = environment(device)
    report = new_report(args)
    report["device"] = env
    report["runs"].append({"command": args.command, "env": env})
    json_path, md_path = output_paths(args, env)
    save = lambda: write(report, json_path, md_path, args.mirror_dir)  # noqa: E731
    print(f"{env['device']} | torch {env['torch']} | CUDA {env['cuda']} | driver {env.get('driver')}"
          f" -> {json_path}", flush=True)
    save()
    if args.mode == "e2e":
        run_e2e(args, report, save)
    else:
        run_micro(args, device, report, save)
    save()
    print_targets(report)
    print(f"wrote {json_path} and {md_path}")
    return 0


def print_targets(report: dict) -> None:
    for t in report["targets"]:
        ratio = "–" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        print(f"target {t['target']:<24} {ratio:>7} (goal >= {t['goal']}x): {t['status']}")


if __name__ == "__main__":
    sys.exit(main())
