"""Short hashes that identify a model by what it is, not where it lies (the loss cache records them)."""
import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Optional

import torch


def model_fingerprint(unet, vae, text_encoder, tokenizer, scheduler, samples_per_tensor: int = 64) -> str:
    """A short hash of what decides the losses: every weight tensor's name, shape and 64 evenly spaced values
    (first and last included), the noise schedule, the VAE scaling factor and the vocabulary.

    Milliseconds for SD v1.4 (about 1,100 tensors), and independent of the folder, the file format and
    the device; a fine-tuned or different model changes nearly every tensor, so sampling suffices.
    """
    h = hashlib.sha256()
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            k = min(samples_per_tensor, len(flat))  # integer spacing: float linspace rounds past the end
            index = torch.arange(k, dtype=torch.int64) * max(len(flat) - 1, 0) // max(k - 1, 1)
            h.update(f"{part}.{name}{tuple(tensor.shape)}".encode())
            h.update(flat[index].to("cpu", torch.float64).numpy().tobytes())
    schedule = {k: scheduler.config.get(k) for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                     "beta_schedule", "trained_betas", "prediction_type")}
    h.update(json.dumps(schedule, sort_keys=True, default=str).encode())
    h.update(repr(float(vae.config.scaling_factor)).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def files_fingerprint(paths) -> str:
    """Hash of the bytes of a few small files (a customized model: its K/V weights and <new1> embedding)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def file_fingerprint(path) -> Optional[str]:
    """files_fingerprint of one file, read once per path and process (a Fisher file: up to 0.5 GB); None when there
    is no such file (its loader names it), which changed_inputs holds against no result."""
    return _cached_fingerprint(str(path)) if Path(path).is_file() else None


@cache
def _cached_fingerprint(path: str) -> str:
    return files_fingerprint([path])


def changed_inputs(recorded: dict, current: dict) -> list:
    """'name: the result has <old>, now <new>' for each input fingerprint that differs (recorded beside a result by
    utils.attribution.input_provenance); an input not there now (a stage-1 cache deleted after use) is not held
    against the result, nor one its record predates (the Fisher file, recorded since December 2026)."""
    return [f"{k}: the result has {recorded.get(k)!r}, now {v!r}" for k, v in current.items()
            if v is not None and k in recorded and recorded[k] != v]
