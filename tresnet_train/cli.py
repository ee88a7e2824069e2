"""Command-line entry points: parse, load the config strictly, preflight, then hand over
(`--print-config`: print the resolved config as YAML and stop there).

A bad config, an unknown model or a data folder that does not match costs seconds and exits with
code 2 and one line naming the key, before any GPU or data work.
"""
from __future__ import annotations

import argparse
import errno
import shutil
import sys

import yaml
from torch.distributed.elastic.multiprocessing.errors import record

from .config import ConfigError, load_config, to_dict
from .host_memory import keep_host_memory

EXIT_FAILED, EXIT_CONFIG = 1, 2
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def disk_error(e: OSError, folder: str) -> str:
    """One line for a write that a full or read-only disk refused, with the free bytes."""
    try:
        free = f"{shutil.disk_usage(folder).free:,}"
    except OSError:
        free = "unknown"
    return (f"{e.strerror} while writing {e.filename or 'a file'} in {folder} ({free} bytes free); "
            f"checkpoints are written atomically, the last one there is whole: free space and resume "
            f"with run.resume=auto")


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a TResNet (or any timm model) on an ImageFolder dataset.",
        epilog="Overrides: dotted keys after the config, e.g. data.root=/data/imagenet optim.lr=0.3. "
               "To see every key with its resolved value, add --print-config.")
    parser.add_argument("--config", default=None,
                        help="YAML config (default: built-in defaults; see configs/)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (config file + overrides, every key) as YAML "
                             "and exit; builds nothing (defaults and units: tresnet_train/config.py)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser


@record
def train_main(argv: list[str] | None = None) -> int:
    args = _train_parser().parse_args(argv)
    keep_host_memory()  # before the first tensor: PyTorch reads its huge-page setting once
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        from .trainer import preflight, run  # torch-heavy imports after the cheap checks
        preflight(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from .checkpoint import CheckpointError, CheckpointWriteError
    from .data import DataError
    from .run_lock import RunLockError
    try:
        return run(cfg)
    except CheckpointWriteError as e:  # disk full, quota, read-only, mid-run
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:  # another file of the run (metrics, config) on a full or read-only disk
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"error: {disk_error(e, cfg.run.output_dir)}", file=sys.stderr)
        return EXIT_FAILED
    except ConfigError as e:  # found while building (e.g. 0 steps per epoch, resume mismatch)
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (DataError, CheckpointError, RunLockError) as e:  # a file or folder the user can fix
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
