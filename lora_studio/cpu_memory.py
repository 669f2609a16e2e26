"""Keep large temporary buffers in the C heap instead of mapping and unmapping them per op (glibc only).

Why: PyTorch's CPU ops allocate their large temporaries (oneDNN's reordered conv weights, matmul outputs,
activations) with plain ``malloc``. glibc serves every block above its mmap threshold (at most 32 MiB, and
adjusted at run time) with a fresh ``mmap`` and gives it back with ``munmap`` on free, so each such op pays for
page faults on memory the kernel must zero, a cost that grows with the process's resident size (bench/RESULTS.md,
"Allocator"). Raising the mmap threshold and the trim
threshold with ``mallopt`` lets freed blocks be reused without new page faults. PyTorch's CPU tuning guide
recommends jemalloc or tcmalloc (``LD_PRELOAD``) for the same reason; this needs nothing installed.

Written by hand (no library exposes ``mallopt``). Set ``LORA_STUDIO_MALLOC_TUNING=0`` to leave glibc as it is.
The cost: memory freed by large tensors stays with the process for reuse instead of going back to the system,
so only the entry points call this (the CLI, the app with a lower trim threshold since it runs for hours, the
bench workers); importing the package changes no process setting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30   # blocks up to 1 GiB come from the heap and are reused after free
TRIM_THRESHOLD = (1 << 31) - 1  # give memory back only when ~2 GiB is free at the heap's top (mallopt takes an int)
APP_TRIM_THRESHOLD = 1 << 28    # the app: a render or training job's ~GiB of temporaries goes back within 256 MiB

_state: dict[str, bool] = {}


def tune_glibc_malloc(trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Apply the settings once per process; True when glibc accepted them (False elsewhere: macOS, Windows,
    musl, or turned off by ``LORA_STUDIO_MALLOC_TUNING=0``)."""
    if "done" in _state:
        return _state["done"]
    ok = False
    if sys.platform.startswith("linux") and os.environ.get("LORA_STUDIO_MALLOC_TUNING", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = getattr(libc, "mallopt", None)
            if mallopt is not None and hasattr(libc, "gnu_get_libc_version"):
                ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
        except OSError:
            ok = False
    _state["done"] = ok
    return ok
