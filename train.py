"""Train a model: `python train.py --config configs/tresnet_m.yaml [section.key=value ...]`.

Works the same under `torchrun` (one or many nodes) and SLURM's `srun`. See README.md.
"""
import sys

from tresnet_train.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
