"""Stage 1's loss cache and its contract: what made it is recorded, and checked before anyone subtracts from it.

A cache holds every candidate's loss before unlearning (utils/layout.py names the files). Stage 2 subtracts
its own losses from these, row by row, so both must come from the same noise, timesteps and kernels
(docs/method.md, section 3). `LossSettings` lists everything that changes those numbers, identifying the
base model, the customized model and the candidate arrays by fingerprints of their contents (a moved
folder keeps its caches; another model is refused). The path given as --sd_version is recorded for the
reader but not compared.
"""
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .errors import InputError
from .io import load_json, load_npy, save_json, save_npy
from .layout import EXEMPLAR_LATENTS, EXEMPLAR_LOSS, EXEMPLAR_LOSS_BY_T, LAION_LOSS, LAION_LOSS_BY_T, SETTINGS
from .losses import NOISE_GENERATOR_DEVICE, LossMeasurement, mean_over_timesteps
from .customization import customization_fingerprint
from .precision import kernel_device


@dataclass(frozen=True)
class LossSettings:
    """Everything that decides a candidate's noise, timesteps and loss; saved beside each cache."""

    batch_size: int
    time_samples: int
    seed: int
    laion_subset_size: int
    precision: str
    compiled: bool  # torch.compile changes the kernels, and so the last bits of every loss
    kernels: str  # the device kind the UNet ran on ("cpu", "cuda:NVIDIA A100-SXM4-80GB"), likewise
    base_model: str  # utils.fingerprints.model_fingerprint
    customized_model: str  # utils.customization.customization_fingerprint
    laion_arrays: str  # utils.data.LaionCandidates.fingerprint of the rows used
    model_path: str
    train_prompt: str
    n_exemplar_rows: int
    n_laion_rows: int
    noise_generator: str = NOISE_GENERATOR_DEVICE


def loss_settings(task, base, laion, dataroot, n_exemplar_rows: int, measurement: LossMeasurement) -> LossSettings:
    """What a model's cache is made with (stage 1), or must have been made with (stage 2): both stages build it
    here, from their own LossMeasurement."""
    m = measurement
    return LossSettings(
        batch_size=m.batch_size, time_samples=m.time_samples, seed=m.seed, laion_subset_size=laion.subset_size,
        precision=m.precision, compiled=bool(m.compiled), kernels=kernel_device(m.device), base_model=base.fingerprint,
        customized_model=customization_fingerprint(Path(dataroot) / task.model_path), laion_arrays=laion.fingerprint(),
        model_path=task.model_path, train_prompt=task.train_prompt, n_exemplar_rows=n_exemplar_rows,
        n_laion_rows=len(laion))


RECOMPUTE = "rerun compute_training_loss.py with --overwrite"
CACHE_FILES = (EXEMPLAR_LOSS, LAION_LOSS, EXEMPLAR_LOSS_BY_T, LAION_LOSS_BY_T, EXEMPLAR_LATENTS, SETTINGS)


def cache_is_complete(cache_dir) -> bool:
    """The settings file is written last, so its presence (with the others) marks a finished cache."""
    return all((Path(cache_dir) / f).is_file() for f in CACHE_FILES)


def save_loss_cache(cache_dir, exemplar_by_t, laion_by_t, exemplar_latents, settings: LossSettings,
                    sd_version: str) -> None:
    """Per-timestep losses [rows, T], their means (the losses stage 2 subtracts from), the exemplar latents,
    and last the settings."""
    cache_dir = Path(cache_dir)
    save_npy(cache_dir / EXEMPLAR_LOSS_BY_T, exemplar_by_t)
    save_npy(cache_dir / LAION_LOSS_BY_T, laion_by_t)
    save_npy(cache_dir / EXEMPLAR_LOSS, mean_over_timesteps(exemplar_by_t).numpy())
    save_npy(cache_dir / LAION_LOSS, mean_over_timesteps(laion_by_t).numpy())
    save_npy(cache_dir / EXEMPLAR_LATENTS, exemplar_latents)
    save_json(cache_dir / SETTINGS, {**asdict(settings), "sd_version": sd_version})  # last: marks it finished


def load_losses_by_timestep(cache_dir):
    """(exemplar, LAION) per-timestep losses [rows, T] of a finished cache (check it first)."""
    cache_dir = Path(cache_dir)
    return (load_npy(cache_dir / EXEMPLAR_LOSS_BY_T, "loss cache", remedy=RECOMPUTE),
            load_npy(cache_dir / LAION_LOSS_BY_T, "loss cache", remedy=RECOMPUTE))


