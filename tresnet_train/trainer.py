"""`run(cfg)`: the whole training job, as a straight list of named builders and the epoch loop.

preflight (config, model name, data folder: seconds, before any GPU or data work) -> distributed world
-> model -> data -> optimizer and schedule -> resume -> epochs of train + validate + checkpoint.

Exit codes of train.py: 0 finished, 2 bad config, a run folder in use by another run or too small,
75 stopped by SIGTERM/SIGUSR1 after writing a resumable checkpoint (SLURM requeues on it), 130
stopped by Ctrl-C the same way, 1 anything else (a non-finite loss, a checkpoint write that failed).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .config import WITH_BETAS, Config, ConfigError, dump_yaml, report_source, to_dict
from .data import DataError, build_loaders, scan_image_folder
from .data.digits import check_digits_root
from .distributed import (World, barrier, broadcast_buffers, broadcast_object, cleanup,
                          gather_objects, init_distributed, local_gpu, world_from_env)
from .engine import NoEMA, StepMeter, StepParts, evaluate, grouped, train_step
from .host_memory import host_memory_line
from .logs import MetricsLog, Progress, duration, setup_console
from .losses import build_batch_augment, build_criterion
from .models import UnknownModelError, check_model_name, create_model, get_data_config, load_weights
from .models.layers import inplace_abn_layers, set_drop_block
from .optim import build_optimizer, build_schedule, in_group_order, scaled_lr
from .precision import GradClipper, Precision, PrecisionError, enable_tf32, resolve_amp
from .run_lock import RunLock, RunLockError
from .sync_norm import convert_sync_norm

log = logging.getLogger("tresnet_train")

EXIT_OK, EXIT_FAILED, EXIT_PREEMPTED, EXIT_INTERRUPTED = 0, 1, 75, 130


class NonFiniteLoss(RuntimeError):
    pass


def preflight(cfg: Config) -> list[str] | None:
    """Checks that need no GPU and no decoding: the model exists and matches the data's classes.

    Raises ConfigError (exit code 2) naming the key; returns the class names of a folder dataset.
    """
    try:
        check_model_name(cfg.model.name)
    except UnknownModelError as e:
        raise ConfigError(f"config key 'model.name': {e}") from None
    if cfg.run.device != "cpu" and torch.cuda.is_available():  # the GPU this process will take
        try:
            resolve_amp(cfg.train.amp, local_gpu(world_from_env()))
        except PrecisionError as e:
            raise ConfigError(str(e)) from None
    for key, path in (("model.pretrained", cfg.model.pretrained),
                      ("model.init_from", cfg.model.init_from),
                      ("run.resume", None if cfg.run.resume in ("auto", "none") else cfg.run.resume)):
        if path:
            try:
                ckpt.load(path, mmap=True)  # the structure only: tensors are mapped, not read
            except ckpt.CheckpointError as e:
                raise ConfigError(f"config key '{key}': {e}") from None
    if cfg.data.source == "digits" and cfg.data.root:
        try:
            check_digits_root(Path(cfg.data.root).expanduser())
        except DataError as e:
            raise ConfigError(f"config key 'data.source' is digits: {e}") from None
    if cfg.data.source != "folder":
        return None
    try:
        classes, _, _ = scan_image_folder(cfg.data.root)
    except DataError as e:
        raise ConfigError(f"config key 'data.root': {e}") from None
    if len(classes) != cfg.model.num_classes:
        raise ConfigError(f"config key 'model.num_classes' is {cfg.model.num_classes} but "
                          f"{cfg.data.root}/train has {len(classes)} class folders; set "
                          f"model.num_classes={len(classes)}")
    return classes


class StopSignal:
    """SIGTERM/SIGUSR1/SIGINT set a flag; the run checkpoints at the next step boundary and exits.

    Exit 75 after SIGTERM/SIGUSR1 (SLURM requeues on it), 130 after Ctrl-C (SIGINT), the shell's
    code for an interrupt. A second Ctrl-C exits at once: the checkpoints on disk stay whole, since
    every write is a rename of a finished file.
    """

    def __init__(self, announce: bool):
        self.received: str | None = None
        self.announce = announce  # rank 0 says what happens; the other ranks stay quiet
        self.previous = {sig: signal.signal(sig, self._handle)
                         for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

    def restore(self) -> None:
        """Put back the handlers found at construction (None: one not set from Python, the default)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.received == "SIGINT" else EXIT_PREEMPTED

    def _say(self, text: str) -> None:
        if self.announce:
            os.write(sys.stdout.fileno(), f"\n{text}\n".encode())  # print() is unsafe in a handler

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            self._say("second Ctrl-C: exiting now; the last checkpoint on disk is whole")
            os._exit(EXIT_INTERRUPTED)
        if signum == signal.SIGINT and self.received is None:
            self._say("Ctrl-C: writing a checkpoint at the next step, then stopping (Ctrl-C again "
                      "to exit now)")
        self.received = self.received or signal.Signals(signum).name


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    torch.manual_seed(cfg.run.seed)  # same initial weights for the same seed, run after run
    extra = {"drop_block_rate": cfg.model.drop_block_rate} if cfg.model.drop_block_rate else {}
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, norm=cfg.model.norm,
                         drop_path_rate=cfg.model.drop_path_rate, **extra)
    if cfg.model.pretrained:
        try:
            load_weights(model, cfg.model.pretrained, skip_mismatched_classifier=True)
        except ValueError as e:
            raise ConfigError(f"config key 'model.pretrained': {e}") from None
    if cfg.model.init_from:
        meta = ckpt.load(cfg.model.init_from, mmap=True)
        use_ema = isinstance(meta, dict) and meta.get("best_source") == "ema"
        try:
            load_weights(model, cfg.model.init_from, use_ema=use_ema)
        except ValueError as e:
            raise ConfigError(f"config key 'model.init_from': {e}") from None
        log.info("initialised weights from %s (%s weights)", cfg.model.init_from,
                 "EMA" if use_ema else "model")
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    return model.to(device=device, memory_format=memory_format)


