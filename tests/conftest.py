"""Shared fixtures: the digits dataset (trainer, fault and validation tests), model-test helpers."""
import pytest
import torch


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
