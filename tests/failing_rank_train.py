"""train.py whose rank 1 raises at its 4th step (global step 3): the whole job must end, not hang."""
import os
import sys

import tresnet_train.engine as engine
from tresnet_train.cli import train_main

real_seed_step = engine.seed_step


def failing_seed_step(seed, rank, step):
    if rank == 1 and step == 3:
        raise RuntimeError("injected failure on rank 1 at step 3")
    real_seed_step(seed, rank, step)


engine.seed_step = failing_seed_step
assert os.environ.get("WORLD_SIZE") == "2"
sys.exit(train_main(sys.argv[1:]))
