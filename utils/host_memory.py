"""Host memory of long loss passes: keep the process's heap from growing with the number of candidates."""
import ctypes
import ctypes.util
import sys


# glibc mmap thresholds compared by benchmarks/memory_scaling.py and benchmarks/unlearning_step.py
MMAP_THRESHOLDS = {"64KiB": 64 * 1024, "1MiB": 2**20, "32MiB": 32 * 2**20}


def bound_heap_growth(threshold: int = MMAP_THRESHOLDS["1MiB"]) -> bool:
    """Have glibc return every buffer larger than `threshold` (1 MiB) to the system when freed.

    By default glibc raises its mmap threshold after large frees and then serves the per-batch buffers
    (tens of MB each) from a heap that only grows: measured by benchmarks/memory_scaling.py, the peak
    anonymous memory of one pass rose with the LAION subset size (1,034 -> 1,188 MiB from 1,000 to 8,000
    images at B = 400) and stays flat with this (800 -> 804 MiB). The threshold is 1 MiB, not lower: at
    64 KiB every mid-sized tensor of the backward pass costs fresh page faults and an unlearning step on
    the CPU took twice as long as the authors' plain loop (benchmarks/unlearning_step.py: 2.36 s against
    1.22 s; 1.16 s at 1 MiB). Linux/glibc only; elsewhere it does nothing and returns False."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
