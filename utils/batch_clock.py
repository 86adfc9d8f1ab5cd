"""Timestamps of loss-tracking batches, for timing the CLIs themselves in steady state (benchmarks/cli_timing.py).

With ABU_BATCH_TIMES=<file> set, every batch of `collect_losses` appends "<seconds> <forwards>" to it: a
monotonic clock (time.perf_counter) taken once the batch's losses are on the CPU (on CUDA, after its kernels),
and the UNet forwards the batch ran. A run's steady-state rate is then read inside one process, after its warm-up
(cuDNN's algorithm search, torch.compile's compilation), without a run long enough to repay that warm-up. Without
the variable it is one environment lookup per batch and nothing else.
"""
import os
import time
from pathlib import Path
from typing import Tuple

ENV = "ABU_BATCH_TIMES"


def batch_done(forwards: int) -> None:
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{time.perf_counter():.6f} {forwards}\n")


def steady_rate(path: Path, warmup: int = 5) -> Tuple[float, int]:
    """(forwards per second over the batches after the first `warmup`, how many batches that is) from a file
    `batch_done` wrote: the forwards of batches warmup+1.. (0-based) over the time from the end of batch `warmup` to the end of
    the last. (nan, 0) when the file holds `warmup` + 1 batches or fewer, or does not exist."""
    path = Path(path)
    rows = [line.split() for line in path.read_text().splitlines()] if path.is_file() else []
    if len(rows) <= warmup + 1:
        return float("nan"), 0
    times, forwards = [float(r[0]) for r in rows], [int(r[1]) for r in rows]
    return sum(forwards[warmup + 1:]) / (times[-1] - times[warmup]), len(rows) - warmup - 1
