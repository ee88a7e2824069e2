"""A short soak (scripts/soak.py): over several epochs with validation and checkpoints, no process of
a run (main or loader worker) grows in resident memory or open file descriptors. The committed
long run is benchmarks/soak.md."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from trainer_helpers import ROOT

_spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_nothing_grows_over_six_epochs(tmp_path, digits, backend):
    every, since = soak.STEPS_PER_EPOCH, 2 * soak.STEPS_PER_EPOCH
    result = soak.soak(backend, 6 * soak.STEPS_PER_EPOCH, every, tmp_path / "run",
                       [f"data.root={digits}", "data.batch_size=16"])
    assert result["returncode"] == 0, (tmp_path / "run.log").read_text()[-3000:]
    rows = soak.growth(result, since)
    assert rows[0]["from_step"] >= since and rows[0]["samples"] >= 3, rows
    processes = [row["process"] for row in rows]
    assert "main" in processes
    if backend == "torch":  # demo.yaml's two persistent train workers, measured on their own
        assert sum(p.startswith("loader worker") for p in processes) == 2, processes
    for row in rows:
        assert soak.passes(row, max_growth_mb=50.0), f"{row}; every sample: {result['samples']}"


def test_a_batch_in_shared_memory_is_counted_apart_from_other_descriptors():
    _, other, batches = soak.measure(os.getpid())
    shared = torch.zeros(1000).share_memory_()  # what a torch worker makes for each batch tensor
    assert soak.measure(os.getpid())[1:] == (other, batches + 1)
    del shared
    assert soak.measure(os.getpid())[1:] == (other, batches)
