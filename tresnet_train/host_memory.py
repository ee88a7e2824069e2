"""Host memory settings that make training on a CPU faster: glibc keeps freed memory for reuse, and
PyTorch backs large tensors with transparent huge pages.

Why: with glibc's defaults a training step's large CPU tensors (activations and gradients of a few
MiB each) are often mapped fresh from the kernel and handed back when freed, so the next step faults
them in and zeroes them again. On a 2-core CPU, resnet18 at batch 32 (64 px) took 17-43 thousand page
faults a second, 5-9% of its CPU time in the kernel, varying from process to process; with both
settings below, about 300 a second and 2%. The overhead benchmark (benchmarks/, `-overhead-host-memory`)
measures the speed this gives.

- glibc `mallopt`: M_MMAP_THRESHOLD 32 MiB (a fixed value also stops glibc from moving it), so
  blocks up to 32 MiB come from the heap; M_TRIM_THRESHOLD 1 GiB, so the heap is not handed back to
  the kernel between steps. The cost: the process keeps its peak heap.
- THP_MEM_ALLOC_ENABLE=1: PyTorch's CPU allocator advises huge pages for tensors of 2 MiB or more
  (one fault per 2 MiB instead of per 4 KiB). PyTorch reads it once, at the first CPU tensor, so
  `keep_host_memory()` runs before any is made.

Forked processes (DataLoader workers) inherit both, started ones the huge pages. A user's own
choice wins: THP_MEM_ALLOC_ENABLE already set, glibc malloc settings in MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES, or another allocator in LD_PRELOAD (jemalloc, tcmalloc).
"""
from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # bytes; larger blocks are still mapped, and unmapped when freed
TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept before any is handed back
THP_ENV = "THP_MEM_ALLOC_ENABLE"
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # glibc's own, read at start-up
USER_SETTINGS = (THP_ENV, *MALLOC_ENV, "GLIBC_TUNABLES")  # where a user's choice overrides ours

_line = "defaults"  # what keep_host_memory() did, for the run's speed line


def keep_host_memory() -> None:
    """Apply both settings to this process (and the processes it starts), unless the user chose."""
    global _line
    if THP_ENV in os.environ:
        thp = f"huge pages {THP_ENV}={os.environ[THP_ENV]} (as set)"
    else:
        os.environ[THP_ENV] = "1"
        thp = "huge pages for tensors >= 2 MiB"
    _line = f"{thp}, {_glibc_keep_freed()}"


def _glibc_keep_freed() -> str:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "malloc as is (not glibc)"
    preload = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preload:  # jemalloc, tcmalloc, mimalloc
        return f"malloc as is (LD_PRELOAD={preload})"
    own = [k for k in MALLOC_ENV if k in os.environ]
    if own or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return f"glibc malloc as set ({', '.join(own) or 'GLIBC_TUNABLES'})"
    libc = ctypes.CDLL("libc.so.6")
    kept = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    if not kept:  # mallopt returns 0 for a value it refuses
        return "glibc malloc as is (mallopt refused)"
    return (f"glibc keeps freed memory (mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
            f"trim threshold {TRIM_THRESHOLD >> 30} GiB)")


def host_memory_line() -> str:
    """What keep_host_memory() chose, or "defaults" where it did not run in this process."""
    return _line
