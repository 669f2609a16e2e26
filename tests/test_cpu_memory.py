"""lora_studio.cpu_memory: with the allocator settings a large tensor comes from glibc's heap (kept for reuse)
instead of its own mmap (unmapped on free, so the next one faults every page in again, the cost
bench/RESULTS.md measured); LORA_STUDIO_MALLOC_TUNING=0 leaves glibc's defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = r"""
import ctypes, json, resource, torch
import lora_studio
from lora_studio.cpu_memory import tune_glibc_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = tune_glibc_malloc()  # what the entry points do first
faults = []
for i in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20)  # 64 MiB, above glibc's largest default mmap threshold (32 MiB)
    t.fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    if i == 0:
        info = libc.mallinfo2()
        mapped, heap = info.hblkhd, info.arena
    del t
print(json.dumps({"tuned": tuned, "mapped": mapped, "heap": heap, "faults": faults}))
"""


def _probe(tuning: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORA_STUDIO_MALLOC_TUNING": tuning, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_large_tensors_come_from_the_reusable_heap_only_with_the_allocator_settings():
    size = 64 * 2**20
    pages = size // os.sysconf("SC_PAGE_SIZE")
    on, off = _probe("1"), _probe("0")
    assert on["tuned"] is True and off["tuned"] is False
    assert off["mapped"] >= size and on["mapped"] < size  # its own mmap without the settings, the heap with
    assert on["heap"] >= size
    # without the settings every new tensor of that size faults all of its pages in again (with them, whether a
    # freed block's pages are still resident is up to the kernel's reclaim, so that side is not asserted)
    assert min(off["faults"]) > pages // 2


IMPORT_PROBE = r"""
import ctypes, json, os, sys, torch
environ, threads, recursion = dict(os.environ), torch.get_num_threads(), sys.getrecursionlimit()
import lora_studio.lora.formats, lora_studio.models, lora_studio.mix, lora_studio.export, lora_studio.render

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
t = torch.empty(16 * 2**20)
t.fill_(1.0)
print(json.dumps({"mapped": libc.mallinfo2().hblkhd, "environ": dict(os.environ) == environ,
                  "threads": torch.get_num_threads() == threads, "recursion": sys.getrecursionlimit() == recursion}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_importing_the_core_changes_no_process_setting():
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORA_STUDIO_MALLOC_TUNING": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["mapped"] >= 64 * 2**20          # glibc's own default: a block this large gets its own mmap
    assert got["environ"] and got["threads"] and got["recursion"]
