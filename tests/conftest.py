"""Shared fixtures: the digits dataset and one reference training run (trainer, fault, validation and
resume tests), model-test helpers, and signal handlers put back after each test."""
import signal
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from trainer_helpers import tiny_overrides, train


def _randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every norm layer random positive scales, biases and running statistics.

    A fresh model zero-initialises the last norm of each residual branch, so every block starts as
    the identity and an equivalence test would not see the branches; this makes them count.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is not None and getattr(m, "weight", None) is not None:
                c = m.weight.numel()
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
    return model


@pytest.fixture(scope="session")
def randomize_norms():
    """`randomize_norms(model, seed=0)`: random positive norm scales and statistics, in place."""
    return _randomize_norms


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The demo's digits dataset (ImageFolder of JPEGs), built once per test session."""
    from tresnet_train.data.digits import build_digits
    return build_digits(tmp_path_factory.mktemp("digits") / "digits")


class Run(NamedTuple):
    """A finished training run: its folder, and train.py's exit code and output."""
    out: Path
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def reference(tmp_path_factory, digits) -> Run:
    """One uninterrupted `tiny_overrides` run (2 epochs of 6 steps, model + EMA), trained once per session.

    It is the run every interrupted-and-resumed run must reproduce tensor for tensor, the checkpoint
    validate.py must agree with, and the starting point of the resume tests. Tests only read it; one
    that writes into a run folder copies it first.
    """
    out = tmp_path_factory.mktemp("reference")
    proc = train(tiny_overrides(out, digits))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Run(out, proc)


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """A Trainer built in this process installs SIGINT/SIGTERM/SIGUSR1 handlers: give pytest's back."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    saved = {s: signal.getsignal(s) for s in signals}
    yield
    for s, handler in saved.items():
        if signal.getsignal(s) is not handler:
            signal.signal(s, handler)
