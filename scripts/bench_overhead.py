"""Framework overhead: train.py against a bare training loop, and the loaders alone, on one folder.

    python scripts/bench_overhead.py --data DIR --backends torch,dali --out-dir benchmarks --tag overhead

On the same model, photos, batch, loader workers and steps, images/s of:
- bare: loader -> forward -> loss -> backward -> optimizer step, nothing else, with this package's
  model, optimizer (timm's SGD and weight-decay groups) and loader for each backend, built by
  train.py's own builders, with train.py's host memory settings (tresnet_train/host_memory.py);
  `bare_timm`: the same loop on timm's `create_loader`, without those settings (a plain timm
  training script); `bare_again`: the bare loop once more, a control whose ratio to `bare` shows
  the noise of a ratio;
- train.py, recipe extras off (`trainpy`): no EMA, mixup, RandAugment or label smoothing; logging
  and TensorBoard on;
- train.py, full recipe (`trainpy_full`): EMA, mixup 0.2, RandAugment rand-m9-mstd0.5-inc1, label
  smoothing 0.1, logging, TensorBoard and a checkpoint written inside the timed steps (train.py
  times no epoch end, so the epoch-end checkpoint's write is taken mid-run: the same state and file);
- the loader alone, no model (`loader`), ours per backend and timm's `create_loader` with the same
  transforms (random-resized crop, flip; `timm_loader`).

Each measurement runs in a fresh process. The variants are interleaved in rounds (on a shared or
loaded machine, load then hits all of them alike) and each is reported as the median over rounds;
ratios are the medians of the per-round ratios. Steady state: images/s over the --steps steps after
--warmup untimed ones (worker start-up, first epoch set-up), between two wall-clock stamps: the bare
loop's own, and for train.py the times of its metrics.jsonl records at those steps (run.log_every
divides --warmup), so its logging counts. A folder of small photos makes decoding unrealistically
cheap: --upscale-from SRC fills --data first with photos resized to --upscale-size (default 320x320).

--turns S: a round's measurements run side by side, taking turns of S seconds each while the others
are stopped (SIGSTOP to the process group, loader workers included), and each counts only its own
turns. A CPU whose speed drifts by several percent over minutes (a shared VM) then slows every
variant alike, and the ratios resolve differences of 1-2% that one-after-another runs cannot. Meant
for CPU runs: a stopped process's queued GPU work would still run in another's turn. Ctrl-C, SIGTERM
or SIGHUP end the children with the benchmark; after a SIGKILL, `kill -CONT -- -PGID` frees them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(SCRIPTS))

import torch  # noqa: E402

import benchmark  # noqa: E402  (the reporting helpers: environment, file names, number format)
from bench_loader import upscale_folder  # noqa: E402
from tresnet_train.host_memory import keep_host_memory  # noqa: E402

# variant -> (what, backend-specific)
VARIANTS = {
    "bare": ("bare loop: loader -> forward -> loss -> backward -> step", True),
    "bare_again": ("bare loop again (control: the same loop in another process)", True),
    "trainpy": ("train.py, recipe extras off", True),
    "trainpy_full": ("train.py, full recipe", True),
    "loader": ("loader alone (no model)", True),
    "bare_timm": ("bare loop on timm's create_loader (a plain timm script)", False),
    "timm_loader": ("timm's create_loader alone (no model)", False),
}
FULL_RECIPE = ["train.ema=true", "data.mixup=0.2", "data.randaugment=rand-m9-mstd0.5-inc1",
               "train.label_smoothing=0.1"]
EXTRAS_OFF = ["train.ema=false", "data.mixup=0.0", "data.cutmix=0.0", "train.label_smoothing=0.0"]
TARGET = {"trainpy_vs_bare": 0.98, "loader_vs_timm_loader": 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--upscale-from", help="fill --data first from this root's train/ and val/, resized")
    p.add_argument("--count", type=int, default=1280, help="train photos for --upscale-from (val: 1/8)")
    p.add_argument("--upscale-size", type=int, nargs=2, default=[320, 320], metavar=("W", "H"))
    p.add_argument("--model", default="timm/resnet18", help="model.name of train.py")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="loader workers (torch) / threads (DALI)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--log-every", type=int, default=10, help="train.py's run.log_every")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    p.add_argument("--turns", type=float, default=0.0, metavar="S",
                   help="run a round's measurements side by side in turns of S seconds (CPU; 0: one "
                        "after another)")
    p.add_argument("--backends", default="torch,dali", help="comma list: torch, dali")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out-dir", default="benchmarks")
    p.add_argument("--tag", default="overhead", help="suffix of the output file names")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # one measurement, in a child process
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.warmup < 1 or args.warmup % args.log_every or args.steps % args.log_every:
        p.error(f"--log-every {args.log_every} must divide --warmup {args.warmup} and --steps {args.steps}")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    args.command = shlex.join(["python", "scripts/bench_overhead.py",
                               *(sys.argv[1:] if argv is None else argv)])
    return args


def overrides(args, backend: str, variant: str) -> list[str]:
    """train.py's command-line overrides for this measurement (the bare loop builds the same loader)."""
    common = [f"model.name={args.model}", f"model.num_classes={num_classes(args.data)}",
              "data.source=folder", f"data.root={Path(args.data).resolve()}", f"data.backend={backend}",
              f"data.img_size={args.img_size}", f"data.batch_size={args.batch}",
              f"data.workers={args.workers}", "train.epochs=1",
              f"train.steps_per_epoch={args.warmup + args.steps}", f"run.log_every={args.log_every}",
              "run.resume=none", "run.keep_top_k=0", f"run.device={args.device.split(':')[0]}",
              f"train.amp={amp(args.device)}"]
    if variant == "trainpy_full":
        return common + FULL_RECIPE + [f"run.ckpt_every_steps={args.warmup + args.steps // 2}"]
    return common + EXTRAS_OFF


