"""Unlearning a synthesized image: Fisher-preconditioned gradient ascent on its diffusion loss.

Each step accumulates the gradient of the query's loss over `grad_accum_steps` micro-batches, then
moves every selected parameter p UP it: p += lr * grad / (F_p * N) / grad_accum_steps, in float64.
That is a Newton step of max_theta L(z; theta) - (N / 2) sum F (theta - theta0)^2 (elastic weight
consolidation): forget z while staying close to the pretrained weights in the Fisher metric
(docs/method.md, section 4). Which parameters move is the caller's choice (utils.weights.WEIGHT_SELECTIONS).
"""
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.faults import checkpoint
from utils.losses import training_target
from utils.precision import FP16_LOSS_SCALE, autocast

LAION_400M = 400_000_000  # N, the pretraining-set size the authors hard-code


def query_diffusion_loss(unet, scheduler, latents, text, generator: torch.Generator,
                         precision: str = "fp32") -> torch.Tensor:
    """Loss of one micro-batch: fresh noise and distinct timesteps (a random permutation's first B), against the
    model's own training target (utils.losses.training_target)."""
    bs = latents.shape[0]
    num_train_timesteps = scheduler.config.num_train_timesteps
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
    timesteps = torch.randperm(num_train_timesteps, generator=generator)[:bs].to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with autocast(latents.device, precision):
        pred = unet(noisy, timesteps, text, return_dict=False)[0]
    return F.mse_loss(pred.float(), training_target(scheduler, latents, noise, timesteps).float())


@torch.no_grad()
def fisher_preconditioned_step(params: Dict[str, torch.nn.Parameter], fisher: Dict[str, torch.Tensor],
                               lr: float, dataset_size: int, grad_accum_steps: int) -> None:
    """p += lr * grad / (F_p * N) / grad_accum_steps, computed in float64, for each parameter with a gradient."""
    for name, p in params.items():
        if p.grad is None:
            continue
        update = lr * p.grad.double() / (fisher[name] * dataset_size) / grad_accum_steps
        p.add_(update.to(p.dtype))


def unlearn(unet, scheduler, latents: torch.Tensor, text: torch.Tensor, params: Dict[str, torch.nn.Parameter],
            fisher: Dict[str, torch.Tensor], steps: int = 100, grad_accum_steps: int = 10, lr: float = 0.1,
            dataset_size: int = LAION_400M, generator: torch.Generator = None, progress: bool = True,
            precision: str = "fp32", should_stop: Optional[Callable[[int], bool]] = None) -> List[float]:
    """Run the unlearning loop in place on `params` (the only parameters that get gradients).

    The UNet's forward runs at `precision` (utils.precision); the update stays float64. `should_stop(done)`, asked
    before each step with the number of steps done (0 before the first), ends the loop early when it returns
    True (a per-query stopping rule); the paper's schedule has none. Returns the mean query loss of each step
    taken, measured before that step's update: its length is the number of steps taken.
    """
    scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    trainable = set(params)
    for n, p in unet.named_parameters():
        p.requires_grad_(n in trainable)
    history = []
    try:
        for done in tqdm(range(steps), desc="unlearning", unit="step", disable=not progress, leave=False):
            if should_stop is not None and should_stop(done):
                break
            for p in params.values():
                p.grad = None
            total = 0.0
            for _ in range(grad_accum_steps):
                loss = query_diffusion_loss(unet, scheduler, latents, text, generator, precision)
                (loss * scale).backward()
                total += loss.item()
            fisher_preconditioned_step(params, fisher, lr / scale, dataset_size, grad_accum_steps)
            history.append(total / grad_accum_steps)
            checkpoint("unlearning-step")
    finally:
        for p in unet.parameters():
            p.grad = None
            p.requires_grad_(False)
    return history
