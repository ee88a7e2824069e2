"""Training memory per image, measured on any device (no GPU needed): what one training step keeps.

    python scripts/bench_memory.py                                   # every model, fp32 and bf16 autocast
    python scripts/bench_memory.py --models tresnet_m --norms iabn --by-layer   # the 15 layers keeping most
    python scripts/bench_memory.py --max-batch-from benchmarks/<gpu run>.json   # predicted vs measured
    python scripts/bench_memory.py --models tresnet_tiny --sizes 64 --precisions fp32   # smoke
    python scripts/bench_memory.py --peak-step 4 --models tresnet_xl --sizes 448 --norms iabn --precisions fp32
    python scripts/bench_memory.py --speed 6 --models tresnet_m --norms iabn --against ../before

For each model, input size, norm (ours: InPlace-ABN or BatchNorm + LeakyReLU) and gradient checkpointing
(where the model has `set_grad_checkpointing`), one training forward plus the loss runs under
`torch.autograd.graph.saved_tensors_hooks`; every tensor saved for backward is counted by its storage,
each storage once, so views and in-place outputs (InPlace-ABN) are counted once. Parameters, buffers
and the input batch are left out (every model holds them). Two batch sizes separate the part that
grows with the batch (bytes per image) from the fixed part (e.g. bf16 copies of the weights under
autocast). Parameters, gradients and the optimizer state (SGD with Nesterov momentum, as in
scripts/benchmark.py) are counted from the model and one optimizer step.

Saved tensors are what a step keeps between forward and backward, the part of training memory that
grows with the batch; they do not depend on the device. The largest batch on a GPU of G GiB is
predicted as (G - parameters - gradients - optimizer state - fixed part) / bytes per image: a
prediction (an upper bound: it leaves out the gradient buffers alive during backward, the allocator's
fragmentation and the CUDA context), not a measurement. `--max-batch-from` compares it with the largest
batch scripts/benchmark.py measured on a GPU. The models are scripts/benchmark.py's, plus ResNeSt-50d.

`--speed STEPS` times instead training steps of each setting (forward, loss, backward, SGD step on
a random batch of `--speed-batch`; img/s over STEPS after `--speed-warmup` untimed steps; without
gradient checkpointing): our model as
it is, and with `recompute_conv3` off (each Bottleneck keeps its last conv's output instead of running
that conv and its norm again in backward); with `--against DIR`, also the same model from another
checkout of this repository (e.g. `git worktree add ../before <commit>`). Every measurement is a fresh
process, the variants interleaved in `--repeats` rounds; ratios are medians of per-round ratios.

`--peak-step BATCH` measures instead what one whole training step (forward, loss, backward, SGD step)
costs the process: each setting runs in a fresh process, which reports the bytes saved for backward
and its resident memory (RSS) before the step and at the step's peak (VmHWM, reset before the step;
it covers activations, gradients, optimizer state and the allocator's overhead on the CPU).

Output: <out-dir>/<date>-<device>-memory[-<tag>].json and .md (-peak-step, -speed), with the command,
versions and the target ratio (TResNet-M with InPlace-ABN over ResNet50, bytes per image, fp32 and bf16
autocast), written again after each model so a long run leaves what it measured.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import DEFAULT_MODELS, device_slug, environment  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

SCHEMA = 1
MEMORY_MODELS = DEFAULT_MODELS + ",resnest50d"
GPU_GIB = (16, 80)  # GPU memory sizes the largest batch is predicted for
MIB = 2**20
RATIO_GOAL = 0.45  # TResNet-M (InPlace-ABN) / ResNet50 bytes per image, at most
PAPER_MAX_BATCH = {"tresnet_m": 512, "resnet50": 288}  # V100 16 GB, AMP (TResNet paper, table 1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=MEMORY_MODELS,
                   help="comma list; name@size pins a size (timm models as timm/<name>)")
    p.add_argument("--sizes", default="224", help="comma list of input sizes for names without @size")
    p.add_argument("--norms", default="iabn,bn", help="norms of our TResNets (timm and ResNeSt: BatchNorm)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list: fp32, bf16 (autocast)")
    p.add_argument("--checkpointing", choices=("on", "off"), default="on",
                   help="also measure with gradient checkpointing where the model has it")
    p.add_argument("--batches", default="2,4", help="the two batch sizes (per image = the difference)")
    p.add_argument("--device", default="cpu", help="where the forward runs (the counts do not depend on it)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--by-layer", action="store_true", help="print the 15 layers keeping the most bytes")
    p.add_argument("--ours", default="tresnet_m", help="numerator of the target ratio (with InPlace-ABN)")
    p.add_argument("--resnet-ref", default="timm/resnet50", help="denominator of the target ratio")
    p.add_argument("--ratio-size", type=int, default=224, help="input size of the target ratio")
    p.add_argument("--max-batch-from", nargs="+", metavar="JSON", default=[],
                   help="scripts/benchmark.py results with measured max batches to compare against")
    p.add_argument("--out-dir", default="benchmarks", help="where the .json and .md go")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--peak-step", type=int, default=0, metavar="BATCH",
                   help="instead: saved bytes and peak RSS of one training step at this batch, each "
                        "setting in a fresh process")
    p.add_argument("--speed", type=int, default=0, metavar="STEPS",
                   help="instead: training img/s over STEPS steps, with and without recompute_conv3 "
                        "(and --against), each in a fresh process")
    p.add_argument("--speed-batch", type=int, default=8)
    p.add_argument("--speed-warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="--speed rounds")
    p.add_argument("--against", metavar="DIR", help="--speed: also time the models of this checkout")
    p.add_argument("--peak-child", help=argparse.SUPPRESS)  # one --peak-step setting, as JSON
    p.add_argument("--speed-child", help=argparse.SUPPRESS)  # one --speed setting, as JSON
    args = p.parse_args(argv)
    args.batches = sorted(int(b) for b in args.batches.split(","))
    # Training-mode BatchNorm needs two values per channel: ResNeSt's attention norm sees (N, C, 1, 1).
    if len(args.batches) != 2 or args.batches[0] < 2 or args.batches[0] == args.batches[1]:
        p.error(f"--batches {args.batches}: give two different batch sizes of at least 2, e.g. 2,4")
    if args.against and not (Path(args.against) / "tresnet_train").is_dir():
        p.error(f"--against {args.against}: not a checkout of this repository (no tresnet_train/ in it)")
    if args.peak_step == 1:
        p.error("--peak-step 1: give a batch of at least 2 (training-mode BatchNorm needs 2 images)")
    for p_ in args.precisions.split(","):
        if p_ not in ("fp32", "bf16"):
            p.error(f"--precisions: {p_!r} is not fp32 or bf16")
    args.command = " ".join(["python", "scripts/bench_memory.py"]
                            + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    return args


def rows(args) -> list[dict]:
    """One row per model, size, norm and checkpointing setting."""
    from tresnet_train.models import create_model
    out = []
    for entry in args.models.split(","):
        name, _, pinned = entry.partition("@")
        for size in ([int(pinned)] if pinned else [int(s) for s in args.sizes.split(",")]):
            ours_tresnet = name.startswith("tresnet")
            norms = args.norms.split(",") if ours_tresnet else ["bn"]
            with torch.device("meta"):
                has_ckpt = hasattr(create_model(name, norm="bn"), "set_grad_checkpointing")
            for norm in norms:
                for ckpt in ([False, True] if has_ckpt and args.checkpointing == "on" else [False]):
                    out.append({"model": name, "size": size, "norm": norm if ours_tresnet else "bn",
                                "checkpointing": ckpt})
    return out


def build(row: dict, args, device: torch.device) -> nn.Module:
    from tresnet_train.models import create_model
    torch.manual_seed(0)
    model = create_model(row["model"], num_classes=args.num_classes, norm=row["norm"])
    if row["checkpointing"]:
        model.set_grad_checkpointing(True)
    return model.to(device).train()


class SavedTensorCounter:
    """Storages saved for backward during a forward, each once, attributed to the innermost module
    running when it was saved. Parameters, buffers and tensors given in `exclude` are not counted."""

    def __init__(self, model: nn.Module, exclude=()):
        self.skip = {t.untyped_storage().data_ptr()
                     for t in [*model.parameters(), *model.buffers(), *exclude]}
        self.storages: dict[int, tuple[int, str]] = {}  # data_ptr -> (bytes, module name)
        self.stack = [""]
        self.handles = []
        for name, m in model.named_modules():
            self.handles.append(m.register_forward_pre_hook(lambda m_, a, n=name: self._enter(n)))
            self.handles.append(m.register_forward_hook(lambda m_, a, o: self._leave()))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def _enter(self, name: str) -> None:  # hooks return None: a value would replace the input/output
        self.stack.append(name)

    def _leave(self) -> None:
        self.stack.pop()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in self.skip and ptr not in self.storages and s.nbytes() > 0:
            self.storages[ptr] = (s.nbytes(), self.stack[-1])
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        for h in self.handles:
            h.remove()

    def total(self) -> int:
        return sum(b for b, _ in self.storages.values())

    def by_layer(self) -> dict[str, int]:
        out = collections.Counter()
        for b, name in self.storages.values():
            out[name or "(model)"] += b
        return dict(out)


def saved_for_backward(model: nn.Module, batch: int, size: int, precision: str, args,
                       device: torch.device) -> SavedTensorCounter:
    """Count what one training forward and the loss keep for backward (the graph is then freed)."""
    counter, loss = counted_forward(model, batch, size, precision, args, device)
    del loss
    return counter


def counted_forward(model: nn.Module, batch: int, size: int, precision: str, args,
                    device: torch.device) -> tuple[SavedTensorCounter, torch.Tensor]:
    """One training forward and the loss on a random batch, counting what they keep for backward."""
    g = torch.Generator(device=device).manual_seed(batch)
    x = torch.rand(batch, 3, size, size, device=device, generator=g)
    y = torch.randint(0, args.num_classes, (batch,), device=device, generator=g)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    # Reentrant checkpointing saves each segment's inputs through save_for_backward, where the hooks
    # see them; the non-reentrant kind keeps the same tensors out of their sight.
    reentrant = _set_timm_reentrant(True)
    try:
        with SavedTensorCounter(model, exclude=(x, y)) as counter, autocast:
            loss = criterion(model(x), y)
    finally:
        _set_timm_reentrant(reentrant)
    return counter, loss


def proc_status_bytes(key: str) -> int:
    """A memory line of /proc/self/status (Linux), e.g. VmRSS (resident now), VmHWM (peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {key} in /proc/self/status: --peak-step needs Linux")


def reset_peak_rss() -> None:
    """Start VmHWM afresh from the current RSS, so the peak is the step's, not the imports' or the
    model build's (Linux >= 4.0: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_step_child(spec: dict, args) -> dict:
    """One training step of one setting in this (fresh) process: saved bytes, RSS before and at peak."""
    device = torch.device(args.device)
    model = build(spec, args, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    reset_peak_rss()
    before = proc_status_bytes("VmRSS")  # libraries, weights; no gradients or optimizer state yet
    start = time.perf_counter()
    counter, loss = counted_forward(model, spec["batch"], spec["size"], spec["precision"], args, device)
    loss.backward()
    opt.step()
    peak = proc_status_bytes("VmHWM")
    return {**spec, "saved_bytes": counter.total(), "rss_before_step_bytes": before,
            "peak_rss_bytes": peak, "step_seconds": time.perf_counter() - start}


def run_child(flag: str, spec: dict, args) -> dict:
    """This script in a fresh process for one setting (`--peak-child` or `--speed-child`): its result."""
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), flag, json.dumps(spec),
                            "--device", args.device, "--num-classes", str(args.num_classes)],
                           capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"{flag} {spec} failed:\n{child.stderr}")
    return json.loads(child.stdout.splitlines()[-1])


def peak_steps(args, report: dict, write) -> None:
    """Run peak_step_child for every setting, each in a fresh process (a peak RSS never goes down)."""
    for row in rows(args):
        for precision in args.precisions.split(","):
            r = run_child("--peak-child", {**row, "precision": precision, "batch": args.peak_step}, args)
            report["results"].append(r)
            print(f"{label(r):<45} @{r['size']:<4} {precision} batch {r['batch']}: saved "
                  f"{r['saved_bytes'] / MIB:8.1f} MiB, RSS {r['rss_before_step_bytes'] / MIB:8.1f} MiB "
                  f"before the step, peak {r['peak_rss_bytes'] / MIB:8.1f} MiB "
                  f"({r['step_seconds']:.0f} s)", flush=True)
            write()


def _header(report: dict, title: str, where: str) -> list[str]:
    """The title with the date and device, the versions and the command: the top of each report."""
    env = report["env"]
    return [f"# {title} ({env['date'][:10]}, {where} {env['device']})", "",
            f"torch {env['torch']}, timm {env['timm']}, InPlace-ABN {env.get('inplace_abn') or 'not installed'}, "
            f"commit {env.get('git_commit') or '?'}.", "", f"Command (repository root): `{report['command']}`", ""]


def peak_markdown(report: dict) -> str:
    lines = [*_header(report, "Peak memory of one training step", "on"),
             "Each row is a fresh process: one forward, loss, backward and SGD-Nesterov step on a random "
             "batch. Saved: bytes kept for backward (as in the per-image report). RSS before: the process "
             "with the model built, before the step. Peak: the process's peak RSS during the step (VmHWM).", "",
             "| model | size | precision | batch | saved MiB | RSS before MiB | peak RSS MiB | peak - before MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {label(r)} | {r['size']} | {r['precision']} | {r['batch']} | {_mib(r['saved_bytes'])} | "
                     f"{_mib(r['rss_before_step_bytes'])} | {_mib(r['peak_rss_bytes'])} | "
                     f"{_mib(r['peak_rss_bytes'] - r['rss_before_step_bytes'])} |")
    return "\n".join(lines) + "\n"


SPEED_VARIANTS = {"ours": "as it is", "conv3_kept": "recompute_conv3 off", "against": "--against checkout"}


def speed_child(spec: dict, args) -> dict:
    """Training img/s of one setting in this (fresh) process, with the tresnet_train of spec["root"]."""
    # benchmark.py imported this checkout's package: forget it, so the import below finds spec["root"]'s.
    for name in [m for m in sys.modules if m.split(".")[0] == "tresnet_train"]:
        del sys.modules[name]
    sys.path.insert(0, spec["root"])
    import tresnet_train
    device = torch.device(args.device)
    model = build(spec, args, device)
    if spec["variant"] == "conv3_kept":
        for m in model.modules():
            if hasattr(m, "recompute_conv3"):
                m.recompute_conv3 = False
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(spec["batch"], 3, spec["size"], spec["size"], device=device, generator=g)
    y = torch.randint(0, args.num_classes, (spec["batch"],), device=device, generator=g)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if spec["precision"] == "bf16"
                else nullcontext())
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    for step in range(spec["warmup"] + spec["steps"]):
        if step == spec["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast:
            loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {**spec, "img_per_s": spec["batch"] * spec["steps"] / seconds,
            "package": str(Path(tresnet_train.__file__).parent)}


def speed_rounds(args, report: dict, write) -> None:
    """speed_child for every setting and variant, each in a fresh process, variants interleaved in
    rounds (load on a shared machine then hits them alike)."""
    variants = ["ours", "conv3_kept"] + (["against"] if args.against else [])
    for rnd in range(args.repeats):
        for row in [r for r in rows(args) if not r["checkpointing"]]:
            for precision in args.precisions.split(","):
                for variant in variants:
                    path = str(Path(args.against).resolve() if variant == "against" else ROOT)
                    spec = {**row, "precision": precision, "batch": args.speed_batch, "steps": args.speed,
                            "warmup": args.speed_warmup, "variant": variant, "round": rnd, "root": path}
                    r = run_child("--speed-child", spec, args)
                    if Path(r["package"]).parent != Path(path):
                        raise SystemExit(f"--speed {variant}: timed {r['package']}, not the package in {path}")
                    report["results"].append(r)
                    print(f"round {rnd + 1}: {label(r):<35} @{r['size']:<4} {precision} "
                          f"{SPEED_VARIANTS[variant]:<22} {r['img_per_s']:7.2f} img/s", flush=True)
        report["ratios"] = speed_ratios(report["results"])
        write()


def speed_ratios(results: list[dict]) -> list[dict]:
    """Per setting: the median img/s of each variant and the medians of the per-round ratios of
    `ours` to the other variants."""
    settings = {}
    for r in results:
        key = (r["model"], r["size"], r["norm"], r["checkpointing"], r["precision"])
        settings.setdefault(key, {}).setdefault(r["round"], {})[r["variant"]] = r["img_per_s"]
    out = []
    for (model, size, norm, ckpt, precision), rounds in settings.items():
        entry = {"model": model, "size": size, "norm": norm, "checkpointing": ckpt, "precision": precision,
                 "rounds": len(rounds),
                 "median_img_per_s": {v: statistics.median(r[v] for r in rounds.values() if v in r)
                                      for v in SPEED_VARIANTS if any(v in r for r in rounds.values())}}
        for other in ("conv3_kept", "against"):
            per_round = [r["ours"] / r[other] for r in rounds.values() if "ours" in r and other in r]
            if per_round:
                entry[f"ours_over_{other}"] = {"median": statistics.median(per_round), "per_round": per_round}
        out.append(entry)
    return out


def speed_markdown(report: dict) -> str:
    lines = [*_header(report, "Training speed of the memory savings", "on"),
             f"One training step: forward, loss, backward, SGD-Nesterov step on a random batch of "
             f"{report['speed_batch']}; img/s over {report['speed_steps']} steps after "
             f"{report['speed_warmup']} untimed ones. Variants: ours as it is; ours with "
             "`recompute_conv3` off (each Bottleneck keeps its last conv's output); the same model from "
             f"another checkout ({report.get('against') or 'none'}). Each measurement is a fresh process, "
             "the variants interleaved in rounds; medians over rounds, ratios the medians of per-round ratios.",
             "", "| model | size | precision | rounds | img/s: ours | recompute_conv3 off | other checkout | "
             "ours / off (per round) | ours / other checkout (per round) |", "|---|---|---|---|---|---|---|---|---|"]
    for e in report.get("ratios", []):
        med = e["median_img_per_s"]
        cells = [f"{med[v]:.2f}" if v in med else "–" for v in SPEED_VARIANTS]
        ratios = []
        for other in ("conv3_kept", "against"):
            r = e.get(f"ours_over_{other}")
            ratios.append("–" if r is None else f"**{r['median']:.3f}** ("
                          + ", ".join(f"{v:.3f}" for v in r["per_round"]) + ")")
        lines.append(f"| {label(e)} | {e['size']} | {e['precision']} | {e['rounds']} | "
                     + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def _set_timm_reentrant(enable: bool) -> bool:
    from timm.layers import config
    before = config.use_reentrant_ckpt()
    config.set_reentrant_ckpt(enable)
    return before


def static_bytes(model: nn.Module) -> dict:
    """Parameters, their gradients and the optimizer state after one SGD-Nesterov step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t))
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    model.zero_grad(set_to_none=True)
    return {"params_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "grads_bytes": grads, "optimizer_bytes": state}


def measure(row: dict, args, device: torch.device) -> dict:
    model = build(row, args, device)
    out = {**row, **static_bytes(model), "precisions": {}}
    lo, hi = args.batches
    for precision in args.precisions.split(","):
        a = saved_for_backward(model, lo, row["size"], precision, args, device)
        b = saved_for_backward(model, hi, row["size"], precision, args, device)
        per_image = (b.total() - a.total()) / (hi - lo)
        fixed = a.total() - lo * per_image
        layers_a, layers_b = a.by_layer(), b.by_layer()
        per_layer = {n: (layers_b.get(n, 0) - layers_a.get(n, 0)) / (hi - lo)
                     for n in set(layers_a) | set(layers_b)}
        top = sorted(per_layer.items(), key=lambda kv: -kv[1])[:15]
        static = out["params_bytes"] + out["grads_bytes"] + out["optimizer_bytes"] + fixed
        out["precisions"][precision] = {
            "saved_bytes": {str(lo): a.total(), str(hi): b.total()},
            "per_image_bytes": per_image, "fixed_bytes": fixed,
            "predicted_max_batch": {f"{g}GiB": predict_max_batch(g, static, per_image) for g in GPU_GIB},
            "top_layers_per_image_bytes": [[n, v] for n, v in top]}
    return out


def predict_max_batch(gib: float, static_bytes_: float, per_image: float) -> int | None:
    if per_image <= 0:
        return None
    return max(0, math.floor((gib * 2**30 - static_bytes_) / per_image))


def label(r: dict) -> str:
    norm = {"iabn": " (InPlace-ABN)", "bn": " (BatchNorm)"}[r["norm"]] if r["model"].startswith("tresnet") else ""
    return f"{r['model']}{norm}{' + checkpointing' if r['checkpointing'] else ''}"


def find(results, model, norm="bn", size=224, ckpt=False):
    for r in results:
        if (r["model"], r["norm"], r["size"], r["checkpointing"]) == (model, norm, size, ckpt):
            return r
    return None


def compute_targets(report: dict, args) -> list[dict]:
    ours = find(report["results"], args.ours, "iabn", args.ratio_size)
    ref = find(report["results"], args.resnet_ref, size=args.ratio_size)
    out = []
    for precision in args.precisions.split(","):
        t = {"target": f"bytes per image, {args.ours} (InPlace-ABN) / {args.resnet_ref}, {precision}, {args.ratio_size}",
             "goal": f"<= {RATIO_GOAL}", "paper_max_batch_ratio": PAPER_MAX_BATCH["resnet50"] / PAPER_MAX_BATCH["tresnet_m"]}
        if ours and ref and precision in ours["precisions"] and precision in ref["precisions"]:
            num = ours["precisions"][precision]["per_image_bytes"]
            den = ref["precisions"][precision]["per_image_bytes"]
            t.update(numerator_mib=num / MIB, denominator_mib=den / MIB, ratio=num / den,
                     status="met" if num / den <= RATIO_GOAL else "missed")
        else:
            t.update(ratio=None, status="not measured")
        out.append(t)
    return out


def compare_max_batch(report: dict, paths: list[str]) -> list[dict]:
    """Measured max batches of scripts/benchmark.py GPU runs next to this report's predictions."""
    out = []
    for path in paths:
        bench = json.loads(Path(path).read_text())
        gib = bench["device"].get("gpu_memory_gib")
        amp = bench.get("settings", {}).get("amp")
        precision = {"bf16": "bf16", "none": "fp32"}.get(amp)
        for b in bench["results"]:
            measured = (b.get("max_batch") or {}).get("max_batch")
            if measured is None or gib is None or precision is None or b["variant"] not in ("eager", "iabn"):
                continue
            norm = "iabn" if b["variant"] == "iabn" else "bn"
            r = find(report["results"], b["model"], norm, b["size"])
            if r is None or precision not in r["precisions"]:
                continue
            m = r["precisions"][precision]
            static = r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] + m["fixed_bytes"]
            predicted = predict_max_batch(gib, static, m["per_image_bytes"])
            out.append({"file": path, "device": bench["device"].get("device"), "gpu_gib": gib,
                        "model": label(r), "size": r["size"], "precision": precision,
                        "measured_max_batch": measured, "predicted_max_batch": predicted,
                        "measured_over_predicted": measured / predicted if predicted else None})
    return out