def amp(device: str) -> str:
    """fp32 on CPU (train.py's own choice there), bf16 on a GPU, in train.py and the bare loop alike."""
    return "bf16" if device.startswith("cuda") else "none"


def num_classes(root) -> int:
    return sum(1 for d in (Path(root) / "train").iterdir() if d.is_dir())


# ---------------------------------------------------------------------------------------------
# one measurement (child process)
# ---------------------------------------------------------------------------------------------
class StepClock:
    """Wall-clock stamps around the steps after `warmup`: from the end of step warmup-1 (device work
    finished) to the end of the last."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup, self.start = device, warmup, 0.0

    def tick(self, step: int) -> None:
        if step == self.warmup - 1:
            benchmark.sync(self.device)
            self.start = time.time()

    def stamps(self, images: int) -> dict:
        benchmark.sync(self.device)
        return {"images": images, "t0": self.start, "t1": time.time()}


def our_loader(args, backend: str, device: torch.device):
    """This package's model and train loader, built by train.py's own builders from its config."""
    from tresnet_train.config import load_config
    from tresnet_train.data import build_loaders
    from tresnet_train.distributed import World
    from tresnet_train.models import get_data_config
    from tresnet_train.trainer import build_model
    cfg = load_config(None, overrides(args, backend, "bare"))
    model = build_model(cfg, device)
    train_loader, _ = build_loaders(cfg, get_data_config(model), World(), device)
    return model, train_loader


def timm_loader(args, device: torch.device):
    """timm's create_dataset + create_loader with our transforms: random-resized crop, flip, no colour
    jitter, the model's interpolation, mean and std, normalised by timm's prefetcher."""
    from timm.data import create_dataset, create_loader
    from tresnet_train.models import create_model, get_data_config
    model = create_model(args.model, num_classes=num_classes(args.data))  # norm auto, as train.py
    dc = get_data_config(model)
    dataset = create_dataset("", root=str(Path(args.data) / "train"), is_training=True)
    loader = create_loader(dataset, (3, args.img_size, args.img_size), args.batch, is_training=True,
                           scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0.0,
                           interpolation=dc["interpolation"], mean=dc["mean"], std=dc["std"],
                           num_workers=args.workers, device=device, use_prefetcher=True)
    return model, loader


def endless(loader):
    while True:
        yield from loader


def measure(args) -> dict:
    """One variant in this process: {'images': timed images, 't0': ..., 't1': wall-clock stamps}."""
    from tresnet_train.config import OptimConfig
    from tresnet_train.optim import build_optimizer
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    bare_timm = args.measure in ("bare_timm", "timm_loader")
    model, loader = timm_loader(args, device) if bare_timm else our_loader(args, args.backend, device)
    batches = endless(loader)
    clock = StepClock(device, args.warmup)
    total = args.warmup + args.steps
    if args.measure.endswith("loader"):
        for step in range(total):
            images, _ = next(batches)
            clock.tick(step)
        return clock.stamps(args.steps * args.batch)
    model = model.to(device).train()
    # train.py's optimizer: timm's SGD, Nesterov, no weight decay on norms and biases
    optimizer = build_optimizer(model, OptimConfig(), lr=0.1 * args.batch / 256)
    autocast = torch.autocast("cuda", torch.bfloat16) if amp(args.device) == "bf16" else None
    for step in range(total):
        images, targets = next(batches)
        with autocast or nullcontext():
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick(step)
    return clock.stamps(args.steps * args.batch)


def run_round(args, measurements: list[tuple[str, str]]) -> list[dict]:
    """Each (backend, variant) in a fresh process: one after another, or side by side in --turns."""
    if not args.turns:
        return [run_children(args, [m], math.inf)[0] for m in measurements]
    return run_children(args, measurements, args.turns)


def run_children(args, measurements: list[tuple[str, str]], turn_s: float) -> list[dict]:
    """Start one process per measurement and run them in turns of `turn_s` seconds until all exit;
    each one's img/s counts the seconds of its own turns between its stamps."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        load_before = os.getloadavg()[0]
        folders = [Path(tmp) / f"{i}" for i in range(len(measurements))]
        procs = []
        try:
            for folder, (backend, variant) in zip(folders, measurements):
                folder.mkdir()
                procs.append(start_child(args, backend, variant, folder, env))
            turns = take_turns(procs, turn_s, timeout=1800 * len(procs))
        finally:  # also on Ctrl-C or SIGTERM (stop_on_signals): a stopped child would stay stopped
            for proc in procs:
                signal_group(proc, signal.SIGKILL)
                proc.wait()
        return [{**result(args, variant, folder, proc, own), "load_before": load_before}
                for (_, variant), folder, proc, own in zip(measurements, folders, procs, turns)]


