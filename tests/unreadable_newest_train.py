"""train.py (under torchrun, 2 processes) whose rank 1 cannot read the newest checkpoint, last.pth,
as after a transient read error on its node. Every rank prints the global step it resumed at.

    python -m torch.distributed.run ... tests/unreadable_newest_train.py MODE --config ... overrides

MODE `check`: rank 1's readability check of last.pth fails (a rank choosing alone would fall back to
an older file). MODE `load`: rank 1 cannot load last.pth at all (it must fail, naming file and rank).
"""
import os
import sys
from pathlib import Path

import tresnet_train.checkpoint as checkpoint
import tresnet_train.trainer as trainer
from tresnet_train.cli import train_main

mode, rank = sys.argv[1], int(os.environ["RANK"])
real_is_readable, real_load = checkpoint.is_readable, checkpoint.load
real_resume = trainer.Trainer.resume


def _hidden(path) -> bool:
    return rank == 1 and Path(path).name == checkpoint.LAST


def is_readable(path):
    return False if _hidden(path) else real_is_readable(path)


def load(path, mmap=False):
    if _hidden(path):
        raise checkpoint.CheckpointError(f"checkpoint {path} is unreadable or truncated (injected)")
    return real_load(path, mmap=mmap)


def resume(self):
    real_resume(self)
    print(f"rank {self.world.rank} resumed at global step {self.epoch * self.steps + self.start_step}",
          flush=True)


if mode == "check":
    checkpoint.is_readable = is_readable
else:
    checkpoint.load = load
trainer.Trainer.resume = resume
assert os.environ.get("WORLD_SIZE") == "2"
sys.exit(train_main(sys.argv[2:]))