def device_line(device: torch.device, world: World) -> str:
    """The device(s): name, compute capability, memory (GPUs), or the CPU and its cores."""
    if device.type != "cuda":
        return f"{world.world_size} process(es) on CPU ({os.cpu_count()} cores)"
    p = torch.cuda.get_device_properties(device)
    return (f"{world.world_size} process(es), this one on {p.name} (compute capability "
            f"{p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB)")


def speed_choices(cfg: Config, device: torch.device, world: World, precision: Precision,
                  model: nn.Module, train_loader) -> str:
    """One line: the device(s) and every speed choice made, with its reason."""
    on = {True: "on", False: "off"}
    cuda = device.type == "cuda"
    iabn = bool(inplace_abn_layers(model))
    norm = "InPlace-ABN" if iabn else "BatchNorm"
    norm_why = "as configured"
    if cfg.model.norm == "auto":
        norm_why = ("auto: CUDA and inplace_abn installed" if iabn else
                    "auto: inplace_abn not installed" if cuda else "auto: CPU")
    parts = [device_line(device, world),
             f"precision {precision.amp} ({precision.reason})",
             f"TF32 {on[cuda and cfg.run.tf32]} (run.tf32{'' if cuda else '; CUDA only'})",
             f"cudnn.benchmark {on[cuda]} (fixed input sizes)",
             f"channels_last {on[cfg.model.channels_last]}, compile {on[cfg.model.compile]}, "
             f"gradient checkpointing {on[cfg.model.grad_checkpointing]} (as configured)",
             f"norm {norm} ({norm_why}), sync {on[cfg.model.sync_bn and world.distributed]}",
             f"host memory: {host_memory_line()}"]
    if getattr(train_loader, "backend", None) == "dali":
        from .data.dali_backend import hardware_decoder_share
        share = hardware_decoder_share(device)
        parts.append(f"DALI {'mixed' if cuda else 'cpu'} decoding, hardware JPEG decoder share "
                     f"{share:g}" + ("" if share or not cuda else " (this GPU has none)"))
    return "speed: " + " | ".join(parts)


