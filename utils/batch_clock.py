"""Timestamps of loss-tracking batches, for timing the CLIs themselves in steady state (benchmarks/cli_timing.py).

With ABU_BATCH_TIMES=<file> set, every batch of `collect_losses` appends "<end> <seconds> <forwards>" to it: the
monotonic clock (time.perf_counter) once the batch's losses are on the CPU (on CUDA, after its kernels), the time
since the previous batch of the same pass ended (or the pass began: preparing the batch included, the gaps between
passes, such as unlearning, left out) and the UNet forwards the batch ran. A run's steady-state rate is then read
inside one process, after its warm-up (cuDNN's algorithm search, torch.compile's compilation), without a run long
enough to repay that warm-up. Without the variable it costs a clock read and an environment lookup per batch.
"""
import os
import time
from pathlib import Path
from typing import Tuple

ENV = "ABU_BATCH_TIMES"


def batch_done(forwards: int, since: float) -> float:
    """Record a batch of `forwards` that began at `since` (perf_counter seconds); returns now, the next one's start."""
    now = time.perf_counter()
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{now:.6f} {now - since:.6f} {forwards}\n")
    return now


def steady_rate(path: Path, warmup: int = 5) -> Tuple[float, int]:
    """(forwards per second over the batches after the first `warmup`, how many batches that is) from a file
    `batch_done` wrote: their forwards over their summed durations. (nan, 0) when the file holds `warmup` batches or
    fewer, or does not exist."""
    path = Path(path)
    rows = [line.split() for line in path.read_text().splitlines()] if path.is_file() else []
    if len(rows) <= warmup:
        return float("nan"), 0
    later = rows[warmup:]
    return sum(int(r[2]) for r in later) / sum(float(r[1]) for r in later), len(later)
