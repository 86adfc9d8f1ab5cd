"""Throughput of loss tracking and unlearning: the authors' recipe (fp32) beside faster settings.

Prints one line per setting: candidate-timestep forwards per second, peak GPU memory, and the
projected time of one query at the paper's scale (100K LAION x 2 flips x 10 timesteps = 2M forwards,
plus 100 unlearning steps of 10 x 16 forward+backward passes). Weights are random (speed does not
depend on them), so the sizes are exactly SD v1.4's without downloading it:

    python -m benchmarks.loss_tracking --model sd14 --device cuda     # on a GPU
    python -m benchmarks.loss_tracking --model mini --device cpu --settings authors,bf16,fp16,bf16-b400
                                                                      # the mini-AbC UNet on a CPU
    python -m benchmarks.loss_tracking --model tiny --device cpu      # anywhere, seconds

The settings run `collect_losses` / `unlearn` with their --precision (utils/precision.py); their agreement
with fp32 on real rankings is measured by benchmarks/precision_agreement.py (losses of a random UNet
are shown only as a sanity check of the numerics).
"""
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # one line per setting, no progress bars (set before tqdm loads)

import argparse
import time
from pathlib import Path

import numpy as np
import torch


from utils.unlearning import unlearn
from utils.losses import collect_losses
from utils.weights import select_parameter_names

QUERY_FORWARDS = 100_000 * 2 * 10
# name: (precision, loss batch size B, channels_last, TF32 matmuls, torch.compile); T = 10 throughout
SETTINGS = {
    "authors": ("fp32", 200, False, False, False),
    "tf32": ("fp32", 200, True, True, False),
    "bf16": ("bf16", 200, True, True, False),
    "bf16-b400": ("bf16", 400, True, True, False),
    "fp16": ("fp16", 200, True, True, False),
    "bf16-compile": ("bf16", 200, True, True, True),  # compiled loss tracking; unlearning stays eager
}


def build_unet(model: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if model == "mini":  # the trained mini-AbC UNet (data/mini_abc/sd-mini)
        sd = Path(__file__).resolve().parent.parent / "data" / "mini_abc" / "sd-mini"
        unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
        return unet.eval().requires_grad_(False), DDPMScheduler.from_pretrained(sd, subfolder="scheduler")
    if model == "sd14":  # UNet2DConditionModel's defaults are SD v1's layout; v1.4 adds these two
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    else:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=32, attention_head_dim=8)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return unet.eval().requires_grad_(False), scheduler


class RandomCandidates:
    """`n` candidates cycling through a small pool of random latents and text embeddings."""

    def __init__(self, n, latent_shape, text_shape, pool=64):
        g = torch.Generator().manual_seed(0)
        self.n = n
        self.latents = torch.randn(pool, *latent_shape, generator=g)
        self.text = torch.randn(pool, *text_shape, generator=g)
        if torch.cuda.is_available():
            self.latents, self.text = self.latents.pin_memory(), self.text.pin_memory()

    def __len__(self):
        return self.n

    def batch(self, start, stop):
        idx = torch.arange(start, min(stop, self.n)) % len(self.latents)
        return self.latents[idx], self.text[idx]


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def configure(unet, device, channels_last, tf32, compile_unet):
    """tf32=False keeps PyTorch's defaults (TF32 convolutions, full-fp32 matmuls), as the authors ran."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = True
    unet.to(device)
    unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if compile_unet:
        unet.forward = torch.compile(unet.forward)


def time_loss_tracking(unet, scheduler, device, precision, batch_size, time_samples, n_batches, shapes):
    per_batch = batch_size // time_samples
    warm = RandomCandidates(per_batch, *shapes)
    cands = RandomCandidates(per_batch * n_batches, *shapes)
    collect_losses(unet, scheduler, warm, batch_size, time_samples, device=device, precision=precision)  # warm-up
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    losses = collect_losses(unet, scheduler, cands, batch_size, time_samples, device=device, precision=precision)
    sync(device)
    seconds = time.perf_counter() - t0
    return len(cands) * time_samples / seconds, losses


def time_unlearning(unet, scheduler, device, precision, steps, shapes, batch=16, accum=10):
    names = select_parameter_names(unet, "cross-attn-kv")
    params = {n: p for n, p in unet.named_parameters() if n in names}
    fisher = {n: torch.full(p.shape, 1e-6, dtype=torch.float64, device=device) for n, p in params.items()}
    backup = {n: p.detach().clone() for n, p in params.items()}
    latents = torch.randn(batch, *shapes[0]).to(device)
    text = torch.randn(batch, *shapes[1]).to(device)
    run = dict(params=params, fisher=fisher, grad_accum_steps=accum, lr=1e-3, progress=False,
               generator=torch.Generator().manual_seed(0), precision=precision)
    unlearn(unet, scheduler, latents, text, steps=1, **run)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    unlearn(unet, scheduler, latents, text, steps=steps, **run)
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(backup[n])
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd14", "mini", "tiny"], default="sd14")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n_batches", type=int, default=4, help="timed loss batches per setting")
    p.add_argument("--unlearn_steps", type=int, default=2, help="timed unlearning steps per setting")
    p.add_argument("--settings", default="authors,tf32,bf16,bf16-b400,fp16,bf16-compile",
                   help="comma-separated subset of: " + ", ".join(SETTINGS))
    args = p.parse_args()
    unet, scheduler = build_unet(args.model)
    size = unet.config.sample_size
    shapes = ((4, size, size), (77, unet.config.cross_attention_dim))
    gpu = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu"
    print(f"model {args.model} ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M params), device {gpu}, "
          f"torch {torch.__version__}")
    print(f"{'setting':<12} {'fwd/s':>9} {'ratio':>6} {'mem GiB':>8} {'unlearn s/step':>15} "
          f"{'query: track h':>15} {'unlearn h':>10} {'max|dloss|':>11}")
    names = args.settings.split(",")
    base_rate, base_losses, base_batch = None, None, None
    for name in names:
        precision, batch_size, channels_last, tf32, compile_unet = SETTINGS[name]
        configure(unet, args.device, channels_last, tf32, compile_unet)
        n_batches = max(1, args.n_batches * 200 // batch_size)
        rate, losses = time_loss_tracking(unet, scheduler, args.device, precision, batch_size, 10, n_batches, shapes)
        mem = torch.cuda.max_memory_allocated() / 2**30 if gpu != "cpu" else float("nan")
        if compile_unet:  # keep the unlearning timing eager
            del unet.forward
        step = time_unlearning(unet, scheduler, args.device, precision, args.unlearn_steps, shapes)
        if base_rate is None:
            base_rate, base_losses, base_batch = rate, losses, batch_size
        n = min(len(losses), len(base_losses))
        # the same candidates get the same noise only when the batch plan matches the first setting's
        diff = np.abs(losses[:n] - base_losses[:n]).max() if batch_size == base_batch else float("nan")
        print(f"{name:<12} {rate:9.1f} {rate / base_rate:6.2f} {mem:8.1f} {step:15.2f} "
              f"{QUERY_FORWARDS / rate / 3600:15.2f} {step * 100 / 3600:10.2f} {diff:11.2e}", flush=True)


if __name__ == "__main__":
    main()