def wrap_model(model: nn.Module, cfg: Config, world: World,
               device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(bare model, the model as the step calls it): sync-norm, DDP, torch.compile where they apply."""
    if world.distributed and cfg.model.sync_bn:
        model = convert_sync_norm(model, device)
    train_model = model
    if world.distributed:
        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets (no copy, less memory)
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    if cfg.model.compile:
        train_model = torch.compile(train_model)
    return model, train_model


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def on_rank_0(world: World, check) -> None:
    """Run `check()` on rank 0; a ConfigError or RunLockError it raises is raised on every rank."""
    error = None
    if world.is_main:
        try:
            check()
        except (ConfigError, RunLockError) as e:
            error = (type(e) is RunLockError, str(e))
    error = broadcast_object(error)
    if error:
        raise (RunLockError if error[0] else ConfigError)(error[1])


def hold_run_folder(out: Path, world: World) -> RunLock:
    """Rank 0 checks that the run folder takes files and takes its lock (run_lock.py); every rank
    raises when either fails. Released by `Trainer.close()`, or at exit."""
    lock = RunLock(out)

    def check():
        unwritable = ckpt.check_writable(out)
        if unwritable:
            raise ConfigError(unwritable)
        lock.acquire()
        atexit.register(lock.release)

    on_rank_0(world, check)
    return lock


def checkpoint_bytes(cfg: Config, model: nn.Module, ema) -> int:
    """About one checkpoint's size: model and EMA tensors, the optimizer's per-parameter slots
    (created at the first step: SGD's momentum buffer, AdamW's and LAMB's two moments), and about
    1 KiB of zip entry and pickle per tensor (tresnet_tiny: 6.02 MB written, 6.17 MB estimated)."""
    params = list(model.parameters())
    slots = 2 if cfg.optim.name in WITH_BETAS else int(cfg.optim.momentum > 0)
    copies = 2 if ema.module is not None else 1
    state = model.state_dict()
    tensors = copies * len(state) + slots * len(params)
    return (copies * ckpt.tensor_bytes(state) + slots * ckpt.tensor_bytes(params)
            + tensors * 1024)


def check_room(out: Path, size: int, keep_top_k: int) -> None:
    """Rank 0: a ConfigError when the run folder cannot hold the run's checkpoints, a warning when
    that is uncertain (checkpoint.check_room)."""
    short = ckpt.check_room(out, size, keep_top_k)
    if short and short[0]:
        raise ConfigError(short[1])
    if short:
        log.warning("warning: %s", short[1])


class Trainer:
    """Holds the run's parts between builders; `fit()` is the epoch loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.t_start, self.wall_before = time.perf_counter(), 0.0  # wall_before: earlier runs' time
        self.world, self.device = init_distributed(cfg.run.device, cfg.run.dist_timeout_min)
        setup_console(self.world)
        self.out = Path(cfg.run.output_dir)
        self.lock = hold_run_folder(self.out, self.world)
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.out / "config.yaml")
        enable_tf32(cfg.run.tf32)
        self.stop = StopSignal(announce=self.world.is_main)

        # model
        self.model = build_model(cfg, self.device)
        self.data_config = get_data_config(self.model)
        self.model, self.train_model = wrap_model(self.model, cfg, self.world, self.device)
        self.ema = ModelEmaV3(self.model, decay=cfg.train.ema_decay) if cfg.train.ema else NoEMA()

        # data
        self.train_loader, self.val_loader = build_loaders(cfg, self.data_config, self.world,
                                                           self.device)
        self.classes = list(self.train_loader.classes)
        steps = len(self.train_loader) // cfg.optim.accum_steps
        self.steps = min(steps, cfg.train.steps_per_epoch) if cfg.train.steps_per_epoch else steps
        if self.steps == 0:
            raise ConfigError(f"config: 0 training steps per epoch: {len(self.train_loader)} batches "
                              f"of data.batch_size={cfg.data.batch_size} per process with "
                              f"optim.accum_steps={cfg.optim.accum_steps}; lower the batch size")

        # optimizer, schedule, precision, loss
        self.global_batch = cfg.data.batch_size * self.world.world_size * cfg.optim.accum_steps
        self.peak_lr = scaled_lr(cfg.optim, self.global_batch)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.peak_lr)
        self.precision = Precision(cfg.train.amp, self.device)
        self.parts = StepParts(
            model=self.model, train_model=self.train_model, optimizer=self.optimizer,
            schedule=build_schedule(cfg.optim, self.peak_lr, self.steps, cfg.train.epochs),
            criterion=build_criterion(cfg),
            batch_augment=build_batch_augment(cfg, cfg.model.num_classes, self.device,
                                              self.data_config.get("std", (1.0, 1.0, 1.0))),
            precision=self.precision, clipper=GradClipper(cfg.optim.clip_grad), ema=self.ema,
            seed=cfg.run.seed, rank=self.world.rank)

        self.epoch, self.start_step = 0, 0
        self.report = report_source(cfg)  # the headline weights; the other's top-1 is logged too
        self.best = {"top1": -1.0, "epoch": -1, "source": self.report}
        self.topk = ckpt.TopK(self.out, cfg.run.keep_top_k)
        self.last_val: dict = {}
        size = checkpoint_bytes(cfg, self.model, self.ema)
        on_rank_0(self.world, lambda: check_room(self.out, size, cfg.run.keep_top_k))
        self.resume()
        self.metrics = MetricsLog(self.out, self.world.is_main, cfg.run.tensorboard,
                                  resume_step=self.epoch * self.steps + self.start_step)

    def close(self) -> None:
        """Close the metrics, put back the signal handlers and hand the run folder back (its lock)."""
        self.stop.restore()
        self.metrics.close()
        self.lock.release()

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self, epoch: int, step: int) -> dict:
        """Everything needed to continue exactly at optimizer step `step` of `epoch` (collective)."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema.module is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "epoch": epoch, "step_in_epoch": step, "global_step": epoch * self.steps + step,
            "steps_per_epoch": self.steps, "world_size": self.world.world_size,
            "loader": gather_objects(self.train_loader.state_dict()),  # one per rank
            "config": to_dict(self.cfg), "model_name": self.cfg.model.name,
            "data_config": {k: list(v) if isinstance(v, tuple) else v
                            for k, v in self.data_config.items()},
            "classes": self.classes, "best": dict(self.best), "best_source": self.best["source"],
            "topk": self.topk.entries, "val": dict(self.last_val), "wall_s": self.wall_s(),
        }

    def save(self, epoch: int, step: int, name: str = ckpt.LAST) -> None:
        state = self.state(epoch, step)
        if self.world.is_main:
            ckpt.save_atomic(state, self.out / name)
        barrier()

    def resume_path(self) -> str | None:
        """The checkpoint to resume from (None: a fresh run), as chosen by rank 0 (collective).

        One choice for all: a rank choosing alone, after a transient read error on its node, would
        take an older file and resume at another step (a hang or silent divergence).
        """
        resume = self.cfg.run.resume
        choice = None
        if self.world.is_main and resume != "none":
            found = ckpt.find_resume(self.out) if resume == "auto" else resume
            choice = None if found is None else str(found)
        return broadcast_object(choice)

    def resume(self) -> None:
        cfg = self.cfg
        path = self.resume_path()
        if path is None:
            log.info("starting a fresh run in %s", self.out)
            return
        if cfg.model.init_from:
            log.info("run folder %s has a checkpoint: resuming from it; model.init_from applies to "
                     "fresh runs only", self.out)
        try:
            state = ckpt.load(path, mmap=True)  # each tensor read once, as it is copied in
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"rank {self.world.rank} cannot read {path}, the checkpoint "
                                       f"rank 0 chose to resume from: {e}") from None
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:  # another model's checkpoint
            detail = " ".join(str(e).split())[:300]
            raise ConfigError(f"cannot resume from {path}: it does not fit {cfg.model.name} "
                              f"({detail}); use run.resume=none or a new run.output_dir") from None
        if state.get("ema") is not None and self.ema.module is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(in_group_order(state["optimizer"], self.optimizer))
        self.precision.scaler.load_state_dict(state["scaler"])
        self.epoch, self.start_step = state["epoch"], state["step_in_epoch"]
        if state["steps_per_epoch"] != self.steps:
            raise ConfigError(f"cannot resume from {path}: it has {state['steps_per_epoch']} steps "
                              f"per epoch, this run {self.steps} (batch size, world size or data "
                              f"changed); use run.resume=none or a new run.output_dir")
        self.best, self.topk.entries = state["best"], state["topk"]
        self.wall_before = float(state.get("wall_s", 0.0))
        self.last_val = state.get("val", {})
        if state["world_size"] == self.world.world_size:
            self.train_loader.load_state_dict(state["loader"][self.world.rank])
        else:
            log.warning("resuming with world size %d from a %d-process checkpoint: the data order "
                        "of the current epoch restarts from the saved step with a new sharding",
                        self.world.world_size, state["world_size"])
        if self.epoch >= cfg.train.epochs:
            log.info("resumed from %s: all %d epochs are done already", path, cfg.train.epochs)
        else:
            log.info("resumed from %s at epoch %d, step %d", path, self.epoch + 1, self.start_step)

    def wall_s(self) -> float:
        """Wall-clock seconds of the whole run, earlier (resumed-from) processes included."""
        return self.wall_before + time.perf_counter() - self.t_start

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> int:
        cfg = self.cfg
        batches = len(self.train_loader) // cfg.optim.accum_steps
        capped = f" (of {batches}: train.steps_per_epoch)" if self.steps < batches else ""
        log.info("model %s (%.2fM params) | %d train steps/epoch%s x %d epochs | global batch %d | "
                 "peak lr %.4g | amp %s on %s, %d process(es)", cfg.model.name,
                 sum(p.numel() for p in self.model.parameters()) / 1e6, self.steps, capped,
                 cfg.train.epochs, self.global_batch, self.peak_lr, self.precision.amp, self.device,
                 self.world.world_size)
        log.info("%s", speed_choices(cfg, self.device, self.world, self.precision, self.model,
                                      self.train_loader))
        if cfg.optim.warmup_epochs >= cfg.train.epochs and cfg.optim.schedule != "onecycle":
            log.warning("warning: optim.warmup_epochs=%g is not shorter than train.epochs=%d: the "
                        "learning rate never reaches its peak and never decays", cfg.optim.warmup_epochs,
                        cfg.train.epochs)
        for epoch in range(self.epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            start, self.start_step = self.start_step, 0
            if self.train_epoch(epoch, start):
                log.info("%s received: checkpoint written to %s; resume with run.resume=auto",
                         self.stop.received, self.out / ckpt.LAST)
                return self.stop.exit_code
            results = None
            if (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs:
                results = self.validate(epoch, time.perf_counter() - t0)
            self.end_of_epoch_checkpoints(epoch, results)
        self.write_summary()
        log.info("done: best top-1 %.2f%% (%s weights, train.report; epoch %d) | wall time %s | "
                 "checkpoints in %s | metrics in %s | TensorBoard: tensorboard --logdir %s",
                 self.best["top1"], self.best["source"], self.best["epoch"] + 1,
                 duration(self.wall_s()), self.out, self.out / "metrics.jsonl", self.out / "tb")
        return EXIT_OK

    def write_summary(self) -> None:
        """summary.json: best and final metrics, and a fingerprint of every rank's final weights.

        Data-parallel ranks must end with identical weights; a mismatch is logged as an error.
        """
        prints = gather_objects(weights_fingerprint(self.model))
        if len(set(prints)) > 1:
            log.error("ranks hold different weights at the end of training: %s", prints)
        if self.world.is_main:
            best = dict(self.best, epoch=self.best["epoch"] + 1)  # 1-based, as in the logs
            summary = {"best": best, "final": self.last_val, "epochs": self.cfg.train.epochs,
                       "wall_time_s": round(self.wall_s(), 1),
                       "global_step": self.cfg.train.epochs * self.steps,
                       "world_size": self.world.world_size, "weights_sha256_per_rank": prints}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))

    def train_epoch(self, epoch: int, start_step: int) -> bool:
        """Train one epoch from `start_step`; True when a stop signal ended it (checkpoint written).

        Each step: train, then at a log point log, at a checkpoint point save, and on a stop signal
        save and stop. The loss stays on the device between log points. A lone process honours a
        signal at any step for free; several agree on it at log and checkpoint points only, where
        the flag travels in the loss's all-reduce.
        """
        cfg, world = self.cfg, self.world
        self.train_loader.set_epoch(epoch, start_step * cfg.optim.accum_steps)
        set_drop_block(self.model, cfg.model.drop_block_rate * (epoch + 1) / cfg.train.epochs)
        self.model.train()
        progress = Progress(world.is_main, epoch, cfg.train.epochs, self.steps, start_step)
        meter = StepMeter(self.device, epoch * self.steps + start_step)
        batches = grouped(self.train_loader, cfg.optim.accum_steps)
        ckpt_every = cfg.run.ckpt_every_steps  # 0: at epoch ends only
        try:
            for step, micro_batches in zip(range(start_step, self.steps), batches):
                global_step = epoch * self.steps + step
                loss = train_step(self.parts, micro_batches, global_step)
                meter.add(loss, images=sum(len(targets) for _, targets in micro_batches))

                last = step + 1 == self.steps
                log_due = step == start_step or (step + 1) % cfg.run.log_every == 0 or last
                ckpt_due = ckpt_every > 0 and (global_step + 1) % ckpt_every == 0
                lone_stop = not world.distributed and self.stop.received is not None
                if not (log_due or ckpt_due or lone_stop):
                    continue
                mean_loss, stop = self.read_meter(meter, epoch)
                if log_due:
                    self.log_train(progress, meter, step, global_step, mean_loss)
                if (stop or ckpt_due) and not last:
                    self.save(epoch, step + 1)
                if stop and not last:
                    return True
        finally:
            progress.close()
        broadcast_buffers(self.model)
        if self.ema.module is not None:
            broadcast_buffers(self.ema.module)
        return False

    def read_meter(self, meter: StepMeter, epoch: int) -> tuple[float, bool]:
        """(mean loss since the last log point, any rank signalled); NonFiniteLoss on a NaN/inf."""
        mean_loss, nonfinite, signalled = meter.reduce(self.stop.received is not None)
        if nonfinite:
            raise NonFiniteLoss(
                f"loss became non-finite (NaN/inf) at global step {meter.first_bad_step()} "
                f"(epoch {epoch + 1}); stopping. The last good checkpoint is "
                f"{self.out / ckpt.LAST}: lower optim.lr or set optim.clip_grad, then resume.")
        return mean_loss, signalled

    def log_train(self, progress: Progress, meter: StepMeter, step: int, global_step: int,
                  mean_loss: float) -> None:
        """The progress line and the train metrics, then a new log interval."""
        lr = self.parts.schedule(global_step)
        img_s = meter.images_per_s(self.world.world_size)
        progress.update(step, mean_loss, lr, img_s)
        self.metrics.write("train", global_step + 1, **{  # steps done, as val records
            "train/loss": mean_loss, "train/lr": lr, "train/img_per_s": img_s})
        meter.reset(global_step + 1)

    def validate(self, epoch: int, epoch_time: float) -> dict:
        """Validate the model and its EMA; log, and return {"model": metrics, "ema": metrics}."""
        log.info("epoch %d/%d | validating on %d images (%d steps per process) ...", epoch + 1,
                 self.cfg.train.epochs, self.val_loader.num_images, len(self.val_loader))
        results = {"model": evaluate(self.model, self.val_loader, self.precision, self.device)}
        if self.ema.module is not None:
            results["ema"] = evaluate(self.ema.module, self.val_loader, self.precision, self.device)
        scalars = {"time/epoch_s": epoch_time}
        for source, prefix in (("model", "val"), ("ema", "val_ema")):
            for metric in ("top1", "top5", "loss"):
                if source in results:
                    scalars[f"{prefix}/{metric}"] = results[source][metric]
        if self.device.type == "cuda":
            scalars["mem/peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.metrics.write("val", (epoch + 1) * self.steps, epoch=epoch + 1, **scalars)
        ema = results.get("ema")
        log.info("epoch %d/%d | %.0fs | val top-1 %.2f top-5 %.2f loss %.4f (%d images)%s",
                 epoch + 1, self.cfg.train.epochs, epoch_time, results["model"]["top1"],
                 results["model"]["top5"], results["model"]["loss"], results["model"]["num_images"],
                 f" | EMA top-1 {ema['top1']:.2f} top-5 {ema['top5']:.2f}" if ema else "")
        return results

    def end_of_epoch_checkpoints(self, epoch: int, results: dict | None) -> None:
        """last.pth always; best.pth and top-k when validation ran, ranked by the top-1 of the
        weights train.report names (timm ranks by the EMA's when there is one), never a max over both.

        One state, written once (atomically) as last.pth; best.pth and the top-k file are hard
        links to it. The other ranks wait in a host-side (gloo) barrier meanwhile.
        """
        improved = in_top = False
        if results is not None:
            source = self.report
            top1 = results[source]["top1"]
            self.last_val = {f"{k}_{m}": v for k, r in results.items() for m, v in r.items()}
            improved = top1 > self.best["top1"]
            if improved:
                self.best = {"top1": top1, "epoch": epoch, "source": source}
            in_top = self.world.is_main and self.topk.admit(top1, epoch)
        state = self.state(epoch + 1, 0)  # records the top-k with this epoch
        if self.world.is_main:
            last = self.out / ckpt.LAST
            ckpt.save_atomic(state, last)
            if in_top:
                self.topk.keep(epoch, last)
            if improved:
                ckpt.link_atomic(last, self.out / ckpt.BEST)
        barrier()


def run(cfg: Config) -> int:
    """Train as configured (after `preflight`); returns the process exit code."""
    trainer, ok = None, False
    try:
        trainer = Trainer(cfg)
        code = trainer.fit()
        ok = True
        return code
    except NonFiniteLoss as e:
        log.error("%s", e)
        return EXIT_FAILED
    finally:
        if trainer is not None:
            trainer.close()
        cleanup(failed=not ok)
