"""Per-candidate diffusion loss under seeded noise, and the loss cache that stage 2 subtracts from.

The hot loop is `collect_losses`. A candidate's noise depends on the batch size B, the number of
timesteps T, the seed and its position (SPEC stage 1), so the cache stores the settings that made
it and `check_settings` refuses to compare losses made under other ones.
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .io import InputError, load_json, save_json, save_npy
from .speed import autocast

NOISE_GENERATOR_DEVICE = "cpu"  # noise is drawn on the CPU, so a cache is valid on any device


@dataclass(frozen=True)
class LossSettings:
    """Everything that decides a candidate's noise, timesteps and loss; saved beside each cache."""

    batch_size: int
    time_samples: int
    seed: int
    laion_subset_size: int
    precision: str
    sd_version: str
    model_path: str
    train_prompt: str
    n_exemplar_rows: int
    n_laion_rows: int
    noise_generator: str = NOISE_GENERATOR_DEVICE


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
    """Yield (n, noisy, timesteps, text, noise) per batch: SPEC stage 1's layout and seeded noise.

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


# ---------------------------------------------------------------- the stage-1 cache

EXEMPLAR_LOSS = "exemplar_loss.npy"
LAION_LOSS = "laion_loss.npy"
EXEMPLAR_LATENTS = "exemplar_latents.npy"
SETTINGS = "settings.json"


def cache_is_complete(cache_dir) -> bool:
    """The settings file is written last, so its presence marks a finished cache."""
    cache_dir = Path(cache_dir)
    return all((cache_dir / f).is_file() for f in (EXEMPLAR_LOSS, LAION_LOSS, EXEMPLAR_LATENTS, SETTINGS))


def save_loss_cache(cache_dir, exemplar_loss, laion_loss, exemplar_latents, settings: LossSettings) -> None:
    cache_dir = Path(cache_dir)
    save_npy(cache_dir / EXEMPLAR_LOSS, exemplar_loss)
    save_npy(cache_dir / LAION_LOSS, laion_loss)
    save_npy(cache_dir / EXEMPLAR_LATENTS, exemplar_latents)
    save_json(cache_dir / SETTINGS, asdict(settings))


def check_loss_cache(cache_dir, expected: LossSettings) -> dict:
    """The cached settings, after checking that the cache is finished and made with `expected`."""
    cache_dir = Path(cache_dir)
    if not cache_is_complete(cache_dir):
        raise InputError(f"no finished pre-unlearning loss cache in {cache_dir}; "
                         f"run compute_training_loss.py with the same task file first")
    cached = load_json(cache_dir / SETTINGS, "loss-cache settings")
    check_settings(cached, asdict(expected), cache_dir)
    return cached


def load_loss_cache(cache_dir, expected: LossSettings):
    """(exemplar_loss, laion_loss, exemplar_latents, settings dict) of a cache made with `expected`."""
    cache_dir = Path(cache_dir)
    cached = check_loss_cache(cache_dir, expected)
    exemplar_loss = np.load(cache_dir / EXEMPLAR_LOSS)
    laion_loss = np.load(cache_dir / LAION_LOSS)
    if len(exemplar_loss) != cached["n_exemplar_rows"] or len(laion_loss) != cached["n_laion_rows"]:
        raise InputError(f"{cache_dir}: loss arrays do not match the row counts in {SETTINGS}; "
                         f"rerun compute_training_loss.py with --overwrite")
    return exemplar_loss, laion_loss, torch.from_numpy(np.load(cache_dir / EXEMPLAR_LATENTS)), cached


def check_settings(cached: dict, requested: dict, cache_dir) -> None:
    """Refuse to subtract losses made under other settings, naming each differing value."""
    diffs = [f"{k}: cache has {cached.get(k)!r}, this run uses {v!r}"
             for k, v in requested.items() if cached.get(k) != v]
    if diffs:
        raise InputError(f"the loss cache in {cache_dir} was made with other settings, so its noise "
                         f"would not match this run's:\n  " + "\n  ".join(diffs) +
                         "\nUse the same flags as compute_training_loss.py (--loss_batch_size = --batch_size, "
                         "--loss_time_samples = --time_samples, --seed, --laion_subset_size, --sd_version), "
                         "or recompute the cache with compute_training_loss.py --overwrite.")
