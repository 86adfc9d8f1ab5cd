"""Host memory of long loss passes: keep the process's resident memory from growing with the number of
candidates, without page faults in the hot loops (docs/performance.md, section Memory).

The scripts keep every buffer on glibc's heap (`keep_buffers_on_heap`: no mmap for large buffers, no shrinking on
free), so the per-batch buffers of the loss passes and of unlearning are served from the same pages again and
again, and trim the heap every TRIM_EVERY_BATCHES loss batches, so the free pages that fragmentation leaves
behind go back to the system instead of accumulating over a 100K-candidate pass. Measured, memory stays flat
from 1,000 to 64,000 candidate images and system time 1.3-3.1% of user time on both model sizes tried. Earlier
policies, selectable with ABU_HEAP for the benchmarks that compare them: "trim" (glibc's own thresholds, trimmed
alike: flat too, but glibc maps buffers above its adaptive threshold afresh, 7% system time on mini-AbC),
"glibc" (untouched, never trimmed: the allocator the authors' code runs under; memory grows with the subset), and
a fixed mmap threshold such as "1MiB" (flat, but every larger buffer is mapped afresh: up to a third of the CPU
time in system time).
"""
import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache

# glibc mmap thresholds compared by benchmarks/memory_scaling.py and benchmarks/unlearning_step.py
MMAP_THRESHOLDS = {"64KiB": 64 * 1024, "1MiB": 2**20, "32MiB": 32 * 2**20}
HEAP_POLICIES = ("heap+trim", "trim", "glibc", *MMAP_THRESHOLDS)  # heap+trim: the scripts' default
TRIM_EVERY = 16  # loss batches between two trims under the trimming policies
TRIM_EVERY_BATCHES = TRIM_EVERY  # this process's setting (configure_heap); 0: never


@lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def configure_heap(policy: str = "") -> str:
    """Set this process's heap policy: `policy`, else the environment's ABU_HEAP, else "heap+trim". Returns it.
    "heap+trim": every buffer on the heap (keep_buffers_on_heap), trimmed every TRIM_EVERY_BATCHES loss batches;
    "trim": glibc's own thresholds, trimmed alike; "glibc": untouched, never trimmed (the allocator the authors'
    code runs under); "64KiB" / "1MiB" / "32MiB": a fixed mmap threshold, never trimmed.
    Raises ValueError for another name."""
    global TRIM_EVERY_BATCHES
    policy = policy or os.environ.get("ABU_HEAP", "") or "heap+trim"
    if policy not in HEAP_POLICIES:
        raise ValueError(f"ABU_HEAP={policy!r}: choose one of {', '.join(HEAP_POLICIES)}")
    TRIM_EVERY_BATCHES = TRIM_EVERY if policy in ("trim", "heap+trim") else 0
    if policy in MMAP_THRESHOLDS:
        bound_heap_growth(MMAP_THRESHOLDS[policy])
    if policy == "heap+trim":
        keep_buffers_on_heap()
    return policy


def keep_buffers_on_heap(limit: int = 2**30) -> bool:
    """Serve every buffer up to `limit` bytes from glibc's heap and never shrink it on free (mallopt
    M_MMAP_THRESHOLD and M_TRIM_THRESHOLD): freed buffers are reused without fresh pages; only malloc_trim gives
    pages back. Linux/glibc only; elsewhere it does nothing and returns False."""
    libc = _libc()
    try:  # -3 = M_MMAP_THRESHOLD, -1 = M_TRIM_THRESHOLD
        return libc is not None and bool(libc.mallopt(-3, limit)) and bool(libc.mallopt(-1, limit))
    except AttributeError:
        return False


def trim_heap() -> bool:
    """Give the free pages of glibc's heap back to the system (malloc_trim(0)). Linux/glibc only; else False."""
    libc = _libc()
    try:
        return bool(libc.malloc_trim(0)) if libc is not None else False
    except AttributeError:
        return False


def after_loss_batch(batch: int) -> None:
    """Called after each loss batch: trims the heap after every TRIM_EVERY_BATCHES-th."""
    if TRIM_EVERY_BATCHES and batch % TRIM_EVERY_BATCHES == TRIM_EVERY_BATCHES - 1:
        trim_heap()


def bound_heap_growth(threshold: int = MMAP_THRESHOLDS["1MiB"]) -> bool:
    """Have glibc return every buffer larger than `threshold` to the system when freed (mallopt
    M_MMAP_THRESHOLD, which also stops glibc from adapting it). Measured by benchmarks/memory_scaling.py it keeps
    memory flat in the subset size, but each such buffer is then mapped afresh (page faults, system time).
    Linux/glibc only; elsewhere it does nothing and returns False."""
    libc = _libc()
    try:
        return bool(libc.mallopt(-3, threshold)) if libc is not None else False  # -3 = M_MMAP_THRESHOLD
    except AttributeError:
        return False
