"""Host memory of long loss passes: keep the process's resident memory from growing with the number of
candidates, without page faults in the hot loops (docs/performance.md, section Memory).

The scripts leave glibc's allocator as it is (its heap serves the per-batch buffers again and again, with no
fresh pages) and trim the heap every TRIM_EVERY_BATCHES loss batches, so the free pages that fragmentation
leaves behind go back to the system instead of accumulating over a 100K-candidate pass. The earlier policy,
a fixed mmap threshold of 1 MiB, bounded memory too but mapped every larger buffer afresh each time: its page
faults cost up to a third of the CPU time in system time, depending on the model and batch sizes.
`ABU_HEAP=1MiB` or `ABU_HEAP=glibc` (no trimming) select the other policies, for the benchmarks that compare them;
`ABU_HEAP=heap+trim` also keeps every buffer on the heap (no mmap, no shrinking on free), trimmed as "trim" is:
less system time and faster on the CPU, but memory that grows somewhat with the subset size (docs/performance.md).
"""
import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache

# glibc mmap thresholds compared by benchmarks/memory_scaling.py and benchmarks/unlearning_step.py
MMAP_THRESHOLDS = {"64KiB": 64 * 1024, "1MiB": 2**20, "32MiB": 32 * 2**20}
HEAP_POLICIES = ("trim", "glibc", "heap+trim", *MMAP_THRESHOLDS)  # trim: the scripts' default
TRIM_EVERY = 16  # loss batches between two trims under the "trim" policy
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
    """Set this process's heap policy: `policy`, else the environment's ABU_HEAP, else "trim". Returns it.
    "trim": glibc's allocator, its heap trimmed every TRIM_EVERY_BATCHES loss batches; "glibc": untouched, never
    trimmed (the allocator the authors' code runs under); "heap+trim": every buffer on the heap
    (keep_buffers_on_heap), trimmed as "trim"; "64KiB" / "1MiB" / "32MiB": a fixed mmap threshold."""
    global TRIM_EVERY_BATCHES
    policy = policy or os.environ.get("ABU_HEAP", "") or "trim"
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
