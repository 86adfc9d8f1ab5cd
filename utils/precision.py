"""Precision and compilation of the UNet in both stages: autocast precision, TF32, channels-last, torch.compile.

fp32 keeps the authors' numerics: no autocast and PyTorch's default matmul precision; `auto` (the
default) is bf16 on CUDA and fp32 on the CPU.
bf16 / fp16 autocast the UNet's forward pass (diffusers attention runs through PyTorch's SDPA either
way); on CUDA the fp32 matmuls that remain use TF32 and the UNet runs channels-last. The noise, the
timesteps and the loss reduction (in fp32) are the same under every precision, and the loss cache
records the precision, so stage 2 refuses to subtract losses measured at another one.
"""
import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
# --precision auto: the fastest precision that passed the agreement gate on mini-AbC (docs/performance.md).
# On an H100 bf16 tracks losses 3.3x faster than fp32; on a CPU it gains about 12% in loss tracking but
# unlearns 40% slower, so fp32 stays the CPU default
AUTO_PRECISION = {"cuda": "bf16", "cpu": "fp32"}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 unlearning: the loss is multiplied by this before backward and the step divided by it (same update,
# no underflow of small activation gradients); a static scale is enough for 25-100 steps of one image
FP16_LOSS_SCALE = 1024.0


def device_type(device) -> str:
    return torch.device(device).type


def available_devices() -> list:
    """The devices this torch can run on: 'cpu', then 'cuda:<i>' per visible GPU and 'mps' where present."""
    out = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    return out + (["mps"] if mps is not None and mps.is_available() else [])


def check_device(device, flag: str = "--device") -> str:
    """The device string, checked before any work: raises InputError naming the flag, the device that is not there
    and the ones that are (a CPU-only torch, a GPU index past the last one, a misspelt name), instead of a
    traceback when the first tensor moves there."""
    from .errors import InputError

    available = available_devices()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"{flag} {device!r} is not a torch device ({e}); available here: {', '.join(available)}") \
            from None
    if parsed.type == "cuda":
        index = parsed.index or 0
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"{flag} {device}: {why} (torch {torch.__version__}); available here: "
                             f"{', '.join(available)}. Pass {flag} cpu, or install a CUDA build of torch on a GPU "
                             "machine")
        if index >= torch.cuda.device_count():
            raise InputError(f"{flag} {device}: there is no GPU {index}, only {torch.cuda.device_count()} visible; "
                             f"available here: {', '.join(available)}")
    elif parsed.type != "cpu" and str(parsed.type) not in {d.split(":")[0] for d in available}:
        raise InputError(f"{flag} {device}: no {parsed.type} device in this torch; available here: "
                         f"{', '.join(available)}")
    return device


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


def loss_unet(unet: torch.nn.Module, compile_unet: bool) -> torch.nn.Module:
    """The module that measures losses: `torch.compile`d when asked. It shares the UNet's parameters, so
    customization and unlearning (in place, on the eager UNet) are seen by it."""
    return torch.compile(unet) if compile_unet else unet


def kernel_device(device) -> str:
    """The kind of device that computes: "cpu", or "cuda:<GPU name>". Another kind runs other kernels, which
    change the last bits of every loss, so the loss cache records it (utils/loss_cache.py)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type
