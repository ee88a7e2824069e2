"""Validate a checkpoint: `python validate.py --ckpt runs/tresnet_m/best.pth --data /data/imagenet`.

Works the same under `torchrun` (every image counted once). Options: `python validate.py --help`;
the behaviour is documented in tresnet_train/validation.py.
"""
import sys

from tresnet_train.validation import main

if __name__ == "__main__":
    sys.exit(main())
