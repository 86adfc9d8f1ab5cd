"""Seconds per unlearning step on the CPU, for each host allocator setting, beside a plain reference loop.

    python -m benchmarks.unlearning_step        # about 3 minutes on 2 cores

The fixture: a randomly initialized UNet with cross-attention at 16 x 16 latents (SD's block layout at a
tiny width), the authors' unlearning schedule per step (10 micro-batches of 16 copies of one query, fresh
noise and 16 distinct timesteps each), fp32, 2 threads. Each case runs in a fresh process (allocator
settings are per process): `utils.unlearning.unlearn` under glibc's default allocator and under fixed mmap thresholds
(utils.host_memory.bound_heap_growth), and a reference: the loop the authors' release runs (the same
gradients, a plain `p.add_` of the preconditioned step, no allocator setting), written here from its
description so the two can be timed on the same inputs. Prints the median seconds per step after a warm-up.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from utils.host_memory import MMAP_THRESHOLDS
ALLOCATORS = {"default": None, **MMAP_THRESHOLDS}  # default: glibc's own, no bound


def fixture(torch):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32).eval()
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g).expand(16, -1, -1, -1).contiguous()
    text = torch.randn(1, 77, 32, generator=g).expand(16, -1, -1).contiguous()
    return unet, scheduler, latents, text


def reference_steps(torch, unet, scheduler, latents, text, params, fisher, steps, accum, lr=0.1, n=400_000_000):
    """The authors' loop, as their release describes it: gradients of the selected weights accumulated over
    `accum` micro-batches, then p += lr * grad / (F * N) / accum in float64."""
    import torch.nn.functional as F

    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for p in params.values():
            p.grad = None
        for _ in range(accum):
            noise = torch.randn_like(latents)
            timesteps = torch.randperm(1000)[:len(latents)]
            pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, text, return_dict=False)[0]
            F.mse_loss(pred, noise).backward()
        with torch.no_grad():
            for name, p in params.items():
                p.add_(lr * p.grad.double() / (fisher[name] * n) / accum)
        times.append(time.perf_counter() - t0)
    return times


def child(case: str, steps: int) -> dict:
    import torch

    from utils.unlearning import unlearn
    from utils.host_memory import bound_heap_growth
    from utils.weights import select_parameter_names

    torch.set_num_threads(2)
    allocator = "default" if case == "reference" else case
    if ALLOCATORS[allocator] is not None:
        bound_heap_growth(ALLOCATORS[allocator])
    unet, scheduler, latents, text = fixture(torch)
    names = select_parameter_names(unet, "cross-attn-kv")
    params = {n: p for n, p in unet.named_parameters() if n in names}
    fisher = {n: torch.full_like(p, 1e-8, dtype=torch.float64) for n, p in params.items()}
    if case == "reference":
        times = reference_steps(torch, unet, scheduler, latents, text, params, fisher, steps + 1, 10)
    else:
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            unlearn(unet, scheduler, latents, text, params, fisher, steps=1, grad_accum_steps=10,
                    generator=torch.Generator().manual_seed(len(times)), progress=False)
            times.append(time.perf_counter() - t0)
    times = sorted(times[1:])  # the first step warms up
    return {"case": case, "median_s": times[len(times) // 2], "min_s": times[0], "steps": steps}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="reference,default,64KiB,1MiB,32MiB")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    print(f"{'case':<34} {'median s/step':>14} {'min s/step':>11}")
    for case in args.cases.split(","):
        out = subprocess.run([sys.executable, "-m", "benchmarks.unlearning_step", "--child", case, str(args.steps)], cwd=REPO, capture_output=True,
                             text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        label = "reference loop (authors' recipe)" if case == "reference" else f"unlearn(), allocator {case}"
        print(f"{label:<34} {r['median_s']:>14.3f} {r['min_s']:>11.3f}", flush=True)


if __name__ == "__main__":
    main()