def _mib(v) -> str:
    return "–" if v is None else f"{v / MIB:,.1f}"


def to_markdown(report: dict) -> str:
    lines = [*_header(report, "Training memory per image", "counted on"),
             "Saved for backward: the storages autograd keeps from one training forward and the loss "
             "(each storage once; parameters, buffers and the input batch left out), per image = "
             f"(bytes at batch {report['batches'][1]} - bytes at batch {report['batches'][0]}) / "
             f"{report['batches'][1] - report['batches'][0]}. Optimizer: SGD with Nesterov momentum. "
             "Predicted max batch = (GPU memory - parameters - gradients - optimizer state - fixed "
             "part) / per image: a prediction and an upper bound (no backward buffers, fragmentation "
             "or CUDA context), not a measurement.", ""]
    for t in report["targets"]:
        if t["ratio"] is None:
            lines.append(f"- {t['target']}: not measured")
            continue
        lines.append(f"- {t['target']}: {t['numerator_mib']:.1f} / {t['denominator_mib']:.1f} MiB = "
                     f"**{t['ratio']:.3f}** (goal {t['goal']}: {t['status']}; the paper's max batches, "
                     f"288 / 512 on a V100, give {t['paper_max_batch_ratio']:.3f})")
    lines.append("")
    gpus = [f"{g}GiB" for g in GPU_GIB]
    lines += ["| model | size | precision | saved MiB / image | fixed saved MiB | params + grads + "
              "optimizer MiB | " + " | ".join(f"predicted max batch, {g[:-3]} GiB" for g in gpus) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(gpus)]
    for r in report["results"]:
        static = r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"]
        for precision, m in r["precisions"].items():
            lines.append(f"| {label(r)} | {r['size']} | {precision} | {_mib(m['per_image_bytes'])} | "
                         f"{_mib(m['fixed_bytes'])} | {_mib(static)} | "
                         + " | ".join(str(m["predicted_max_batch"][g]) for g in gpus) + " |")
    lines.append("")
    if report.get("max_batch_comparison"):
        lines += ["## Predicted vs measured max batch (scripts/benchmark.py on a GPU)", "",
                  "| device | model | size | precision | measured | predicted | measured / predicted |",
                  "|---|---|---|---|---|---|---|"]
        for c in report["max_batch_comparison"]:
            ratio = "–" if c["measured_over_predicted"] is None else f"{c['measured_over_predicted']:.2f}"
            lines.append(f"| {c['device']} ({c['gpu_gib']} GiB) | {c['model']} | {c['size']} | "
                         f"{c['precision']} | {c['measured_max_batch']} | {c['predicted_max_batch']} | {ratio} |")
        lines.append("")
    ours = [r for r in report["results"] if r["model"].startswith("tresnet") and r["norm"] == "iabn"]
    if ours:
        r = ours[0]
        for precision, m in r["precisions"].items():
            lines += [f"## Layers keeping the most: {label(r)} @{r['size']}, {precision} (MiB / image)", "",
                      "| layer | MiB / image |", "|---|---|"]
            lines += [f"| {n} | {v / MIB:.3f} |" for n, v in m["top_layers_per_image_bytes"]]
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peak_child:
        print(json.dumps(peak_step_child(json.loads(args.peak_child), args)))
        return 0
    if args.speed_child:
        print(json.dumps(speed_child(json.loads(args.speed_child), args)))
        return 0
    device = torch.device(args.device)
    env = environment(device)
    report = {"schema": SCHEMA, "command": args.command, "env": env, "batches": args.batches,
              "gpu_gib": list(GPU_GIB), "results": []}
    mode = "-peak-step" if args.peak_step else "-speed" if args.speed else ""
    stem = f"{env['date'][:10]}-{device_slug(env)}-memory{mode}" + (f"-{args.tag}" if args.tag else "")
    out = Path(args.out_dir) if Path(args.out_dir).is_absolute() else Path.cwd() / args.out_dir
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
        markdown = peak_markdown if args.peak_step else speed_markdown if args.speed else to_markdown
        (out / f"{stem}.md").write_text(markdown(report))

    if args.peak_step:
        report["peak_step_batch"] = args.peak_step
        peak_steps(args, report, write)
        print(f"wrote {out / stem}.json and .md")
        return 0
    if args.speed:
        report.update(speed_batch=args.speed_batch, speed_steps=args.speed, speed_warmup=args.speed_warmup,
                      against=args.against)
        speed_rounds(args, report, write)
        print(f"wrote {out / stem}.json and .md")
        return 0
    report["targets"], report["max_batch_comparison"] = [], []
    for row in rows(args):
        r = measure(row, args, device)
        report["results"].append(r)
        for precision, m in r["precisions"].items():
            print(f"{label(r):<45} @{r['size']:<4} {precision}: {m['per_image_bytes'] / MIB:7.2f} MiB/image, "
                  f"fixed {m['fixed_bytes'] / MIB:6.1f} MiB, predicted max batch "
                  + ", ".join(f"{v} ({k})" for k, v in m["predicted_max_batch"].items()), flush=True)
            if args.by_layer:
                for n, v in m["top_layers_per_image_bytes"]:
                    print(f"    {v / MIB:8.3f} MiB/image  {n}")
        report["targets"] = compute_targets(report, args)
        write()
    report["max_batch_comparison"] = compare_max_batch(report, args.max_batch_from)
    write()
    for t in report["targets"]:
        ratio = "–" if t["ratio"] is None else f"{t['ratio']:.3f}"
        print(f"target {t['target']}: {ratio} (goal {t['goal']}): {t['status']}")
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
