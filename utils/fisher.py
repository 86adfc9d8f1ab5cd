"""The diagonal Fisher (`sd_fisher.pt`: a dict UNet-parameter-name -> tensor of that parameter's shape):
estimating it (docs/method.md, section 5) and loading it for the unlearning step.

F_p = mean over samples of (d loss_sample / d p)^2, where each sample is a LAION row (unflipped or
flipped) with one random timestep and fresh noise from a per-sample seeded CPU generator. For nn.Linear
parameters (the cross-attention K/V that unlearning updates) per-sample gradients come from activation
and output-gradient hooks, a whole batch at once; any other selected parameter falls back to one sample
per backward pass. `write_fisher` checkpoints to <output>.partial, so a killed run resumes where it stopped.
"""
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import LaionCandidates
from .errors import InputError
from .io import damaged, load_json, load_tensors, save_json, save_safetensors, save_torch
from .losses import per_row_loss
from .models import BaseModel
from .weights import select_parameter_names
from .per_sample_grads import PerSampleLinearGrads


@dataclass
class FisherConfig:
    """How the Fisher is estimated; the defaults are the paper's (1M samples over the 100K subset)."""

    laion_subset_size: int = 100_000  # LAION images sampled from (with flips)
    num_samples: int = 1_000_000  # per-sample gradients averaged
    batch_size: int = 16  # samples per backward pass (Linear-only selections)
    weight_selection: str = "cross-attn-kv"  # the parameters unlearning will update
    seed: int = 0  # seeds the sample order, the timesteps and the noise
    kind: str = "diagonal"  # "diagonal" (sd_fisher.pt), or "ekfac": K-FAC's factors, EK-FAC's eigenvalues (utils.kfac)
    kfac_approx: str = "expand"  # ekfac: K-FAC-expand's factors, or "reduce" (utils.kfac)

    def record(self) -> dict:
        """The settings written beside the file: every field, but the factors' approximation only for EK-FAC (it
        means nothing to the diagonal)."""
        out = asdict(self)
        if self.kind != "ekfac":
            out.pop("kfac_approx")
        return out


def sample_batch(laion: LaionCandidates, order: np.ndarray, start: int, stop: int, seed: int,
                 num_train_timesteps: int):
    """Samples start..stop-1: sample i is row order[i mod 2S] with a timestep and noise drawn from its
    own generator, so the estimate does not depend on the batch size or on where a run resumed."""
    latents, text, timesteps, noise = [], [], [], []
    for i in range(start, stop):
        row = int(order[i % len(order)])
        lat, txt = laion.batch(row, row + 1)
        g = torch.Generator().manual_seed(seed * 2**32 + i)
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
        noise.append(torch.randn(lat.shape, generator=g, dtype=torch.float32))
        latents.append(lat)
        text.append(txt)
    return torch.cat(latents), torch.cat(text), torch.cat(timesteps), torch.cat(noise)


def per_sample_losses(base: BaseModel, latents, text, timesteps, noise, device):
    latents, text, timesteps, noise = (t.to(device) for t in (latents, text, timesteps, noise))
    return per_row_loss(base.unet, base.scheduler, latents, noise, timesteps, text)


