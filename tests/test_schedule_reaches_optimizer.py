"""The learning rate the optimizer steps with is optim.build_schedule's at that global step, and
TensorBoard's train/lr shows that same value: a schedule the optimizer never sees would train at a
constant lr while its own unit tests pass."""
from __future__ import annotations

import pytest

from trainer_helpers import ROOT, tiny_overrides
from tresnet_train.config import load_config
from tresnet_train.optim import build_schedule, scaled_lr


@pytest.mark.slow
def test_every_optimizer_step_uses_the_scheduled_lr_and_tensorboard_shows_it(tmp_path, digits):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tresnet_train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides(tmp_path / "run", digits, **{
        "optim.schedule": "cosine", "optim.warmup_epochs": 1, "run.log_every": 1,
        "train.val_every": 100}))
    trainer = Trainer(cfg)
    seen = []  # each step's lr of every param group, read by the optimizer itself
    trainer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append([g["lr"] for g in optimizer.param_groups]))
    try:
        trainer.fit()
    finally:
        trainer.close()

    steps = cfg.train.epochs * cfg.train.steps_per_epoch
    schedule = build_schedule(cfg.optim, scaled_lr(cfg.optim, cfg.data.batch_size),
                              cfg.train.steps_per_epoch, cfg.train.epochs)
    expected = [schedule(step) for step in range(steps)]
    assert len(set(expected)) == steps  # warm-up, then the cosine: a new lr at every step
    assert seen == [[lr] * len(lrs) for lr, lrs in zip(expected, seen)] and len(seen) == steps

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    logged = acc.Scalars("train/lr")
    assert [e.step for e in logged] == list(range(1, steps + 1))  # steps done, as the records say
    assert [e.value for e in logged] == pytest.approx(expected, rel=1e-6)  # float32 in the file
