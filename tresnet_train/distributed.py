"""Where this process sits in the job: read from torchrun or SLURM variables, one code path for all.

`python train.py` is a world of one. Under torchrun, RANK/LOCAL_RANK/WORLD_SIZE are set and
MASTER_ADDR/PORT point at the rendezvous. Under `srun` without torchrun, SLURM_PROCID/SLURM_LOCALID/
SLURM_NTASKS give the same facts and MASTER_ADDR/PORT must be exported by the job script. Data is always
sharded by the *global* rank (sharding by the local rank repeats shards on every node).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0  # global rank: the data shard this process reads
    local_rank: int = 0  # rank within the node: the GPU this process drives
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def world_from_env() -> World:
    """torchrun's variables first, then SLURM's (srun launching one task per GPU), else a world of one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return World(_env_int("RANK", default=0), _env_int("LOCAL_RANK", default=0),
                     _env_int("WORLD_SIZE", default=1))
    if "SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", default=1) > 1:
        return World(_env_int("SLURM_PROCID", default=0), _env_int("SLURM_LOCALID", default=0),
                     _env_int("SLURM_NTASKS", default=1))
    return World()


def pick_device(preference: str, world: World) -> torch.device:
    """`auto` takes this process's GPU when CUDA is present, else the CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but CUDA is not available; use run.device=auto or cpu")
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def init_distributed(preference: str = "auto", timeout_s: float = 600.0) -> tuple[World, torch.device]:
    """Join the process group (NCCL on GPU, gloo on CPU) when there is more than one process."""
    world = world_from_env()
    device = pick_device(preference, world)
    if world.distributed and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("distributed launch without MASTER_ADDR/MASTER_PORT: use torchrun, or "
                               "export them in the SLURM script (scripts/slurm/)")
        os.environ.setdefault("RANK", str(world.rank))
        os.environ.setdefault("WORLD_SIZE", str(world.world_size))
        os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return world, device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks in place (no-op in a world of one)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running stats) to every rank, in place.

    DDP broadcasts them at the start of each forward, so after the last step of an epoch each rank
    holds stats updated by its own batch only. Called before validation and saving so that every
    rank evaluates, and every checkpoint holds, the same model.
    """
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class MainProcessFilter(logging.Filter):
    """Lets records through on rank 0 only (records with `all_ranks=True` in `extra` pass everywhere)."""

    def __init__(self, world: World):
        super().__init__()
        self.world = world

    def filter(self, record: logging.LogRecord) -> bool:
        return self.world.is_main or getattr(record, "all_ranks", False)
