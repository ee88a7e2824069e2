"""Optimizers and their weight-decay groups (timm's create_optimizer_v2), and LR schedules.

Weight decay is applied to weight matrices and conv kernels only: timm's filter (`filter_bias_and_bn`)
puts every parameter with `ndim <= 1` (norm scales and shifts, biases) and those a model lists in
`no_weight_decay()` in a group with weight decay 0. Choosing by structure rather than by name
substrings never misses a norm hidden under an unexpected name.

Schedules are pure functions of the global optimizer step: `schedule(step) -> lr`. Nothing but the
step needs checkpointing, and each can be tested in one line.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from timm.optim import create_optimizer_v2

from .config import WITH_BETAS, OptimConfig
from .models.layers import ScaleFloor


def _timm_name(cfg: OptimConfig) -> str:
    """timm's optimizer name: its 'sgd' is SGD with Nesterov momentum, 'momentum' plain momentum SGD."""
    if cfg.name == "sgd":
        return "sgd" if cfg.nesterov else "momentum"
    return cfg.name


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The config gives lr per 256 images (Goyal et al.); scale linearly with the global batch."""
    return cfg.lr * global_batch / 256


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer with timm's weight-decay groups: [no decay (ndim <= 1), decay] (the first only
    when weight decay is 0); after each step it keeps InPlace-ABN scales >= eps."""
    kwargs = {"betas": tuple(cfg.betas)} if cfg.name in WITH_BETAS else {"momentum": cfg.momentum}
    optimizer = create_optimizer_v2(model, opt=_timm_name(cfg), lr=lr, weight_decay=cfg.weight_decay,
                                    filter_bias_and_bn=True, **kwargs)
    floor = ScaleFloor(model)
    if floor:
        optimizer.register_step_post_hook(floor)
    return optimizer


def in_group_order(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """`saved` (an optimizer state dict) with its groups in `optimizer`'s order, [no decay, decay].

    Checkpoints written before the groups came from timm hold them as [decay, no decay]; loading
    those as they are would give each parameter another's momentum, or fail on the group sizes.
    Within a group, both orders list the parameters as `model.parameters()` does.
    """
    groups, current = saved["param_groups"], optimizer.param_groups
    decay_first = (len(groups) == len(current) == 2 and groups[0]["weight_decay"] > 0
                   and groups[1]["weight_decay"] == 0 and current[0]["weight_decay"] == 0)
    if not decay_first:
        return saved
    decay, plain = groups
    renumber = {old: new for new, old in enumerate(plain["params"] + decay["params"])}
    return {"state": {renumber[i]: v for i, v in saved["state"].items()},
            "param_groups": [dict(g, params=[renumber[i] for i in g["params"]]) for g in (plain, decay)]}


def _cosine(frac: float) -> float:
    """1 -> 0 along half a cosine as frac goes 0 -> 1."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


def build_schedule(cfg: OptimConfig, peak_lr: float, steps_per_epoch: int,
                   epochs: int) -> Callable[[int], float]:
    """lr as a function of the global optimizer step, for `epochs * steps_per_epoch` steps."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    start = cfg.warmup_lr_ratio * peak_lr

    def warm(step: int) -> float:
        return start + (peak_lr - start) * (step + 1) / warmup

    if cfg.schedule == "cosine":
        floor = cfg.min_lr_ratio * peak_lr
        if cfg.lr_per_epoch:
            return _epoch_cosine(cfg, peak_lr, steps_per_epoch, epochs)
        cycle = max(warmup + 1, total - cfg.cooldown_epochs * steps_per_epoch)  # then the floor

        def cosine(step: int) -> float:
            if step < warmup:
                return warm(step)
            return floor + (peak_lr - floor) * _cosine((step - warmup) / max(1, cycle - warmup))
        return cosine

    if cfg.schedule == "step":
        milestones = sorted(int(round(m * steps_per_epoch)) for m in cfg.step_milestones)

        def stepwise(step: int) -> float:
            if step < warmup:
                return warm(step)
            return peak_lr * cfg.step_gamma ** sum(step >= m for m in milestones)
        return stepwise

    # One-cycle (Smith & Topin), as torch's OneCycleLR with cosine annealing: rise from peak/25 to
    # peak over pct_start of the run, then fall to peak/25/1e4. The TResNet paper trains with it.
    rise = max(1, int(cfg.onecycle_pct_start * total))
    low, final = peak_lr / 25.0, peak_lr / 25.0 / 1e4

    def onecycle(step: int) -> float:
        if step < rise:
            return peak_lr + (low - peak_lr) * _cosine(step / rise)
        return final + (peak_lr - final) * _cosine((step - rise) / max(1, total - 1 - rise))
    return onecycle


def _epoch_cosine(cfg: OptimConfig, peak_lr: float, steps_per_epoch: int,
                  epochs: int) -> Callable[[int], float]:
    """One lr per epoch, as timm's CosineLRScheduler (t_in_epochs, cycle_limit 1) in timm's train.py.

    Epoch t < warmup_epochs: start + t * (peak - start) / warmup_epochs (epoch 0 at `start`); then
    floor + (peak - floor) * (1 + cos(pi * t / cycle)) / 2 with t counted from epoch 0 (the warm-up
    lies inside the cycle, timm's default), and the floor for the `cooldown_epochs` after the cycle.
    """
    start, floor = cfg.warmup_lr_ratio * peak_lr, cfg.min_lr_ratio * peak_lr
    cycle = max(1, epochs - cfg.cooldown_epochs)

    def epoch_cosine(step: int) -> float:
        t = step // max(1, steps_per_epoch)
        if t < cfg.warmup_epochs:
            return start + t * (peak_lr - start) / cfg.warmup_epochs
        return floor + (peak_lr - floor) * _cosine(t / cycle)
    return epoch_cosine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
