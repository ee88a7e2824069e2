"""Recipe rehearsal: every shipped config, as shipped, in miniature, before the first GPU hour.

    python -m tresnet_train.rehearse configs/*.yaml --data DIR [--backends dali,torch] [--out RUNS]
                                     [--json report.json] [--set model.sync_bn=true ...]

DIR is a small ImageNet-style folder (`train/` and `val/`, one folder per class, e.g. 10 classes of
~50 images). Each config runs through `train.py` under torchrun exactly as written, except for the
overrides listed in `miniature_overrides` (the one place that says what differs from the real run:
image size, batch size, steps, epochs, the data folder and its class count, the loader backend, and on
a CPU fp32 and the InPlace-ABN norm a GPU would pick). Everything else stays as configured: sync norm,
EMA, RandAugment, mixup/cutmix, BCE, repeated augmentation, LAMB, drop path, channels_last/compile,
warm-up and schedule (`--set KEY=VALUE` adds your own overrides, as you will pass them to train.py).
For every config and backend (DALI and torchvision), in order:

  init      `*_448` configs start from the best.pth of their 224 config's rehearsal (the 224 config is
            rehearsed first, and added when only the 448 one is named);
  stop      SIGTERM mid-epoch, after a mid-epoch checkpoint (`run.ckpt_every_steps`): the trainers
            must checkpoint and exit 75, as SLURM preemption expects;
  resume    the same command again: exit 0, resumed, every step done, all ranks with equal weights;
  validate  `validate.py` on best.pth (same processes, backend and preprocessing) must give the top-1
            and loss the trainer logged for it (0.01 points; loss to 1e-4 relative in fp32);
  export    the timm export of best.pth's model and EMA weights (`convert_checkpoint`, as
            `scripts/convert_checkpoint.py`) loads strictly into timm's model of that name and gives
            our model's logits (1e-5 of the largest), where timm has the model.

Processes: 2 on a CPU (gloo); on a GPU machine one per GPU, at most 2 (NCCL, DALI's `mixed` decoder,
InPlace-ABN's CUDA kernels, the config's autocast). Launch: `scripts/slurm/launch.py`, which is torchrun
with the trainers' exit code kept (plain torchrun turns a stop's 75 into 1). One line per config and
backend, a JSON report with `--json`; exit code 0 when everything passed, 1 when anything failed, 2 on a
usage error. Run folders (logs, best.pth, metrics) stay in `--out` (default: a new temporary folder).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import DECODERS

ROOT = Path(__file__).resolve().parents[1]  # the checkout: train.py, validate.py, scripts/
LAUNCHER = ROOT / "scripts" / "slurm" / "launch.py"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 75

MINI_EPOCHS = 2  # epoch 1 ends with a validation and a best.pth; the stop lands in epoch 2
MINI_STEPS = 4  # per epoch: checkpoint after step 1, stop honoured at step 2 or 3 (never the last)
MINI_BATCH = 8  # images per process per step; even, as mixup and cutmix pair images
SIZE_SCALE = 2 / 7  # 224 px -> 64, 448 -> 128, 160 -> 32: the configs' size ratios survive
TOP1_TOL = 0.01  # points: validate.py and the trainer see the same images the same way
LOSS_RTOL_FP32, LOSS_RTOL_AMP = 1e-4, 1e-2  # relative; autocast kernels may differ between processes
# Our model vs timm's with the exported weights (fp32 CPU), relative to the largest logit (~0.1 here).
# Measured on TResNet-M: the same weights under InPlace-ABN and BatchNorm agree to ~3e-7 of it; after
# 8 steps in which a few InPlace-ABN scales went negative (|w| for InPlace-ABN, w for BatchNorm) the
# model weights differed by 1e-4 to 3e-4 of it, the slow EMA's by 2e-5.
LOGIT_RTOL, LOGIT_ATOL = 1e-5, 1e-6
CHECKS = ("init", "stop", "resume", "validate", "export")
# Keys `miniature_overrides` sizes itself; `--set` may not change them (the others it may: norm, amp).
SIZED_KEYS = ("data.root", "model.num_classes", "data.img_size", "data.val_img_size", "data.batch_size",
              "data.val_batch_size", "data.workers", "train.epochs", "train.steps_per_epoch",
              "run.ckpt_every_steps", "run.output_dir", "data.backend", "model.init_from")


def small_size(px: int) -> int:
    """A config's image size in miniature: SIZE_SCALE of it, a multiple of 32 (TResNet's and ResNet's
    total stride), at least 32."""
    return max(32, 32 * round(px * SIZE_SCALE / 32))


def is_tresnet(model_name: str) -> bool:
    """Our TResNet models take model.norm=iabn; ResNeSt and timm/ models are BatchNorm only."""
    return model_name.startswith("tresnet")


def miniature_overrides(cfg, *, data_root: Path | None, num_classes: int | None, run_dir: Path,
                        backend: str, cuda: bool, nproc: int, iabn_installed: bool,
                        init_from: Path | None) -> dict:
    """Every key the rehearsal changes in a config, and why. Nothing else differs from the real run.

    `cfg` is the config as shipped (tresnet_train.config.Config); returns {dotted key: value}.
    """
    o: dict = {}
    if cfg.data.source == "folder":
        o["data.root"] = str(data_root)  # the small folder instead of ImageNet
        o["model.num_classes"] = num_classes  # its class count (train.py refuses a mismatch)
    o["data.img_size"] = small_size(cfg.data.img_size)  # 2/7 per side: 224 -> 64, 448 -> 128
    if cfg.data.val_img_size:
        o["data.val_img_size"] = small_size(cfg.data.val_img_size)  # same rule, ratio kept
    o["data.batch_size"] = MINI_BATCH  # per process, even (mixup/cutmix)
    if cfg.data.val_batch_size:
        o["data.val_batch_size"] = MINI_BATCH
    o["data.workers"] = min(cfg.data.workers, max(1, (os.cpu_count() or 2) // nproc))  # this machine
    o["train.epochs"] = MINI_EPOCHS
    o["train.steps_per_epoch"] = MINI_STEPS
    if cfg.optim.cooldown_epochs:
        o["optim.cooldown_epochs"] = 1  # a cool-down epoch that fits in MINI_EPOCHS
    o["run.ckpt_every_steps"] = 1  # mid-epoch checkpoints, as a preemptible SLURM run sets them
    o["run.output_dir"] = str(run_dir)  # a fresh folder per config and backend
    o["data.backend"] = backend  # each loader in turn, whatever `auto` would pick here
    if init_from is not None:
        o["model.init_from"] = str(init_from)  # the 224 rehearsal's best.pth, not runs/<224>/best.pth
    if not cuda:
        if cfg.train.amp in ("bf16", "fp16"):
            o["train.amp"] = "none"  # autocast on CPU cores is several times slower (auto is fp32)
        if cfg.model.norm == "auto" and is_tresnet(cfg.model.name) and iabn_installed:
            o["model.norm"] = "iabn"  # what `auto` picks on a GPU (InPlace-ABN runs on CPU too)
    return o


# ---- one config x one backend --------------------------------------------------------------------
@dataclass
class Case:
    config: Path
    backend: str
    run_dir: Path
    producer: "Case | None" = None  # the 224 case whose best.pth a 448 config starts from
    init_name: str = ""  # file name in the producer's run folder (best.pth)
    extra: list = field(default_factory=list)  # the user's own overrides (--set), before ours
    cfg: object = None  # the shipped config (None when it does not load)
    load_error: str = ""
    overrides: dict = field(default_factory=dict)
    norm: str = ""
    checks: dict = field(default_factory=dict)  # check -> "pass" | "FAIL: line" | "skip: why"
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def passed(self) -> bool:
        return not any(v.startswith("FAIL") for v in self.checks.values())

    def fail(self, check: str, line: str) -> None:
        self.checks[check] = f"FAIL: {line}"

    def first_failure(self) -> str:
        for check in CHECKS:
            v = self.checks.get(check, "")
            if v.startswith("FAIL"):
                return f"{check}: {v[len('FAIL: '):]}"
        return ""


_ERROR = re.compile(r"^((?:[\w.]*(?:Error|Exception)|config error|validate\.py: error)\b.*)$")
_SECONDARY = ("ChildFailedError", "SignalException", "Connection closed by peer", "Connection reset",
              "torch.distributed.elastic")  # what the other ranks and torchrun say after a crash
_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s*")  # torchrun's per-rank traceback prefix


def failure_line(log: str) -> str:
    """The line of a log that says what went wrong: the first root-cause exception or error line
    (with the line after it when the message continues there, as load_state_dict's does)."""
    lines = [_RANK_PREFIX.sub("", line).strip() for line in log.splitlines()]
    lines = [line for line in lines if line]
    found = [(i, m.group(1)) for i, m in enumerate(map(_ERROR.match, lines)) if m]
    root = [(i, f) for i, f in found if not any(s in f for s in _SECONDARY)]
    if root or found:
        i, first = (root or found)[0]
        if first.endswith(":") and i + 1 < len(lines):
            first = f"{first} {lines[i + 1]}"
    else:
        first = next((ln for ln in lines if "error" in ln.lower() or "non-finite" in ln), None) or \
            (lines[-1] if lines else "(no output)")
    return first[:400]


class Runner:
    """Launches the product's entry points and keeps their logs in the run folder."""

    def __init__(self, nproc: int, timeout: float):
        self.nproc, self.timeout = nproc, timeout
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        self.env["PYTHONUNBUFFERED"] = "1"

    def command(self, script: str, args: list[str]) -> list[str]:
        return [sys.executable, str(LAUNCHER), "--standalone", f"--nproc_per_node={self.nproc}",
                script, *args]

    def start(self, script: str, args: list[str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            f.write("$ " + " ".join(self.command(script, args)) + "\n")
            f.flush()
            return subprocess.Popen(self.command(script, args), cwd=ROOT, env=self.env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, proc: subprocess.Popen, deadline: float) -> int | None:
        """The exit code, or None after killing the whole process group at the deadline."""
        try:
            return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None

    def run(self, script: str, args: list[str], log: Path) -> tuple[int | None, str]:
        proc = self.start(script, args, log)
        rc = self.wait(proc, time.monotonic() + self.timeout)
        return rc, log.read_text()


def _read_position(path: Path) -> tuple[int, int] | None:
    """(epoch, step_in_epoch) of a checkpoint, reading only its header (mmap)."""
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["epoch"]), int(state["step_in_epoch"])
    except Exception:  # noqa: BLE001 - being replaced right now: the next poll reads the new file
        return None


def _read_meta(path: Path) -> dict:
    """What the trainer recorded in best.pth: best top-1 and source, its validation, its config."""
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    meta = {k: state.get(k) for k in ("best", "best_source", "val", "config")}
    meta["has_ema"] = isinstance(state.get("ema"), dict)
    return meta


def rehearse_case(case: Case, runner: Runner, data_root: Path | None, cuda: bool) -> None:
    """init, stop, resume, validate, export for one config and backend; results in `case.checks`."""
    run_dir, train_args = case.run_dir, ["--config", str(case.config.resolve()), *case.extra,
                                         *(f"{k}={v}" for k, v in case.overrides.items())]
    last, best = run_dir / "last.pth", run_dir / "best.pth"
    deadline = time.monotonic() + runner.timeout

    # init + stop: a fresh run, SIGTERM after a mid-epoch checkpoint of epoch 2
    proc = runner.start("train.py", train_args, run_dir / "train.log")
    stopped_at, seen = None, None
    while proc.poll() is None and time.monotonic() < deadline:
        if last.is_file():
            ident = (last.stat().st_ino, last.stat().st_mtime_ns)
            if ident != seen:
                seen, position = ident, _read_position(last)
                if position and position[0] >= 1 and position[1] >= 1:
                    stopped_at = position
                    os.kill(proc.pid, signal.SIGTERM)  # the launcher passes it on to the trainers
                    break
        time.sleep(0.1)
    rc = runner.wait(proc, deadline)
    log = (run_dir / "train.log").read_text()
    if case.producer is not None:
        init_from = case.overrides["model.init_from"]
        if f"initialised weights from {init_from}" in log:
            case.checks["init"] = "pass"
        else:
            case.fail("init", failure_line(log) if rc not in (0, EXIT_STOPPED) else
                      f"no 'initialised weights from {init_from}' in {run_dir / 'train.log'}")
    if rc is None:
        case.fail("stop", f"timed out after {runner.timeout:.0f} s (log: {run_dir / 'train.log'})")
    elif stopped_at is None:
        case.fail("stop", failure_line(log) if rc != 0 else
                  "the run ended before a mid-epoch checkpoint of epoch 2 appeared")
    elif rc != EXIT_STOPPED:
        case.fail("stop", f"exit code {rc}, expected {EXIT_STOPPED} after SIGTERM: "
                          f"{failure_line(log) if rc else 'the run finished instead of stopping'}")
    else:
        position = _read_position(last)
        if position is None or not (position[0] == MINI_EPOCHS - 1 and 0 < position[1] < MINI_STEPS):
            case.fail("stop", f"exit 75 but last.pth is at (epoch, step) {position}, expected "
                              f"mid-epoch {MINI_EPOCHS}")
        else:
            case.checks["stop"] = "pass"
            case.details["stopped_at"] = {"epoch": position[0] + 1, "step": position[1]}

    # resume: the same command again
    if not last.is_file():
        case.checks["resume"] = "skip: no checkpoint to resume from"
    else:
        rc, log = runner.run("train.py", train_args, run_dir / "resume.log")
        summary_path = run_dir / "summary.json"
        if rc != 0:
            case.fail("resume", f"exit code {rc}: {failure_line(log)}" if rc is not None else
                      f"timed out after {runner.timeout:.0f} s")
        elif "resumed from" not in log:
            case.fail("resume", "the second run did not resume (no 'resumed from' in resume.log)")
        elif not summary_path.is_file():
            case.fail("resume", "no summary.json after the resumed run")
        else:
            summary = json.loads(summary_path.read_text())
            prints = summary.get("weights_sha256_per_rank", [])
            if summary.get("global_step") != MINI_EPOCHS * MINI_STEPS:
                case.fail("resume", f"summary.json global_step {summary.get('global_step')}, "
                                    f"expected {MINI_EPOCHS * MINI_STEPS}")
            elif summary.get("world_size") != runner.nproc:
                case.fail("resume", f"summary.json world_size {summary.get('world_size')}, "
                                    f"expected {runner.nproc}")
            elif len(set(prints)) != 1:
                case.fail("resume", f"ranks end with different weights: {prints}")
            else:
                case.checks["resume"] = "pass"

    # validate: validate.py on best.pth reproduces the trainer's numbers for it
    if not best.is_file():
        case.checks["validate"] = case.checks["export"] = "skip: no best.pth"
        return
    meta = _read_meta(best)
    case.details["trainer_best"] = meta["best"]
    if data_root is None:
        case.checks["validate"] = "skip: synthetic data has no folder to validate on"
    else:
        check_validate(case, runner, meta, data_root, cuda)
    check_export(case, meta)


def check_validate(case: Case, runner: Runner, meta: dict, data_root: Path, cuda: bool) -> None:
    """validate.py on best.pth (its default weights: the trainer's best source) = the trainer's."""
    out = case.run_dir / "validate.json"
    rc, log = runner.run("validate.py", ["--ckpt", str(case.run_dir / "best.pth"), "--data",
                                         str(data_root), "--backend", case.backend, "--json", str(out)],
                         case.run_dir / "validate.log")
    if rc != 0 or not out.is_file():
        case.fail("validate", f"exit code {rc}: {failure_line(log)}")
        return
    result = json.loads(out.read_text())
    source = meta["best_source"] or "model"
    trainer_top1 = float(meta["best"]["top1"])
    trainer_loss = (meta["val"] or {}).get(f"{source}_loss")
    amp = (meta["config"] or {}).get("train", {}).get("amp", "none")
    rtol = LOSS_RTOL_AMP if cuda and amp not in ("none",) else LOSS_RTOL_FP32
    case.details["validate"] = {"top1": result["top1"], "loss": result["loss"], "weights": source,
                                "trainer_top1": trainer_top1, "trainer_loss": trainer_loss}
    if abs(result["top1"] - trainer_top1) > TOP1_TOL:
        case.fail("validate", f"validate.py top-1 {result['top1']:.2f} != trainer's {trainer_top1:.2f} "
                              f"({source} weights of best.pth, same images and preprocessing)")
    elif trainer_loss is not None and abs(result["loss"] - trainer_loss) > rtol * abs(trainer_loss):
        case.fail("validate", f"validate.py loss {result['loss']:.6f} != trainer's "
                              f"{trainer_loss:.6f} ({source} weights of best.pth; top-1 equal)")
    else:
        case.checks["validate"] = f"pass (top-1 {result['top1']:.2f})"


def check_export(case: Case, meta: dict) -> None:
    """Each set of weights in best.pth (model, EMA) exports to a timm state dict file that loads
    strictly into timm's model of that name and gives the logits of our model as trained (its norm)."""
    import timm
    import torch

    from .models import create_model, load_weights
    from .models.weights import convert_checkpoint

    cfg, best = case.cfg, case.run_dir / "best.pth"
    name = cfg.model.name
    timm_name = name[len("timm/"):] if name.startswith("timm/") else name
    if not timm.is_model(timm_name):
        case.checks["export"] = f"skip: timm has no {timm_name}"
        return
    num_classes = case.overrides.get("model.num_classes", cfg.model.num_classes)
    norm = case.overrides.get("model.norm", cfg.model.norm)
    size = case.overrides.get("data.val_img_size") or case.overrides["data.img_size"]
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    dst = case.run_dir / "timm_export.pth"
    diffs = {}
    try:
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=num_classes).eval()
        ours = create_model(name, num_classes=num_classes, norm=norm).eval()
        for weights in ("model", "ema") if meta["has_ema"] else ("model",):
            convert_checkpoint(best, dst, use_ema=weights == "ema")  # scripts/convert_checkpoint.py
            try:
                theirs.load_state_dict(torch.load(dst, map_location="cpu", weights_only=True),
                                       strict=True)
                load_weights(ours, best, use_ema=weights == "ema")
            except Exception as e:  # noqa: BLE001 - a refusal is the finding; say which weights
                raise RuntimeError(f"{weights} weights: {type(e).__name__}: {e}") from None
            with torch.no_grad():
                reference = theirs(x)
                diffs[weights] = {"max_abs": (ours(x) - reference).abs().max().item(),
                                  "tolerance": max(LOGIT_ATOL, LOGIT_RTOL * reference.abs().max().item())}
    except Exception as e:  # noqa: BLE001 - any refusal is the finding; report it in one line
        text = str(e) if str(e).startswith(("model weights", "ema weights")) else \
            f"{type(e).__name__}: {e}"
        case.fail("export", " ".join(part.strip() for part in text.splitlines() if part.strip())[:400])
        return
    finally:
        dst.unlink(missing_ok=True)
    case.details["export_logit_diff"] = diffs
    bad = {w: d for w, d in diffs.items() if d["max_abs"] > d["tolerance"]}
    if bad:
        w, d = next(iter(bad.items()))
        case.fail("export", f"timm {timm_name} with the exported {w} weights differs from ours "
                            f"(norm {norm}) by {d['max_abs']:.3g} in the logits (tolerance "
                            f"{d['tolerance']:.2g}): the checkpoint means another model under BatchNorm")
    else:
        case.checks["export"] = f"pass (timm {timm_name})"


# ---- planning ------------------------------------------------------------------------------------
def _shipped(path: Path, extra: list[str] = ()):
    """The config as shipped (and --set), model.init_from cleared (checked apart); raises ConfigError."""
    from .config import load_config
    return load_config(path, [*extra, "model.init_from=none"])


def _init_from(path: Path) -> str | None:
    from .config import _read_yaml
    return (_read_yaml(path, ()).get("model") or {}).get("init_from")


def _producer_config(consumer: Path, init_from: str, candidates: list[Path]) -> Path | None:
    """The config whose run.output_dir holds `init_from` (e.g. tresnet_m.yaml for
    runs/tresnet_m/best.pth): first among the named configs, then beside the consumer."""
    want = os.path.normpath(str(Path(init_from).parent))
    siblings = sorted(consumer.parent.glob("*.yaml"))
    for path in [*candidates, *siblings]:
        if path.resolve() == consumer.resolve():
            continue
        try:
            if os.path.normpath(_shipped(path).run.output_dir) == want:
                return path
        except Exception:  # noqa: BLE001 - a config that does not load produces nothing
            continue
    return None


def plan(configs: list[Path], backends: list[str], out: Path) -> list[Case]:
    """Cases in run order: every producer (224) before the config that starts from it (448)."""
    ordered: list[Path] = []
    notes: dict[Path, tuple[Path, str]] = {}

    def visit(path: Path, stack: tuple = ()) -> None:
        key = path.resolve()
        if key in (p.resolve() for p in ordered) or key in stack:
            return
        try:
            init_from = _init_from(path)
        except Exception:  # noqa: BLE001 - reported when the case runs
            init_from = None
        if init_from:
            producer = _producer_config(path, init_from, configs)
            if producer is not None:
                visit(producer, (*stack, key))
                notes[key] = (producer, Path(init_from).name)
        ordered.append(path)

    for path in configs:
        visit(path)
    cases: list[Case] = []
    for path in ordered:
        for backend in backends:
            case = Case(config=path, backend=backend, run_dir=out / path.stem / backend)
            if path.resolve() in notes:
                producer, case.init_name = notes[path.resolve()]
                case.producer = next(c for c in cases if c.config.resolve() == producer.resolve()
                                     and c.backend == backend)
            cases.append(case)
    return cases


def prepare(case: Case, data_root: Path, num_classes: int, cuda: bool, nproc: int,
            iabn_installed: bool) -> None:
    """Load the shipped config and fill in the overrides and the norm the run will use."""
    from .config import ConfigError
    try:
        case.cfg = _shipped(case.config, case.extra)
        raw_init = _init_from(case.config)
    except ConfigError as e:
        case.load_error = f"config error: {e}"
        return
    init_from = None
    if raw_init and case.producer is not None:
        init_from = case.producer.run_dir / case.init_name
    elif raw_init:
        case.details["note"] = (f"model.init_from {raw_init}: no config here writes it; rehearsed "
                                f"from scratch")
    folder = case.cfg.data.source == "folder"
    case.overrides = miniature_overrides(
        case.cfg, data_root=data_root if folder else None, num_classes=num_classes if folder else None,
        run_dir=case.run_dir, backend=case.backend, cuda=cuda, nproc=nproc,
        iabn_installed=iabn_installed, init_from=init_from)
    norm = case.overrides.get("model.norm", case.cfg.model.norm)
    if "model.norm" in case.overrides:
        case.norm = "iabn (forced: a GPU's auto)"
    elif norm == "auto" and is_tresnet(case.cfg.model.name):
        case.norm = ("auto = iabn" if cuda and iabn_installed else
                     "auto = bn (inplace-abn not installed: InPlace-ABN not rehearsed)")
    else:
        case.norm = "bn" if norm == "auto" else norm


def line(case: Case) -> str:
    """The one line printed per config and backend."""
    status = "PASS" if case.passed else "FAIL"
    word = {"pass": "ok", "FAIL": "FAILED", "skip": "skipped"}
    checks = ", ".join(f"{c} {word[case.checks[c].split(':')[0].split(' ')[0]]}"
                       for c in CHECKS if c in case.checks)
    size = case.overrides.get("data.img_size", "?")
    text = (f"{status} {case.name} [{case.backend}] norm {case.norm or '?'} | {MINI_EPOCHS}x{MINI_STEPS} "
            f"steps at {size} px | {checks} | {case.seconds:.0f} s")
    if not case.passed:
        text += f" | {case.first_failure()}"
    return text


def report(cases: list[Case], data: Path, out: Path, device: str, nproc: int, seconds: float) -> dict:
    return {
        "passed": all(c.passed for c in cases), "seconds": round(seconds, 1), "data": str(data),
        "out": str(out), "device": device, "nproc": nproc,
        "miniature": {"epochs": MINI_EPOCHS, "steps_per_epoch": MINI_STEPS, "batch_size": MINI_BATCH,
                      "size_scale": SIZE_SCALE, "top1_tolerance": TOP1_TOL,
                      "logit_rtol": LOGIT_RTOL, "logit_atol": LOGIT_ATOL},
        "cases": [{"config": str(c.config), "backend": c.backend, "norm": c.norm, "passed": c.passed,
                   "failure": c.first_failure(), "checks": c.checks, "your_overrides": c.extra,
                   "overrides": c.overrides,
                   "details": c.details, "seconds": round(c.seconds, 1), "run_dir": str(c.run_dir)}
                  for c in cases],
    }


# ---- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tresnet_train.rehearse",
        description="Rehearse configs in miniature before a GPU run: train under torchrun, stop with "
                    "SIGTERM mid-epoch and resume, validate best.pth, initialise 448 from 224, export "
                    "to timm. Only sizes, the data folder and the loader differ from the real run.",
        epilog="Example: python -m tresnet_train.rehearse configs/*.yaml --data ~/imagenette-mini "
               "--json rehearsal.json")
    p.add_argument("configs", nargs="+", type=Path, help="YAML configs (e.g. configs/*.yaml)")
    p.add_argument("--data", required=True, type=Path,
                   help="small ImageNet-style folder with train/ and val/ (e.g. 10 classes of ~50 images)")
    p.add_argument("--backends", default="dali,torch",
                   help="comma list of data backends to run each config through (default: dali,torch)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the run folders (default: a new temporary folder)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the report here")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="an override of your own for every config, as you will pass it to train.py "
                        "(e.g. --set model.sync_bn=true); repeatable; the sized keys are refused")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per run (default: 2 on CPU, one per GPU up to 2 with CUDA)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds per command (train, resume, validate) before its processes are "
                        "killed (default: 3600)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep last.pth and top/ (default: only best.pth, logs and metrics stay)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in DECODERS]
    if bad or not backends:
        print(f"rehearse: error: --backends: expected a comma list of {', '.join(DECODERS)}; got "
              f"{args.backends!r}", file=sys.stderr)
        return EXIT_USAGE
    from .config import ConfigError, parse_override
    try:
        keys = [parse_override(text)[0] for text in args.extra]
    except ConfigError as e:
        print(f"rehearse: error: --set: {e}", file=sys.stderr)
        return EXIT_USAGE
    sized = [k for k in keys if k in SIZED_KEYS]
    if sized:
        print(f"rehearse: error: --set {', '.join(sized)}: the rehearsal sets this itself (see "
              f"miniature_overrides in {__file__})", file=sys.stderr)
        return EXIT_USAGE
    missing = [str(c) for c in args.configs if not c.is_file()]
    if missing:
        print(f"rehearse: error: config file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    if not LAUNCHER.is_file() or not (ROOT / "train.py").is_file():
        print(f"rehearse: error: run from a tresnet-train checkout ({ROOT} has no train.py or "
              f"scripts/slurm/launch.py)", file=sys.stderr)
        return EXIT_USAGE

    import torch

    from .data import DataError, scan_image_folder
    from .models.layers import inplace_abn_available
    data = args.data.expanduser().resolve()
    try:
        classes, _, _ = scan_image_folder(data)
    except DataError as e:
        print(f"rehearse: error: --data: {e}", file=sys.stderr)
        return EXIT_USAGE
    if "dali" in backends:
        from .data.dali_backend import dali_available
        if not dali_available():
            print("rehearse: error: --backends has dali but NVIDIA DALI is not installed (pip install "
                  "'tresnet-train[dali]'), or pass --backends torch", file=sys.stderr)
            return EXIT_USAGE
    cuda = torch.cuda.is_available()
    nproc = args.nproc or (min(2, torch.cuda.device_count()) if cuda else 2)
    out = (args.out or Path(tempfile.mkdtemp(prefix="rehearse-"))).expanduser().resolve()
    iabn = inplace_abn_available()
    device = f"{torch.cuda.get_device_name(0)} x{nproc}" if cuda else f"cpu, {nproc} processes (gloo)"
    cases = plan(args.configs, backends, out)
    added = sorted({c.name for c in cases} - {p.name for p in args.configs})
    print(f"rehearsing {len(cases) // len(backends)} config(s) x {len(backends)} backend(s) on {data} "
          f"({len(classes)} classes) | {device} | runs in {out}"
          + (f" | added {', '.join(added)}: a 448 config starts from its best.pth" if added else "")
          + (f" | your overrides: {' '.join(args.extra)}" if args.extra else ""), flush=True)
    for case in cases:
        case.extra = list(args.extra)

    runner = Runner(nproc, args.timeout)
    t0 = time.perf_counter()
    for case in cases:
        t = time.perf_counter()
        prepare(case, data, len(classes), cuda, nproc, iabn)
        if case.load_error:
            case.fail("stop", case.load_error)
        elif case.producer is not None and not (case.producer.run_dir / case.init_name).is_file():
            case.fail("init", f"the {case.producer.name} [{case.backend}] rehearsal wrote no "
                              f"{case.init_name} to start from")
        else:
            if case.run_dir.exists():
                import shutil
                shutil.rmtree(case.run_dir)
            data_root = data if case.cfg.data.source == "folder" else _other_data_root(case.cfg)
            rehearse_case(case, runner, data_root, cuda)
            if not args.keep_checkpoints:
                _drop_heavy_files(case.run_dir)
        case.seconds = time.perf_counter() - t
        print(line(case), flush=True)
    seconds = time.perf_counter() - t0
    result = report(cases, data, out, device, nproc, seconds)
    failed = [c for c in cases if not c.passed]
    print(f"{len(cases) - len(failed)}/{len(cases)} passed in {seconds:.0f} s; logs in {out}",
          flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return EXIT_FAILED if failed else EXIT_OK


def _other_data_root(cfg) -> Path | None:
    """The folder a non-folder source trains on (digits: built offline), None for synthetic."""
    if cfg.data.source == "synthetic":
        return None
    from .data.build import dataset_root
    return dataset_root(cfg.data)


def _drop_heavy_files(run_dir: Path) -> None:
    """last.pth and the top-k copies go; best.pth (a 448 config may start from it) stays."""
    (run_dir / "last.pth").unlink(missing_ok=True)
    for path in (run_dir / "top").glob("*.pth") if (run_dir / "top").is_dir() else ():
        path.unlink()


if __name__ == "__main__":
    sys.exit(main())
