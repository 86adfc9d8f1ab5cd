"""The fast path of both stages: autocast precision, TF32, channels-last, torch.compile, and sharding
queries or models over the processes of `accelerate launch`.

fp32 keeps the authors' numerics: no autocast and PyTorch's default matmul precision; `auto` (the
default) is bf16 on CUDA and fp32 on the CPU.
bf16 / fp16 autocast the UNet's forward pass (diffusers attention runs through PyTorch's SDPA either
way); on CUDA the fp32 matmuls that remain use TF32 and the UNet runs channels-last. The noise, the
timesteps and the loss reduction (in fp32) are the same under every precision, and the loss cache
records the precision, so stage 2 refuses to subtract losses measured at another one.
"""
import contextlib
import ctypes
import ctypes.util
import sys
from typing import List, Sequence, Tuple

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
# --precision auto: the fastest precision that passed the agreement gate on mini-AbC (README, Performance);
# bf16 is 3.3x fp32 on an H100, and slower than fp32 on a CPU, so fp32 stays the CPU default
AUTO_PRECISION = {"cuda": "bf16", "cpu": "fp32"}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 unlearning: the loss is multiplied by this before backward and the step divided by it (same update,
# no underflow of small activation gradients); a static scale is enough for 25-100 steps of one image
FP16_LOSS_SCALE = 1024.0


def device_type(device) -> str:
    return torch.device(device).type


def resolve_precision(precision: str, device) -> str:
    """'auto' -> the device type's default (AUTO_PRECISION, fp32 elsewhere); anything else unchanged."""
    return AUTO_PRECISION.get(device_type(device), "fp32") if precision == "auto" else precision


def autocast(device, precision: str):
    """Context in which the UNet runs at `precision` (nothing changes for fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=AUTOCAST_DTYPES[precision])


def configure_unet(unet: torch.nn.Module, device, precision: str) -> None:
    """TF32 for the fp32 matmuls left under autocast, and channels-last, on CUDA and only off fp32."""
    if device_type(device) != "cuda" or precision == "fp32":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    unet.to(memory_format=torch.channels_last)


def loss_tracker(unet: torch.nn.Module, compile_unet: bool) -> torch.nn.Module:
    """The module that measures losses: `torch.compile`d when asked. It shares the UNet's parameters, so
    customization and unlearning (in place, on the eager UNet) are seen by it."""
    return torch.compile(unet) if compile_unet else unet


def process_share(items: Sequence, device: str) -> Tuple[List, str, int, int]:
    """(this process's items, its device, its index, the process count).

    Under `accelerate launch` (or torchrun) every process takes every num_processes-th item starting at
    its own index, on its own GPU; a plain run takes everything. Items are independent and seeded, so
    each output equals a single-process run's, and a rerun after a crash finishes whatever is missing.
    """
    from accelerate import PartialState

    state = PartialState(cpu=device_type(device) == "cpu")
    if state.num_processes > 1 and device_type(device) == "cuda":
        device = str(state.device)
    return list(items)[state.process_index::state.num_processes], device, state.process_index, state.num_processes


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
