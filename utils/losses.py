"""Per-candidate diffusion loss under seeded noise (docs/method.md, section 3).

The hot loop is `collect_losses`. A candidate's noise depends on the batch size B, the number of
timesteps T, the seed and its position, so the stage-1 cache records the settings that made it
(utils/loss_cache.py) and stage 2 refuses to subtract losses made under other ones.
"""
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .faults import checkpoint
from .batch_clock import batch_done
from .host_memory import after_loss_batch
from .errors import InputError
from .precision import autocast

NOISE_GENERATOR_DEVICE = "cpu"  # noise is drawn on the CPU, so the same settings give the same noise on any device


def validate_batch_plan(batch_size: int, time_samples: int, num_train_timesteps: int = 1000) -> None:
    if time_samples < 1 or batch_size < 1:
        raise InputError(f"batch size ({batch_size}) and time samples ({time_samples}) must be positive")
    if batch_size % time_samples:
        raise InputError(f"the loss batch size ({batch_size}) must be a multiple of the number of time "
                         f"samples ({time_samples}): each batch holds batch_size / time_samples candidates")
    if time_samples > num_train_timesteps:
        raise InputError(f"time samples ({time_samples}) exceed the scheduler's {num_train_timesteps} steps")


def batch_plan(scheduler, batch_size: int, time_samples: int):
    """(candidates per batch, the T-step timestep grid) of docs/method.md, section 3."""
    num_train_timesteps = scheduler.config.num_train_timesteps
    validate_batch_plan(batch_size, time_samples, num_train_timesteps)
    stride = num_train_timesteps // time_samples
    return batch_size // time_samples, torch.arange(0, num_train_timesteps, stride)[:time_samples]


def grid_timesteps_below(scheduler, batch_size: int, time_samples: int, below) -> np.ndarray:
    """Indices into the batch plan's T-step grid of its timesteps t < `below` (every index for None), [<= T]: what
    --influence_timesteps_below reads. At least index 0 (t = 0) for below >= 1."""
    _, step_grid = batch_plan(scheduler, batch_size, time_samples)
    return np.arange(time_samples) if below is None else np.flatnonzero(step_grid.numpy() < below)


def expanded_batch(candidates, b: int, per_batch: int, step_grid: torch.Tensor, seed: int):
    """Batch b of the batch plan, on the CPU: n candidates, each repeated T times (candidate-major) at the grid's
    timesteps, and the noise of the whole expanded batch from one generator seeded with seed + b.
    Returns (n, latents, text, timesteps, noise), each with n * T rows."""
    latents, text = candidates.batch(b * per_batch, (b + 1) * per_batch)
    n, time_samples = len(latents), len(step_grid)
    latents = latents.repeat_interleave(time_samples, dim=0)
    text = text.repeat_interleave(time_samples, dim=0)
    generator = torch.Generator(device=NOISE_GENERATOR_DEVICE).manual_seed(seed + b)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    return n, latents, text, step_grid.repeat(n), noise


