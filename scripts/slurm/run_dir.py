"""Print the run folder that train.py will use for the same arguments: `run.output_dir` of the config
file (its `base:` chain included) after the dotted overrides, read with train.py's own config loader.

    python scripts/slurm/run_dir.py --config configs/tresnet_m_448.yaml data.root=/data/imagenet
    -> runs/tresnet_m_448

The job scripts (common.sh) run it so that the copy of the job log and a requeued start use the
folder the trainer writes to: one fixed folder per config, which is where a 448 config's
`model.init_from` expects the 224 run's best.pth. A bad config exits 2 with the trainer's one-line
message, as train.py would, before any step starts. Only the config module is imported (no torch).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's package

from tresnet_train.config import ConfigError, load_config  # noqa: E402

EXIT_CONFIG = 2  # train.py's exit code for a config error


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False)  # train.py's --config and overrides
    parser.add_argument("--config", default=None)
    parser.add_argument("overrides", nargs="*")
    args, _ = parser.parse_known_args(argv)  # train.py's other flags do not change the folder
    try:
        print(load_config(args.config, args.overrides).run.output_dir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
