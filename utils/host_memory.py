"""Host memory of long loss passes: keep the process's heap from growing with the number of candidates."""
import ctypes
import ctypes.util
import sys


def bound_heap_growth(threshold: int = 64 * 1024) -> bool:
    """Have glibc return every buffer larger than `threshold` to the system when freed.

    By default glibc raises its mmap threshold after large frees and then serves the per-batch buffers
    (tens of MB each) from a heap that only grows: measured by benchmarks/memory_scaling.py, the peak
    anonymous memory of one pass rose with the LAION subset size (693 -> 875 MiB from 1,000 to 8,000
    images at B = 400) instead of staying flat (577 -> 587 MiB with this). Linux/glibc only; elsewhere it
    does nothing and returns False."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
