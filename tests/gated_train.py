"""train.py that holds its run folder and waits: once it has taken the run lock and built everything,
it touches READY and waits for GO to exist before training, so a test can start a second run on the
same folder while this one is certainly alive.

    python tests/gated_train.py READY GO --config ... overrides
"""
import os
import sys
import time

import tresnet_train.trainer as trainer
from tresnet_train.cli import train_main

ready, go = sys.argv[1], sys.argv[2]
real_fit = trainer.Trainer.fit


def gated_fit(self):
    open(ready, "w").close()
    deadline = time.time() + 900  # a hang guard, not a pace
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.05)
    return real_fit(self)


trainer.Trainer.fit = gated_fit
sys.exit(train_main(sys.argv[3:]))