def start_child(args, backend: str, variant: str, folder: Path, env: dict) -> subprocess.Popen:
    """train.py itself, or this script's --measure; in its own process group (stopped and continued
    whole), its output to a file (a pipe that nobody reads during other turns could stall it)."""
    if variant.startswith("trainpy"):
        cmd = [sys.executable, str(REPO / "train.py"), *overrides(args, backend, variant),
               f"run.output_dir={folder}/run"]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", variant, "--backend", backend,
               *child_args(args)]
    with open(folder / "output.txt", "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def take_turns(procs: list[subprocess.Popen], turn_s: float, timeout: float) -> list[list[tuple]]:
    """Let one process group run at a time, `turn_s` seconds each in turn (math.inf: until it exits),
    the others stopped, until all have exited: each one's turns as (start, end) wall-clock times."""
    turns = [[] for _ in procs]
    for proc in procs:
        signal_group(proc, signal.SIGSTOP)
    deadline = time.time() + timeout
    while any(proc.poll() is None for proc in procs):
        for proc, own in zip(procs, turns):
            if proc.poll() is not None:
                continue
            left = deadline - time.time()
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            start = time.time()  # stamped before it runs and after it stops: its turn holds all it did
            signal_group(proc, signal.SIGCONT)
            try:
                proc.wait(timeout=min(turn_s, left))
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGSTOP)
            own.append((start, time.time()))
    return turns


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP end this process as Ctrl-C does, through the `finally` that kills the
    children (the default action would leave them stopped for good)."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the whole group has exited
        pass


def result(args, variant: str, folder: Path, proc: subprocess.Popen, turns: list[tuple]) -> dict:
    """{'img_per_s': ...} from the child's stamps and its turns, or {'error': ...}."""
    output = (folder / "output.txt").read_text()
    wall = sum(end - start for start, end in turns)
    if proc.returncode != 0:
        tail = " | ".join(output.strip().splitlines()[-5:])
        return {"error": f"exit {proc.returncode}: {tail}", "wall_s": round(wall, 2)}
    if variant.startswith("trainpy"):
        stamps = trainpy_stamps(folder / "run" / "metrics.jsonl", args)
    else:
        stamps = json.loads(output.strip().splitlines()[-1])
    seconds = running_seconds(stamps["t0"], stamps["t1"], turns)
    return {"img_per_s": stamps["images"] / seconds, "timed_s": round(seconds, 4),
            "wall_s": round(wall, 2)}


def running_seconds(t0: float, t1: float, turns: list[tuple]) -> float:
    """The seconds between the stamps t0 and t1 that fell inside the process's turns."""
    return sum(max(0.0, min(end, t1) - max(start, t0)) for start, end in turns)


