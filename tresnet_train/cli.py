"""Command-line entry points: parse, load the config strictly, preflight, then hand over.

A bad config, an unknown model or a data folder that does not match costs seconds and exits with
code 2 and one line naming the key, before any GPU or data work.
"""
from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from .config import ConfigError, load_config

EXIT_CONFIG = 2


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a TResNet (or any timm model) on an ImageFolder dataset.",
        epilog="Overrides: dotted keys after the config, e.g. data.root=/data/imagenet optim.lr=0.3")
    parser.add_argument("--config", default=None,
                        help="YAML config (default: built-in defaults; see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser


@record
def train_main(argv: list[str] | None = None) -> int:
    args = _train_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from .trainer import preflight, run  # torch-heavy imports after the cheap checks
        preflight(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return run(cfg)
    except ConfigError as e:  # found while building (e.g. 0 steps per epoch, resume mismatch)
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
