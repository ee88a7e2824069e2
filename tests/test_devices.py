"""Which GPU a process drives, with the CUDA calls and the launcher's environment mocked (CPU only).

`srun --gpus-per-task=1` (or `--gpu-bind`) shows each task one GPU, as device 0, while SLURM_LOCALID
counts 0..N-1: the device is the local rank modulo the visible devices, for PyTorch and for DALI.
"""
from __future__ import annotations

import pytest
import torch

from data_helpers import REPO, photo
from tresnet_train import distributed
from tresnet_train.data.dali_backend import dali_available
from tresnet_train.distributed import World, init_distributed, pick_device, world_from_env

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")


@pytest.fixture
def gpus(monkeypatch):
    """`gpus(n)`: pretend n CUDA devices are visible; returns the list of set_device calls."""
    calls = []

    def install(n: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", calls.append)
        return calls
    return install


@pytest.fixture
def srun_task(monkeypatch):
    """`srun_task(procid, localid, ntasks)`: the variables srun sets for one task, no torchrun's."""
    def install(procid: int, localid: int, ntasks: int) -> None:
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("SLURM_PROCID", str(procid))
        monkeypatch.setenv("SLURM_LOCALID", str(localid))
        monkeypatch.setenv("SLURM_NTASKS", str(ntasks))
    return install


@pytest.mark.parametrize("visible,local_rank,index", [
    (1, 3, 0),  # srun --gpus-per-task=1: every task sees its own GPU as device 0
    (4, 5, 1),  # --gpu-bind=closest on 2 sockets: tasks 4..7 see their socket's GPUs as 0..3
    (8, 3, 3),  # torchrun, or srun with all GPUs visible: local rank k drives GPU k
    (8, 0, 0),
])
def test_device_is_the_local_rank_modulo_the_visible_gpus(gpus, visible, local_rank, index):
    calls = gpus(visible)
    device = pick_device("auto", World(rank=8 + local_rank, local_rank=local_rank, world_size=16))
    assert device == torch.device("cuda", index)
    assert calls == [index]


def test_srun_task_with_one_visible_gpu_gets_device_0(gpus, srun_task):
    srun_task(procid=7, localid=3, ntasks=8)
    calls = gpus(1)
    world = world_from_env()
    assert world == World(rank=7, local_rank=3, world_size=8)  # shard by the global rank
    assert pick_device("cuda", world) == torch.device("cuda", 0)
    assert calls == [0]


def test_without_cuda_auto_is_the_cpu_and_cuda_is_refused(gpus):
    gpus(0)
    assert pick_device("auto", World(local_rank=3)) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="run.device=cuda but CUDA is not available"):
        pick_device("cuda", World())


def test_missing_master_addr_says_what_to_do(srun_task, monkeypatch):
    srun_task(procid=1, localid=1, ntasks=2)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda *a, **k: pytest.fail("must stop before joining a group"))
    with pytest.raises(RuntimeError) as err:
        init_distributed("cpu")
    message = str(err.value)
    assert "2 processes" in message and "torchrun" in message
    assert "MASTER_ADDR=$(scontrol show hostnames" in message and "MASTER_PORT=" in message
    assert "scripts/slurm/train.sbatch" in message
    assert (REPO / "scripts/slurm/train.sbatch").is_file()  # the file it names exists


@needs_dali
@pytest.mark.parametrize("visible,local_rank,index", [(1, 3, 0), (4, 5, 1)])
def test_dali_decodes_on_the_device_the_process_uses(tmp_path, gpus, visible, local_rank, index):
    from tresnet_train.data.dali_backend import _Dali
    gpus(visible)
    device = pick_device("auto", World(local_rank=local_rank, world_size=8))
    image = tmp_path / "a.JPEG"
    photo(64, 48, seed=0).save(image)
    d = _Dali(device, workers=2, samples=[(str(image), 0)], largest=True)  # builds no pipeline: no CUDA
    assert d.gpu and d.device_id == index
