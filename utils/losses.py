"""Per-candidate diffusion loss under seeded noise (docs/method.md, section 3).

The hot loop is `collect_losses`. A candidate's noise depends on the batch size B, the number of
timesteps T, the seed and its position, so the stage-1 cache records the settings that made it
(utils/loss_cache.py) and stage 2 refuses to subtract losses made under other ones.
"""
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .io import InputError
from .speed import autocast

NOISE_GENERATOR_DEVICE = "cpu"  # noise is drawn on the CPU, so the same settings give the same noise on any device


def validate_batch_layout(batch_size: int, time_samples: int, num_train_timesteps: int = 1000) -> None:
    if time_samples < 1 or batch_size < 1:
        raise InputError(f"batch size ({batch_size}) and time samples ({time_samples}) must be positive")
    if batch_size % time_samples:
        raise InputError(f"the loss batch size ({batch_size}) must be a multiple of the number of time "
                         f"samples ({time_samples}): each batch holds batch_size / time_samples candidates")
    if time_samples > num_train_timesteps:
        raise InputError(f"time samples ({time_samples}) exceed the scheduler's {num_train_timesteps} steps")


def noised_batches(scheduler, candidates, batch_size: int = 200, time_samples: int = 10, seed: int = 0,
                   device="cpu", desc: str = "losses"):
    """Yield (n, noisy, timesteps, text, noise) per batch: the layout and seeded noise of docs/method.md, section 3.

    Batch b holds n = B / T candidates, each repeated T times (candidate-major) at the evenly spaced
    timesteps 0, s, 2s, ... (s = 1000 // T); its noise for the whole expanded batch comes from one
    generator seeded with seed + b.
    """
    num_train_timesteps = scheduler.config.num_train_timesteps
    validate_batch_layout(batch_size, time_samples, num_train_timesteps)
    per_batch = batch_size // time_samples
    stride = num_train_timesteps // time_samples
    step_grid = torch.arange(0, num_train_timesteps, stride)[:time_samples]
    starts = range(0, len(candidates), per_batch)
    for b, start in enumerate(tqdm(starts, desc=desc, unit="batch", leave=False)):
        latents, text = candidates.batch(start, start + per_batch)
        n = len(latents)
        latents = latents.repeat_interleave(time_samples, dim=0)
        text = text.repeat_interleave(time_samples, dim=0).to(device)
        timesteps = step_grid.repeat(n)
        generator = torch.Generator(device=NOISE_GENERATOR_DEVICE).manual_seed(seed + b)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
        yield n, scheduler.add_noise(latents, noise, timesteps), timesteps, text, noise


def per_row_loss(unet, noisy, timesteps, text, noise) -> torch.Tensor:
    """Each expanded row's MSE between the predicted and the true noise."""
    pred = unet(noisy, timesteps, text, return_dict=False)[0]
    return F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))


@torch.no_grad()
def collect_losses(unet, scheduler, candidates, batch_size: int = 200, time_samples: int = 10,
                   seed: int = 0, device="cpu", desc: str = "losses", precision: str = "fp32") -> np.ndarray:
    """Mean diffusion loss of every candidate row over the T timesteps of `noised_batches`; the UNet runs
    at `precision` (utils.speed), the noise and the loss stay fp32."""
    losses = []
    for n, noisy, timesteps, text, noise in noised_batches(scheduler, candidates, batch_size, time_samples, seed,
                                                           device, desc):
        with autocast(device, precision):
            loss = per_row_loss(unet, noisy, timesteps, text, noise)
        losses.append(loss.view(n, time_samples).mean(dim=1).cpu())
    return torch.cat(losses).numpy().astype(np.float32)
