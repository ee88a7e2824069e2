"""model.channels_last and model.compile change how a training step is computed, not what it computes:
one forward and backward of tresnet_tiny in training mode equals eager NCHW within float32 tolerance,
logits and every parameter's gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tresnet_train.models import create_model

LOGIT_TOLERANCE = 1e-4  # max abs difference, float32 logits of order 1
GRAD_TOLERANCE = 1e-4  # max abs difference relative to the largest gradient of that parameter


def step(forward, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One forward (through `forward`: the model or its compiled form) and backward: the logits and
    each of `model`'s parameter gradients."""
    model.zero_grad(set_to_none=True)
    logits = forward(x)
    F.cross_entropy(logits, y).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def eager(randomize_norms):
    """(model, input, targets, the eager step's result) in training mode, batch statistics included."""
    torch.manual_seed(0)
    model = randomize_norms(create_model("tresnet_tiny", num_classes=10, norm="bn")).train()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    return model, x, y, step(model, model, x, y)


def assert_same_step(result, reference) -> None:
    (logits, grads), (ref_logits, ref_grads) = result, reference
    assert (logits - ref_logits).abs().max().item() <= LOGIT_TOLERANCE
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item()
        assert scale > 0, name  # every parameter learns, so the comparison means something
        assert (grad - ref_grads[name]).abs().max().item() <= GRAD_TOLERANCE * scale, name


def test_channels_last_step_equals_eager(eager):
    model, x, y, reference = eager
    model = model.to(memory_format=torch.channels_last)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_step(step(model, model, x.contiguous(memory_format=torch.channels_last), y), reference)


@pytest.mark.slow
def test_compiled_step_equals_eager(eager):
    model, x, y, reference = eager
    torch._dynamo.reset()
    compiled = torch.compile(model)  # inductor: C++ kernels on CPU
    try:
        result = step(compiled, model, x, y)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        pytest.skip(f"inductor cannot compile on this machine: {str(e).splitlines()[0]}")
    assert_same_step(result, reference)