def accumulate_over_samples(base: BaseModel, laion: LaionCandidates, names: List[str], num_samples: int,
                            batch_size: int, seed: int, device, add: Callable, sums: Dict[str, torch.Tensor],
                            hooks: Optional[Callable] = None, state=None, on_checkpoint: Optional[Callable] = None,
                            save_every: int = 10_000, desc: str = "Fisher") -> Dict[str, torch.Tensor]:
    """The sample loop every Fisher estimate shares (the diagonal here, EK-FAC's two passes in utils.kfac).

    Samples 0..num_samples-1 (sample_batch) go through the UNet `batch_size` at a time with gradients on `names`;
    `hooks(unet)` (a utils.per_sample_grads.PerSampleLinearGrads or subclass; None: one sample per backward, read
    from the parameters' .grad) is attached for the backward of their summed losses, then `add(sums, hooks, params)`
    adds the batch into `sums` (float64 tensors, updated in place and returned). `state` ({"done", "sums"}) resumes
    a checkpoint that `on_checkpoint` wrote every `save_every` samples.
    """
    params = dict(base.unet.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    order = np.random.default_rng(seed).permutation(len(laion))  # each row once per pass; later passes repeat it
    batch = batch_size if hooks is not None else 1
    done = 0
    if state is not None:
        done, sums = state["done"], {n: s.to(device) for n, s in state["sums"].items()}
    bar = tqdm(total=num_samples, initial=done, desc=desc, unit="sample")
    next_save = done + save_every
    while done < num_samples:
        stop = min(done + batch, num_samples)
        inputs = sample_batch(laion, order, done, stop, seed, base.scheduler.config.num_train_timesteps)
        tracker = hooks(base.unet) if hooks is not None else None
        per_sample_losses(base, *inputs, device).sum().backward()
        if tracker is not None:
            tracker.remove()
        add(sums, tracker, params)
        for p in params.values():
            p.grad = None
        bar.update(stop - done)
        done = stop
        if on_checkpoint is not None and done >= next_save and done < num_samples:
            on_checkpoint({"done": done, "sums": {n: s.cpu() for n, s in sums.items()}})
            next_save = done + save_every
    bar.close()
    for p in params.values():
        p.requires_grad_(False)
    return sums


def estimate_fisher(base: BaseModel, laion: LaionCandidates, names: List[str], num_samples: int, batch_size: int,
                    seed: int, device, state=None, on_checkpoint: Optional[Callable] = None, save_every: int = 10_000,
                    per_sample_hooks: bool = True) -> Dict[str, torch.Tensor]:
    """Mean squared per-sample gradient of each named parameter (float32 on the CPU, the parameter's shape);
    `state` resumes from a checkpoint that `on_checkpoint` wrote."""
    params = dict(base.unet.named_parameters())
    hooked = per_sample_hooks and PerSampleLinearGrads.covers(base.unet, names)

    def add(sums, tracker, params):
        for n in names:  # hooked: [B, *shape] per sample; else one sample's .grad
            sums[n] += tracker.grads[n].pow(2).sum(0) if tracker is not None else params[n].grad.double().pow(2)

    sums = {n: torch.zeros_like(params[n], dtype=torch.float64, device=device) for n in names}
    sums = accumulate_over_samples(base, laion, names, num_samples, batch_size, seed, device, add, sums,
                                   hooks=(lambda unet: PerSampleLinearGrads(unet, names)) if hooked else None,
                                   state=state, on_checkpoint=on_checkpoint, save_every=save_every)
    return {n: (sums[n] / num_samples).float().cpu() for n in names}


def check_same_kind(output: Path, config: FisherConfig) -> dict:
    """The record (<output>.json, {} when there is none) of a Fisher file that exists, after refusing one of another
    kind or K-FAC approximation than `config`'s: another estimate altogether, which is not replaced unasked."""
    record = Path(output).with_suffix(".json")
    made = load_json(record, "Fisher record") if record.is_file() else {}
    wanted = {k: config.record().get(k) for k in ("kind", "kfac_approx")}
    kind = made.get("kind")  # an EK-FAC record from before --kfac_approx is K-FAC-expand's
    held = {"kind": kind, "kfac_approx": made.get("kfac_approx", "expand" if kind == "ekfac" else None)}
    other = [f"{k} {held[k]!r}" for k in wanted if kind is not None and held[k] != wanted[k]]
    if other:
        raise InputError(f"{output} holds a Fisher of {' and '.join(other)} ({record}), not this run's: name another "
                         "--output, or pass --overwrite to replace it")
    return made


def write_fisher(base: BaseModel, laion: LaionCandidates, output, config: FisherConfig, device,
                 save_every: int = 10_000, overwrite: bool = False) -> Path:
    """Estimate the Fisher (`config.kind`: the diagonal as a torch file, or EK-FAC as safetensors) and write it to
    `output` (+ `.json` with its settings), resuming from `output.partial` when a killed run left one made with the
    same settings. Skips a finished output unless `overwrite`."""
    output = Path(output)
    # what decides the numbers: the settings, the base model and the candidate rows (not where they lie)
    settings = {**config.record(), "base_model": base.fingerprint, "laion_arrays": laion.fingerprint()}
    if output.exists() and not overwrite:
        record = output.with_suffix(".json")
        made = check_same_kind(output, config)
        stale = [k for k in ("base_model", "laion_arrays") if k in made and made[k] != settings[k]]
        if not stale:
            print(f"{output} exists; pass --overwrite to recompute")
            return output
        print(f"{output} was estimated for another {' and '.join(stale)} ({record}): estimating it again")
        overwrite = True
    if config.num_samples < 1 or config.batch_size < 1:
        raise InputError("--num_samples and --batch_size must be positive")
    names = select_parameter_names(base.unet, config.weight_selection)
    checkpoint = output.with_name(output.name + ".partial")
    state = None
    if checkpoint.exists() and not overwrite:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # our own checkpoint
        except Exception as e:  # a run killed mid-write by the OS, a full disk: the checkpoint is only a shortcut
            raise damaged(checkpoint, "Fisher checkpoint", e, "delete it (the estimate restarts from sample 0)") from e
        if state.get("settings") != settings:
            raise InputError(f"{checkpoint} was made with other settings ({state.get('settings')}); "
                             f"delete it or pass --overwrite")
        where = f" of pass {state['pass']}" if "pass" in state else ""  # EK-FAC passes over its samples twice
        print(f"resuming from {checkpoint} at {state['done']} samples{where}")
    if config.kind == "ekfac":
        from .kfac import estimate_ekfac  # utils.kfac builds on this module's sample loop
        estimate, save = estimate_ekfac, save_safetensors
    else:
        estimate, save = estimate_fisher, save_torch
    extra = {"approx": config.kfac_approx} if config.kind == "ekfac" else {}
    fisher = estimate(base, laion, names, config.num_samples, config.batch_size, config.seed, device,
                      state=state, save_every=save_every, **extra,
                      on_checkpoint=lambda st: save_torch(checkpoint, {**st, "settings": settings}))
    save(output, fisher)
    save_json(output.with_suffix(".json"), settings)
    if checkpoint.exists():
        checkpoint.unlink()
    zeros = sum(int((f == 0).sum()) for f in fisher.values())
    print(f"wrote {output}: {len(fisher)} tensors, {sum(f.numel() for f in fisher.values())} entries "
          f"({zeros} zero), settings in {output.with_suffix('.json')}")
    return output


def load_fisher(path, params: Dict[str, torch.Tensor], floor: Optional[float] = None,
                device="cpu") -> Dict[str, torch.Tensor]:
    """Fisher diagonals of exactly the parameters in `params`, as float64 on `device`.

    Names may carry a 'unet.' prefix. A selected parameter without an entry, with another shape, or
    with a zero / negative / non-finite entry is an error, since the update divides by it (docs/method.md, pitfall 5);
    `floor` instead raises every entry to at least that value.
    """
    table = load_fisher_table(path, "Fisher file", "download it with data/download_abc.sh or build it with "
                                                   "compute_fisher.py (--fisher_path)")
    missing = [n for n in params if n not in table]
    if missing:
        raise InputError(f"{path} has no Fisher entry for {len(missing)} of the {len(params)} selected "
                         f"parameter(s), e.g. {missing[0]!r}; rebuild it with compute_fisher.py "
                         f"using the same --weight_selection")
    out = {}
    for name, p in params.items():
        f = table[name]
        if tuple(f.shape) != tuple(p.shape):
            raise InputError(f"{path}: Fisher of {name} has shape {tuple(f.shape)}, the parameter {tuple(p.shape)}")
        out[name] = check_fisher_entries(f.to(device=device, dtype=torch.float64), path, f"Fisher of {name}", floor)
    return out


def load_fisher_table(path, what: str, remedy: str) -> Dict[str, torch.Tensor]:
    """A Fisher file (the diagonal's or utils.kfac's) as {name: tensor}, a 'unet.' prefix taken off the names; a
    missing or damaged file, or one that holds no dict, is an InputError naming `what` and `remedy`."""
    raw = load_tensors(path, what, remedy)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a dict of parameter name -> tensor, got {type(raw).__name__}; {remedy}")
    return {(k[len("unet."):] if k.startswith("unet.") else k): v for k, v in raw.items()}


def check_fisher_entries(f: torch.Tensor, path, what: str, floor: Optional[float] = None) -> torch.Tensor:
    """`f` (a Fisher diagonal or eigenvalues) raised to `floor` when given; otherwise InputError for a zero or
    negative entry, which the update divides by (docs/method.md, pitfall 5). Non-finite entries are always an
    InputError naming `path` and `what`."""
    if not torch.isfinite(f).all():
        raise InputError(f"{path}: {what} has non-finite entries")
    if floor is not None:
        return f.clamp(min=floor)
    if (f <= 0).any():
        n_bad = int((f <= 0).sum())
        raise InputError(f"{path}: {what} has {n_bad} zero or negative entr(y/ies), and the "
                         f"update divides by it; pass --fisher_floor (e.g. 1e-12) to clamp them")
    return f
