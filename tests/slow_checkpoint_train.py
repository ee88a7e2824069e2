"""train.py with a slow checkpoint writer: the Nth write stops half way, touches MARKER and sleeps,
so a test can SIGKILL the run in the middle of writing a checkpoint.

    python tests/slow_checkpoint_train.py MARKER N --config ... overrides
"""
import io
import sys
import time

import tresnet_train.checkpoint as checkpoint
from tresnet_train.cli import train_main

marker, nth = sys.argv[1], int(sys.argv[2])
real_save, calls = checkpoint.torch.save, []


def slow_save(obj, f):
    calls.append(1)
    if len(calls) < nth:
        return real_save(obj, f)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    open(marker, "w").close()
    time.sleep(600)
    f.write(data[len(data) // 2:])


checkpoint.torch.save = slow_save
sys.exit(train_main(sys.argv[3:]))
