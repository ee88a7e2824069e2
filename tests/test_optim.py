"""Schedules are pure functions of the step; weight-decay groups are chosen by structure."""

import pytest
import torch
import torch.nn as nn

from tresnet_train.config import OptimConfig
from tresnet_train.models import create_model
from tresnet_train.models.layers import inplace_abn_available
from tresnet_train.optim import build_optimizer, build_schedule, in_group_order, scaled_lr


def test_lr_is_per_256_images():
    assert scaled_lr(OptimConfig(lr=0.1), 1024) == pytest.approx(0.4)


def test_cosine_with_warmup():
    f = build_schedule(OptimConfig(schedule="cosine", warmup_epochs=1), 1.0, steps_per_epoch=10, epochs=11)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(109) < 1e-3 and all(f(s) >= f(s + 1) for s in range(10, 109))


def test_onecycle_rises_then_falls():
    f = build_schedule(OptimConfig(schedule="onecycle", onecycle_pct_start=0.25), 1.0, 10, 4)
    assert f(0) == pytest.approx(1 / 25)
    assert f(10) == pytest.approx(1.0)
    assert f(39) < 1e-3
    assert all(f(s) <= f(s + 1) for s in range(0, 9)) and all(f(s) >= f(s + 1) for s in range(10, 39))


def test_step_schedule():
    f = build_schedule(OptimConfig(schedule="step", warmup_epochs=0, step_milestones=[2, 3],
                                   step_gamma=0.1), 1.0, 10, 4)
    assert [f(s) for s in (0, 19, 20, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def decay_of(optimizer) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


def test_no_decay_on_1d_parameters_whatever_their_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    decay = decay_of(build_optimizer(model, OptimConfig(weight_decay=0.05), lr=0.1))
    assert len(decay) == 6 and sorted(decay.values()) == [0.0] * 4 + [0.05] * 2
    assert {p.ndim for p in model.parameters() if decay[id(p)] == 0.05} == {2, 4}
    assert {p.ndim for p in model.parameters() if decay[id(p)] == 0.0} == {1}  # bn weight and bias, biases


@pytest.mark.parametrize("name, norm", [
    ("tresnet_tiny", "bn"), ("resnest50d", "bn"),
    pytest.param("tresnet_tiny", "iabn", marks=pytest.mark.skipif(
        not inplace_abn_available(), reason="inplace_abn is not installed"))])
def test_decay_groups_of_our_models(name, norm):
    """Decay on conv kernels and the classifier weight only; every norm scale and shift and every bias
    (SE's and the classifier's) goes without."""
    model = create_model(name, norm=norm)
    decay = decay_of(build_optimizer(model, OptimConfig(name="sgd", weight_decay=1e-4), lr=0.1))
    norms = {id(p) for m in model.modules() if hasattr(m, "running_var") for p in m.parameters()}
    assert norms
    for pname, p in model.named_parameters():
        undecayed = id(p) in norms or pname.endswith(".bias")
        assert decay[id(p)] == (0.0 if undecayed else 1e-4), pname
    assert len(decay) == len(list(model.parameters()))


@pytest.mark.parametrize("name, cls", [("sgd", "SGD"), ("adamw", "AdamW"), ("lamb", "Lamb")])
def test_timm_optimizers(name, cls):
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, OptimConfig(name=name), lr=0.5)
    assert type(opt).__name__ == cls
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 1e-4]  # timm's order
    assert all(g["lr"] == 0.5 for g in opt.param_groups)
    if name == "sgd":
        assert all(g["nesterov"] is True for g in opt.param_groups)


def test_per_epoch_cosine_is_timms_scheduler_with_cool_down():
    """TResNet-M's published run: timm's CosineLRScheduler (warm-up 3 epochs from 1e-4 inside the
    300-epoch cycle, floor 1e-5, one lr per epoch) and 10 cool-down epochs at the floor."""
    from timm.scheduler import CosineLRScheduler
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.6)
    timm_sched = CosineLRScheduler(opt, t_initial=300, lr_min=1e-5, warmup_t=3, warmup_lr_init=1e-4,
                                   cycle_limit=1, t_in_epochs=True)
    cfg = OptimConfig(schedule="cosine", lr_per_epoch=True, warmup_epochs=3, warmup_lr_ratio=1e-4 / 0.6,
                      min_lr_ratio=1e-5 / 0.6, cooldown_epochs=10)
    f = build_schedule(cfg, 0.6, steps_per_epoch=7, epochs=310)
    want = [timm_sched._get_lr(epoch)[0] for epoch in range(310)]
    assert [f(7 * epoch) for epoch in range(310)] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert all(f(7 * epoch + i) == f(7 * epoch) for epoch in (0, 2, 150) for i in range(7))
    assert f(7 * 300) == f(7 * 309) == pytest.approx(1e-5)


def test_per_step_cosine_cool_down_holds_the_floor():
    f = build_schedule(OptimConfig(schedule="cosine", warmup_epochs=0, min_lr_ratio=0.1,
                                   cooldown_epochs=2), 1.0, steps_per_epoch=10, epochs=12)
    assert f(0) == pytest.approx(1.0) and f(50) == pytest.approx(0.55)
    assert [f(s) for s in range(100, 120)] == pytest.approx([0.1] * 20)


def test_a_state_saved_with_decay_first_groups_loads_onto_the_same_parameters():
    """Checkpoints written before the groups came from timm hold [decay, no decay]: each parameter
    gets its own momentum back (the group sizes differ, so a plain load would fail)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))
    params = list(model.parameters())
    decay = [p for p in params if p.ndim > 1]
    old = torch.optim.SGD([{"params": decay, "weight_decay": 0.05},
                           {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    old.step()
    momentum = {id(p): old.state[p]["momentum_buffer"].clone() for p in params}

    new = build_optimizer(model, OptimConfig(weight_decay=0.05), lr=0.1)
    with pytest.raises(ValueError):
        new.load_state_dict(old.state_dict())
    new.load_state_dict(in_group_order(old.state_dict(), new))
    for p in params:
        assert torch.equal(new.state[p]["momentum_buffer"], momentum[id(p)])
    assert [g["weight_decay"] for g in new.param_groups] == [0.0, 0.05]
    assert in_group_order(new.state_dict(), new) == new.state_dict()  # today's order: unchanged
