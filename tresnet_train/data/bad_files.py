"""Files that fail after indexing: deleted or made unreadable mid-run (a network file system hiccup),
or undecodable despite the indexing check. Each is skipped (its sample replaced by the next one),
counted and named in the log once; more than `data.max_bad_fraction` of a split ends the run.
"""
from __future__ import annotations

import logging

from .folder import DataError

log = logging.getLogger(__name__)


class BadFiles:
    """Counts a split's failed files into `skipped` (the loader's list, shared) against a limit."""

    def __init__(self, skipped: list[str], total: int, max_fraction: float, split: str = "training"):
        self.skipped, self.total, self.max_fraction, self.split = skipped, total, max_fraction, split
        self.failed: set[str] = set()  # failed after indexing (`skipped` also holds indexing's)

    def add(self, path: str, why: str) -> None:
        if path in self.failed:
            return
        self.failed.add(path)
        self.skipped.append(path)
        limit = int(self.max_fraction * self.total)
        log.warning("skipping %s file %s (%s): it failed after indexing (deleted, unreadable or "
                    "corrupt); %d of %d skipped so far, up to %d allowed (data.max_bad_fraction=%g)",
                    self.split, path, why, len(self.failed), self.total, limit, self.max_fraction,
                    extra={"all_ranks": True})
        if len(self.failed) > limit:
            raise DataError(f"{len(self.failed)} of {self.total} {self.split} files failed after "
                            f"indexing, more than data.max_bad_fraction={self.max_fraction:g} "
                            f"allows ({limit}); the last: {path} ({why}). Check the data folder "
                            f"(a network file system dropping out?), then resume with "
                            f"run.resume=auto, or raise data.max_bad_fraction")


def unreadable(path: str) -> str:
    """Why `path` cannot be read now ('' when its first byte can)."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror}"
    return ""
