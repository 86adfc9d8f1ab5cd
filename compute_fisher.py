"""Diagonal empirical Fisher of the base model over the LAION candidates, in the `sd_fisher.pt` format.

F_p = mean over samples of (d loss_sample / d p)^2, where each sample is a LAION row (unflipped or
flipped) with one random timestep and fresh noise from a per-sample seeded CPU generator. The paper
used 1,000,000 samples over the 100K subset. For nn.Linear parameters (the cross-attention K/V that
unlearning updates) per-sample gradients come from activation and output-gradient hooks, a whole
batch at once; any other selected parameter falls back to one sample per backward pass.
Progress is checkpointed to <output>.partial so a killed run resumes where it stopped.
"""
import argparse
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from tqdm.auto import tqdm

from unlearn import WEIGHT_SELECTIONS, select_parameter_names
from utils.cli import check_dataroot, run
from utils.data import LaionCandidates
from utils.io import InputError, save_json, save_torch
from utils.losses import per_row_loss
from utils.models import load_base_model
from utils.per_sample_grads import PerSampleLinearGrads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataroot", default="data/abc", help="folder with laion_latents.npy and laion_text_embeddings.npy")
    p.add_argument("--sd_version", default="CompVis/stable-diffusion-v1-4", help="base model (Hub id or folder)")
    p.add_argument("--output", default=None, help="Fisher file to write (default: <dataroot>/sd_fisher.pt)")
    p.add_argument("--laion_subset_size", type=int, default=100_000, help="LAION images sampled from (with flips)")
    p.add_argument("--num_samples", type=int, default=1_000_000, help="per-sample gradients to average")
    p.add_argument("--batch_size", type=int, default=16, help="samples per backward pass (Linear-only selections)")
    p.add_argument("--weight_selection", default="cross-attn-kv", choices=list(WEIGHT_SELECTIONS),
                   help="parameters to estimate the Fisher of (those that unlearning will update)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sample order, timesteps and noise")
    p.add_argument("--save_every", type=int, default=10_000, help="checkpoint interval, in samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--overwrite", action="store_true", help="recompute even if the output exists")
    return p.parse_args(argv)


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


def per_sample_losses(base, latents, text, timesteps, noise, device):
    latents, text, timesteps, noise = (t.to(device) for t in (latents, text, timesteps, noise))
    return per_row_loss(base.unet, base.scheduler.add_noise(latents, noise, timesteps), timesteps, text, noise)


def estimate_fisher(base, laion: LaionCandidates, names: List[str], num_samples: int, batch_size: int, seed: int,
                    device, state=None, on_checkpoint=None, save_every: int = 10_000,
                    per_sample_hooks: bool = True) -> Dict[str, torch.Tensor]:
    """Mean squared per-sample gradient of each named parameter; `state` resumes from a checkpoint
    that `on_checkpoint` wrote."""
    params = dict(base.unet.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(laion))  # each row once per pass; later passes repeat this order
    hooked = per_sample_hooks and PerSampleLinearGrads.covers(base.unet, names)
    batch = batch_size if hooked else 1
    done = 0
    sums = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    if state is not None:
        done, sums = state["done"], {n: state["sums"][n].to(device) for n in names}
    bar = tqdm(total=num_samples, initial=done, desc="Fisher", unit="sample")
    next_save = done + save_every
    while done < num_samples:
        stop = min(done + batch, num_samples)
        inputs = sample_batch(laion, order, done, stop, seed, base.scheduler.config.num_train_timesteps)
        if hooked:
            tracker = PerSampleLinearGrads(base.unet, names)
            per_sample_losses(base, *inputs, device).sum().backward()
            tracker.remove()
            for n in names:
                sums[n] += tracker.grads[n].pow(2).sum(0)
        else:
            per_sample_losses(base, *inputs, device).sum().backward()
            for n in names:
                sums[n] += params[n].grad.double().pow(2)
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
    return {n: (sums[n] / num_samples).float().cpu() for n in names}


def main(argv=None):
    args = parse_args(argv)
    dataroot = check_dataroot(args.dataroot)
    output = Path(args.output or dataroot / "sd_fisher.pt")
    if output.exists() and not args.overwrite:
        print(f"{output} exists; pass --overwrite to recompute")
        return
    if args.num_samples < 1 or args.batch_size < 1:
        raise InputError("--num_samples and --batch_size must be positive")
    laion = LaionCandidates(dataroot, args.laion_subset_size)
    base = load_base_model(args.sd_version, args.device)
    names = select_parameter_names(base.unet, args.weight_selection)
    settings = {k: v for k, v in vars(args).items() if k not in ("overwrite", "device", "save_every", "output")}
    checkpoint = output.with_name(output.name + ".partial")
    state = None
    if checkpoint.exists() and not args.overwrite:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state.get("settings") != settings:
            raise InputError(f"{checkpoint} was made with other settings ({state.get('settings')}); "
                             f"delete it or pass --overwrite")
        print(f"resuming from {checkpoint} at {state['done']} samples")
    fisher = estimate_fisher(base, laion, names, args.num_samples, args.batch_size, args.seed, args.device,
                             state=state, on_checkpoint=lambda st: save_torch(checkpoint, {**st, "settings": settings}),
                             save_every=args.save_every)
    save_torch(output, fisher)
    save_json(output.with_suffix(".json"), settings)
    if checkpoint.exists():
        checkpoint.unlink()
    zeros = sum(int((f == 0).sum()) for f in fisher.values())
    print(f"wrote {output}: {len(fisher)} tensors, {sum(f.numel() for f in fisher.values())} entries "
          f"({zeros} zero), settings in {output.with_suffix('.json')}")


if __name__ == "__main__":
    run(main)