def noised_batches(scheduler, candidates, batch_size: int = 200, time_samples: int = 10, seed: int = 0,
                   device="cpu", desc: str = "losses"):
    """Yield (n, latents, timesteps, text, noise) per batch, the clean latents that per_row_loss noises: the batch
    plan and seeded noise of docs/method.md, section 3.

    Batch b holds n = B / T candidates, each repeated T times (candidate-major) at the evenly spaced
    timesteps 0, s, 2s, ... (s = 1000 // T); its noise for the whole expanded batch comes from one
    generator seeded with seed + b.
    """
    per_batch, step_grid = batch_plan(scheduler, batch_size, time_samples)
    for b in tqdm(range(-(-len(candidates) // per_batch)), desc=desc, unit="batch", leave=False):
        n, latents, text, timesteps, noise = expanded_batch(candidates, b, per_batch, step_grid, seed)
        latents, noise, timesteps, text = latents.to(device), noise.to(device), timesteps.to(device), text.to(device)
        yield n, latents, timesteps, text, noise


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what a scheduler's prediction_type may name


def training_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet was trained to predict from `scheduler.add_noise(latents, noise, timesteps)`, by the scheduler's
    `prediction_type`, as diffusers' training scripts compute it: the noise (epsilon, SD 1.x), the velocity
    sqrt(a) * noise - sqrt(1 - a) * latents (v_prediction, SD 2.x; `scheduler.get_velocity`), or the clean latents
    (sample). Raises InputError for another type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise InputError(f"the base model's scheduler predicts {kind!r}; supported: {', '.join(PREDICTION_TYPES)}")


def per_row_loss(unet, scheduler, latents, noise, timesteps, text) -> torch.Tensor:
    """Each row's diffusion training loss: the MSE between the UNet's prediction on the noised latent and its
    training target (`training_target`), averaged over channels and pixels, in fp32. [rows]"""
    pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, text, return_dict=False)[0]
    target = training_target(scheduler, latents, noise, timesteps)
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def selected_rows(candidates, rows, timestep_index, per_batch: int, step_grid: torch.Tensor, seed: int,
                  chunk: int, desc: str = "losses"):
    """Yield (positions, latents, text, timesteps, noise) in chunks of `chunk` expanded rows: the chosen
    candidate rows at the chosen grid timesteps, each with exactly the noise the full batch plan gives it.
    `positions` index the flattened [len(rows), len(timestep_index)] output. With every row and timestep
    chosen and chunk = B, the chunks are the batch plan's batches, row for row."""
    time_samples = len(step_grid)
    buffers, taken = [], 0
    for b in tqdm(np.unique(rows // per_batch), desc=desc, unit="batch", leave=False):
        in_batch = np.arange(*np.searchsorted(rows, [b * per_batch, (b + 1) * per_batch]))  # rows are sorted
        _, latents, text, timesteps, noise = expanded_batch(candidates, int(b), per_batch, step_grid, seed)
        pick = torch.from_numpy(((rows[in_batch] - b * per_batch)[:, None] * time_samples
                                 + timestep_index[None, :]).reshape(-1))
        positions = (in_batch[:, None] * len(timestep_index) + np.arange(len(timestep_index))[None, :]).reshape(-1)
        buffers.append((torch.from_numpy(positions), latents[pick], text[pick], timesteps[pick], noise[pick]))
        taken += len(pick)
        while taken >= chunk:
            parts = [torch.cat(x) for x in zip(*buffers)]
            yield tuple(x[:chunk] for x in parts)
            buffers, taken = ([tuple(x[chunk:] for x in parts)], taken - chunk) if taken > chunk else ([], 0)
    if taken:
        yield tuple(torch.cat(x) for x in zip(*buffers))


@torch.no_grad()
def collect_losses(unet, scheduler, candidates, batch_size: int = 200, time_samples: int = 10, seed: int = 0,
                   device="cpu", desc: str = "losses", precision: str = "fp32", rows=None, timestep_index=None,
                   per_timestep: bool = False) -> np.ndarray:
    """Diffusion loss of candidate rows under the batch plan's seeded noise; the UNet runs at `precision`
    (utils.precision), the noise and the loss stay fp32.

    Default: every row's mean over the T timesteps, [rows]. `rows` / `timestep_index` restrict it to some
    candidate rows and some grid timesteps, each measured under the very noise the full pass gives it;
    `per_timestep` returns [rows, timesteps] instead of the mean (stage 1 keeps both).
    """
    per_batch, step_grid = batch_plan(scheduler, batch_size, time_samples)
    rows = np.arange(len(candidates)) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    timestep_index = np.arange(time_samples) if timestep_index is None else np.asarray(timestep_index)
    if len(rows) and (rows[0] < 0 or rows[-1] >= len(candidates)) or \
            len(timestep_index) and (timestep_index.min() < 0 or timestep_index.max() >= time_samples):
        raise ValueError(f"rows must lie in [0, {len(candidates)}) and timestep indices in [0, {time_samples})")
    out = torch.empty(len(rows) * len(timestep_index), dtype=torch.float32)
    chunks = selected_rows(candidates, rows, timestep_index, per_batch, step_grid, seed, batch_size, desc)
    started = time.perf_counter()
    for batch, (positions, latents, text, timesteps, noise) in enumerate(chunks):
        latents, text, timesteps, noise = (x.to(device) for x in (latents, text, timesteps, noise))
        with autocast(device, precision):
            loss = per_row_loss(unet, scheduler, latents, noise, timesteps, text)
        out[positions] = loss.cpu()
        started = batch_done(len(positions), started)
        after_loss_batch(batch)
        checkpoint("loss-batch")
    by_t = out.view(len(rows), len(timestep_index))
    return (by_t if per_timestep else mean_over_timesteps(by_t)).numpy()


def check_finite_losses(losses: np.ndarray, what: str, precision: str, remedy: str) -> None:
    """Refuse losses holding NaN or inf before anything is written: one error naming the rows (of `what`), the
    precision they were measured at and `remedy`. A non-finite loss cached as finished would make every
    influence of its model noise, and the next stage blame something else."""
    losses = np.asarray(losses)
    if not losses.size:
        return
    bad = np.flatnonzero(~np.isfinite(losses.reshape(len(losses), -1)).all(axis=1))
    if len(bad):
        raise InputError(f"{what}: {len(bad)} of {len(losses)} row(s) have a NaN or infinite loss (rows "
                         f"{bad[:8].tolist()}{' ...' if len(bad) > 8 else ''}) at --precision {precision}; {remedy}. "
                         f"Nothing was written for it")


def mean_over_timesteps(by_t) -> torch.Tensor:
    """[rows, T] -> [rows]: the one reduction both stages apply, so their means agree to the bit."""
    return torch.as_tensor(by_t, dtype=torch.float32).mean(dim=1)


@dataclass(frozen=True)
class LossMeasurement:
    """How a stage measures losses: the batch plan (B, T), the seed, the precision, compilation and the device.
    Stage 1 builds it from --batch_size / --time_samples, stage 2 from --loss_batch_size / --loss_time_samples
    (utils/settings.py); the loss cache records it (utils/loss_cache.py)."""

    batch_size: int
    time_samples: int
    seed: int
    precision: str
    compiled: bool
    device: str

    def collect(self, unet, scheduler, candidates, desc: str, **kw) -> np.ndarray:
        """`collect_losses` of `candidates` under this measurement (kw: rows, timestep_index, per_timestep)."""
        return collect_losses(unet, scheduler, candidates, batch_size=self.batch_size, time_samples=self.time_samples,
                              seed=self.seed, device=self.device, precision=self.precision, desc=desc, **kw)
