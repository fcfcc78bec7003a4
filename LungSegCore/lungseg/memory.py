"""Process-wide allocator tuning for the command-line tools (never applied inside a host such as Slicer).

glibc's malloc hands every large block back to the OS when it is freed and maps it afresh, page faults and
zeroing included, on the next allocation. A network's activations are exactly such blocks, allocated and freed
on every forward pass, so keeping freed memory in the heap makes the forward pass faster (the gain that
PyTorch's CPU tuning notes get from jemalloc or tcmalloc; measured by scripts/benchmark.py).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLDS = (256 << 20, 32 << 20)  # older glibc caps the threshold at 32 MiB on 64-bit systems
TRIM_THRESHOLD = 1 << 30  # free memory above 1 GiB at the heap's top still goes back to the OS


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse; True when applied (glibc only).

    The trim threshold is set only after the mmap threshold was accepted: alone, it would pin the mmap
    threshold at 128 KiB and make every activation a fresh mapping (3x slower than glibc's default).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library
        return False
    if not any(mallopt(M_MMAP_THRESHOLD, value) == 1 for value in MMAP_THRESHOLDS):
        return False
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