RUN_STAGE_1 = "run compute_training_loss.py with the same task file first"  # what a missing cache asks for


def check_loss_cache(cache_dir, expected: LossSettings, remedy: str = RUN_STAGE_1) -> dict:
    """The cached settings, after checking that the cache is finished and made with `expected`; a missing cache is
    an InputError ending in `remedy`."""
    cache_dir = Path(cache_dir)
    if not cache_is_complete(cache_dir):
        if (cache_dir / SETTINGS).is_file():
            missing = [f for f in CACHE_FILES if not (cache_dir / f).is_file()]
            raise InputError(f"the loss cache in {cache_dir} lacks {', '.join(missing)} (made by an older version of "
                             f"this repo); rerun compute_training_loss.py with --overwrite")
        raise InputError(f"no finished pre-unlearning loss cache in {cache_dir}; {remedy}")
    cached = load_json(cache_dir / SETTINGS, "loss-cache settings")
    check_settings(cached, expected, cache_dir)
    return cached


def read_loss_cache(cache_dir, cached: dict):
    """(exemplar_loss, laion_loss, exemplar_latents) of a cache that `check_loss_cache` passed (its settings
    `cached`), after checking the arrays' row counts against them."""
    cache_dir = Path(cache_dir)
    exemplar_loss = load_npy(cache_dir / EXEMPLAR_LOSS, "loss cache", remedy=RECOMPUTE)
    laion_loss = load_npy(cache_dir / LAION_LOSS, "loss cache", remedy=RECOMPUTE)
    if len(exemplar_loss) != cached["n_exemplar_rows"] or len(laion_loss) != cached["n_laion_rows"]:
        raise InputError(f"{cache_dir}: loss arrays do not match the row counts in {SETTINGS}; "
                         f"rerun compute_training_loss.py with --overwrite")
    return exemplar_loss, laion_loss, torch.from_numpy(load_npy(cache_dir / EXEMPLAR_LATENTS, "loss cache",
                                                                remedy=RECOMPUTE))


def read_losses_at_timesteps(cache_dir, cached: dict, timestep_index):
    """(exemplar, LAION) losses [rows] of a cache that `check_loss_cache` passed, each row's mean over the chosen grid
    timesteps only (indices into its T), reduced as stage 2 reduces its own (`mean_over_timesteps`), after checking
    the per-timestep arrays' shapes against the settings."""
    ex_by_t, laion_by_t = load_losses_by_timestep(cache_dir)
    expected = ((cached["n_exemplar_rows"], cached["time_samples"]), (cached["n_laion_rows"], cached["time_samples"]))
    if (ex_by_t.shape, laion_by_t.shape) != expected:
        raise InputError(f"{cache_dir}: the per-timestep loss arrays have shapes {ex_by_t.shape} and "
                         f"{laion_by_t.shape}, not {expected[0]} and {expected[1]} as {SETTINGS} says; {RECOMPUTE}")
    return tuple(mean_over_timesteps(by_t[:, timestep_index]).numpy() for by_t in (ex_by_t, laion_by_t))


def cache_fingerprint(cache_dir) -> str:
    """Hash of a finished cache's settings and loss arrays: identifies the very losses a result subtracted from
    (a cache recomputed from the same inputs has the same one)."""
    import hashlib

    h = hashlib.sha256()
    for name in (SETTINGS, EXEMPLAR_LOSS, LAION_LOSS):
        h.update((Path(cache_dir) / name).read_bytes())
    return h.hexdigest()[:16]


def check_settings(cached: dict, expected: LossSettings, cache_dir) -> None:
    """Refuse to subtract losses made under other settings, naming each differing value."""
    diffs = [f"{f.name}: cache has {cached.get(f.name)!r}, this run uses {getattr(expected, f.name)!r}"
             for f in fields(LossSettings) if cached.get(f.name) != getattr(expected, f.name)]
    if diffs:
        raise InputError(
            f"the loss cache in {cache_dir} was made with other settings, so its losses cannot be subtracted "
            f"from this run's:\n  " + "\n  ".join(diffs) +
            "\nUse the flags compute_training_loss.py used (--loss_batch_size = --batch_size, --loss_time_samples = "
            "--time_samples, --seed, --laion_subset_size, --precision, --compile), the same base model, customized "
            "model and candidate arrays, on the same kind of device; or recompute the cache with "
            "compute_training_loss.py --overwrite.")
