"""Host memory settings (tresnet_train/host_memory.py): glibc keeps blocks up to 32 MiB in its heap,
PyTorch backs large tensors with huge pages, and a user's own settings win. Each case runs in a fresh
process, as train.py does: both settings act only before the first allocation they govern."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tresnet_train.host_memory import USER_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# malloc 16 MiB (glibc's default maps any block over 128 KiB of its own) and report whether it was
# mapped: mallinfo2's hblks counts the blocks mapped outside the heap
MALLOC_16MIB = """
import ctypes, json, os, sys
from tresnet_train.host_memory import host_memory_line, keep_host_memory
if sys.argv[1] == "keep":
    keep_host_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblks
block = libc.malloc(16 << 20)
print(json.dumps({"mapped": libc.mallinfo2().hblks - before, "line": host_memory_line(),
                  "thp": os.environ.get("THP_MEM_ALLOC_ENABLE")}))
"""

# as train.py: the package (and torch) imported, then the settings, then a 64 MiB tensor touched
TENSOR_64MIB = """
import sys
import torch
import tresnet_train.cli  # as train.py: torch and the package imported before the settings
from tresnet_train.host_memory import keep_host_memory
if sys.argv[1] == "keep":
    keep_host_memory()
x = torch.ones(16 << 20)
print(next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")))
"""


def run(code: str, mode: str, **env) -> str:
    proc = subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture
def fresh_env(monkeypatch):
    for key in USER_SETTINGS:
        monkeypatch.delenv(key, raising=False)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt: Linux with glibc only")
def test_blocks_up_to_32_mib_come_from_the_heap(fresh_env):
    default = json.loads(run(MALLOC_16MIB, "default"))
    kept = json.loads(run(MALLOC_16MIB, "keep"))
    assert default["mapped"] == 1, default  # glibc's default: mapped, and unmapped again when freed
    assert kept["mapped"] == 0, kept
    assert "glibc keeps freed memory" in kept["line"] and "huge pages for tensors" in kept["line"]
    assert default["line"] == "defaults" and kept["thp"] == "1"


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt: Linux with glibc only")
def test_a_users_own_malloc_and_huge_page_settings_win(fresh_env):
    mine = json.loads(run(MALLOC_16MIB, "keep", MALLOC_MMAP_THRESHOLD_="131072", THP_MEM_ALLOC_ENABLE="0"))
    assert mine["mapped"] == 1, mine  # the user's 128 KiB threshold, not ours
    assert mine["thp"] == "0"
    assert "glibc malloc as set (MALLOC_MMAP_THRESHOLD_)" in mine["line"]
    assert "THP_MEM_ALLOC_ENABLE=0 (as set)" in mine["line"]


@pytest.mark.skipif(not THP_MODE.exists() or "[never]" in THP_MODE.read_text(),
                    reason="transparent huge pages are off on this machine")
def test_large_tensors_get_huge_pages_when_set_after_the_package_is_imported(fresh_env):
    kept_kib = int(run(TENSOR_64MIB, "keep"))
    assert kept_kib >= 32 << 10, f"{kept_kib} KiB in huge pages for a 64 MiB tensor"
    if "[madvise]" in THP_MODE.read_text():  # huge pages only where asked for
        assert int(run(TENSOR_64MIB, "default")) < kept_kib