def child_args(args) -> list[str]:
    return ["--data", str(Path(args.data).resolve()), "--model", args.model, "--img-size", str(args.img_size),
            "--batch", str(args.batch), "--workers", str(args.workers), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--log-every", str(args.log_every), "--device", args.device]


def trainpy_stamps(metrics: Path, args) -> dict:
    """The timed steps' images and the times of train.py's train records after --warmup and after
    --warmup + --steps steps (each written at the log point ending those steps)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    times = {r["step"]: r["time"] for r in rows if r.get("kind") == "train"}
    first, last = args.warmup, args.warmup + args.steps
    if first not in times or last not in times:
        raise RuntimeError(f"{metrics}: no train record at step {first} or {last} (records at "
                           f"{sorted(times)}); run.log_every must divide --warmup and --steps")
    return {"images": args.steps * args.batch, "t0": times[first], "t1": times[last]}


# ---------------------------------------------------------------------------------------------
# rounds, ratios, report
# ---------------------------------------------------------------------------------------------
def plan(args) -> list[tuple[str, str]]:
    """(backend, variant) pairs of one round; timm's own loader is measured once per round."""
    chosen = args.variants.split(",")
    pairs = [(b, v) for b in args.backends.split(",") for v in chosen if VARIANTS[v][1]]
    return pairs + [("timm", v) for v in chosen if not VARIANTS[v][1]]


def ratios(rounds: list[dict]) -> list[dict]:
    """Per-round ratios (median over rounds) of every backend's train.py against its bare loop, and
    of our loader against timm's."""
    rows = []
    backends = sorted({k.split("/")[0] for r in rounds for k in r} - {"timm"})
    pairs = [(f"{b}/{num}", f"{b}/bare", f"{num}_vs_bare", TARGET["trainpy_vs_bare"] if num == "trainpy"
              else None) for b in backends for num in ("trainpy", "trainpy_full", "bare_again")]
    pairs += [(f"{b}/loader", "timm/timm_loader", "loader_vs_timm_loader", TARGET["loader_vs_timm_loader"]
               if b == "torch" else None) for b in backends]
    pairs += [(f"{b}/trainpy", "timm/bare_timm", "trainpy_vs_plain_timm_script", None) for b in backends]
    for num, den, what, goal in pairs:
        per_round = [r[num]["img_per_s"] / r[den]["img_per_s"] for r in rounds
                     if r.get(num, {}).get("img_per_s") and r.get(den, {}).get("img_per_s")]
        if not per_round:
            continue
        ratio = statistics.median(per_round)
        status = "—" if goal is None else ("met" if ratio >= goal else "missed")
        rows.append({"numerator": num, "denominator": den, "what": what, "ratio": ratio,
                     "per_round": per_round, "goal": goal, "status": status})
    return rows


def summarise(report: dict) -> None:
    keys = {k for r in report["rounds"] for k in r}
    report["medians"] = {}
    for key in sorted(keys):
        values = [r[key]["img_per_s"] for r in report["rounds"] if r.get(key, {}).get("img_per_s")]
        errors = [r[key]["error"] for r in report["rounds"] if "error" in r.get(key, {})]
        report["medians"][key] = {"img_per_s": statistics.median(values) if values else None,
                                  "repeats": values, "errors": errors}
    report["ratios"] = ratios(report["rounds"])


def to_markdown(report: dict) -> str:
    env, s = report["env"], report["settings"]
    lines = [f"# Framework overhead: {env['device']} ({env['date'][:10]})", "",
             f"torch {env['torch']}, timm {env['timm']}, DALI {env.get('dali') or 'not installed'}, "
             f"Python {env['python']}, {env['host_cpus']} CPU cores, commit {env.get('git_commit')}.",
             "", f"Command (from the repository root): `{report['command']}`", "",
             f"{s['model']}, {s['img_size']} px crops of the photos in `{s['data_name']}` "
             f"({s['train_images']} train images, {s['photo_size']}), batch {s['batch']}, "
             f"{s['workers']} loader workers, {'fp32' if s['amp'] == 'none' else s['amp']}, SGD; img/s "
             f"over {s['steps']} steps after {s['warmup']} untimed ones; each measurement in a fresh "
             f"process; {interleaving(s.get('turns_s', 0))}, {len(report['rounds'])} of {s['repeats']} "
             "rounds done, median reported; ratios are medians of per-round ratios. Load average "
             f"(1 min) before each {'round' if s.get('turns_s') else 'measurement'}: "
             f"{load_range(report)}.", "",
             "| backend | variant | img/s (median) | per round |", "|---|---|---|---|"]
    for key, m in report["medians"].items():
        backend, variant = key.split("/")
        rounds = ", ".join(f"{v:.1f}" for v in m["repeats"])
        errors = f" errors: {'; '.join(m['errors'])}" if m["errors"] else ""
        lines.append(f"| {backend} | {VARIANTS[variant][0]} | {benchmark._fmt(m['img_per_s'], 1)} | "
                     f"{rounds}{errors} |")
    lines += ["", "| ratio | median | per round | target | result |", "|---|---|---|---|---|"]
    for r in report["ratios"]:
        goal = f">= {r['goal']}" if r["goal"] is not None else ""
        result = r["status"] if r["status"] != "missed" else f"**MISSED** ({r['ratio']:.3f})"
        lines.append(f"| {r['numerator']} / {r['denominator']} | {r['ratio']:.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in r['per_round'])} | {goal} | {result} |")
    return "\n".join(lines) + "\n"


def interleaving(turns_s: float) -> str:
    if not turns_s:
        return "variants one after another in rounds (load on a shared machine hits them alike)"
    return (f"a round's variants side by side, taking turns of {turns_s:g} s while the others are "
            "stopped (drift in the machine's speed hits them alike), each timed over its own turns")


def load_range(report: dict) -> str:
    loads = [r["load_before"] for rnd in report["rounds"] for r in rnd.values() if "load_before" in r]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded"


def prepare_data(args) -> None:
    data = Path(args.data)
    if args.upscale_from and not (data / "train").is_dir():
        src, size = Path(args.upscale_from), tuple(args.upscale_size)
        upscale_folder(src / "train", data / "train", args.count, size)
        upscale_folder(src / "val", data / "val", max(len(list((src / "val").iterdir())), args.count // 8),
                       size)
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise SystemExit(f"--data {data}: no {split}/ folder (ImageFolder layout: {split}/<class>/*.jpg)")
    images = sum(1 for d in (data / "train").iterdir() for _ in d.iterdir())
    needed = (args.warmup + args.steps) * args.batch
    if images < needed:  # train.py's log windows would span an epoch end and its validation
        raise SystemExit(f"--data {data}: {images} train images, but --warmup {args.warmup} + --steps "
                         f"{args.steps} batches of {args.batch} need {needed} within one epoch; "
                         f"lower --batch or --steps, or add images (--count)")


def photo_size(root: Path) -> str:
    from PIL import Image
    first = next(p for d in sorted((root / "train").iterdir()) for p in sorted(d.iterdir()))
    with Image.open(first) as img:
        return f"{img.width}x{img.height} px"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure:
        if args.backend != "timm":
            keep_host_memory()  # as train.py does, before the first tensor
        print(json.dumps(measure(args)))
        return 0
    stop_on_signals()
    prepare_data(args)
    env = benchmark.environment(torch.device(args.device))
    json_path, md_path = benchmark.output_paths(args, env)
    data = Path(args.data)
    report = {"command": args.command, "env": env, "rounds": [], "settings": {
        "model": args.model, "img_size": args.img_size, "batch": args.batch, "workers": args.workers,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "turns_s": args.turns,
        "amp": amp(args.device), "log_every": args.log_every, "data_name": data.name,
        "photo_size": photo_size(data),
        "train_images": sum(1 for d in (data / "train").iterdir() for _ in d.iterdir()),
        "full_recipe": FULL_RECIPE, "extras_off": EXTRAS_OFF}}
    print(f"{env['device']} | torch {env['torch']} -> {json_path}", flush=True)
    measurements = plan(args)
    for k in range(args.repeats):
        results = run_round(args, measurements)
        report["rounds"].append({f"{b}/{v}": r for (b, v), r in zip(measurements, results)})
        for (backend, variant), r in zip(measurements, results):
            print(f"round {k + 1}/{args.repeats} {backend:5s} {variant:12s} "
                  f"{r.get('img_per_s', float('nan')):8.1f} img/s  {r.get('error', '')}", flush=True)
        summarise(report)
        benchmark.write_files(json_path, md_path, json.dumps(report, indent=1), to_markdown(report))
    for r in report["ratios"]:
        print(f"{r['numerator']} / {r['denominator']}: {r['ratio']:.3f}"
              + (f" (target >= {r['goal']}: {r['status']})" if r["goal"] is not None else ""))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
