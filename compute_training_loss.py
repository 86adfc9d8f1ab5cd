"""Stage 1: the diffusion loss of every training candidate under the customized model, before unlearning.

For each distinct model of the task file, writes results/orig_loss/<model>/ with exemplar_loss.npy,
laion_loss.npy, exemplar_latents.npy (the VAE samples, reused by stage 2) and settings.json.
"""
import argparse

import torch
from tqdm.auto import tqdm

from utils.cli import add_common_args, check_dataroot, run
from utils.data import ExemplarCandidates, LaionCandidates, load_exemplar_images
from utils.io import InputError
from utils.losses import (LossSettings, cache_is_complete, check_loss_cache, collect_losses, save_loss_cache,
                          validate_batch_layout)
from utils.models import PristineWeights, apply_customization, encode_images, encode_prompt, load_base_model
from utils.speed import bound_heap_growth, configure_unet, loss_tracker, process_share, resolve_precision
from utils.tasks import exemplar_paths, load_tasks, unique_models


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch_size", type=int, default=200,
                        help="loss batch size B (candidate-timestep pairs); must match stage 2's --loss_batch_size")
    parser.add_argument("--time_samples", type=int, default=10,
                        help="timesteps T per candidate; must match stage 2's --loss_time_samples")
    return parser.parse_args(argv)


def check_shapes(base, laion: LaionCandidates) -> None:
    """The precomputed LAION arrays must fit the base model (a real-SD dataroot with a tiny model, say)."""
    cfg = base.unet.config
    want = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if tuple(laion.latents.shape[1:]) != want:
        raise InputError(f"LAION latents have shape {tuple(laion.latents.shape[1:])} per row, but --sd_version "
                         f"{base.sd_version} takes {want}: are --dataroot and --sd_version a pair?")
    if laion.text_embeddings.shape[-1] != cfg.cross_attention_dim:
        raise InputError(f"LAION text embeddings have width {laion.text_embeddings.shape[-1]}, the UNet "
                         f"cross-attention expects {cfg.cross_attention_dim}")


def exemplar_candidates(base, dataroot, task, args, generator) -> ExemplarCandidates:
    """Exemplar latents (unflipped, then flipped), all captioned with the task's train_prompt."""
    images = load_exemplar_images(exemplar_paths(dataroot, task), base.resolution)
    latents = encode_images(base.vae, images, generator, batch_size=args.vae_batch_size)
    text = encode_prompt(base.tokenizer, base.text_encoder, task.train_prompt)
    return ExemplarCandidates(latents, text.cpu())


def cache_settings(args, task, n_exemplar_rows: int, n_laion_rows: int, batch_size: int,
                   time_samples: int) -> LossSettings:
    """What a model's loss cache is made with (stage 1) and must have been made with (stage 2)."""
    return LossSettings(
        batch_size=batch_size, time_samples=time_samples, seed=args.seed,
        laion_subset_size=args.laion_subset_size, precision=args.precision, sd_version=args.sd_version,
        model_path=task.model_path, train_prompt=task.train_prompt,
        n_exemplar_rows=n_exemplar_rows, n_laion_rows=n_laion_rows)


def main(argv=None):
    args = parse_args(argv)
    args.precision = resolve_precision(args.precision, args.device)  # 'auto' -> the device's; recorded resolved
    bound_heap_growth()  # host memory that follows the batch size, not the number of candidates
    validate_batch_layout(args.batch_size, args.time_samples)
    dataroot = check_dataroot(args.dataroot)
    models = unique_models(load_tasks(args.task_json))
    laion = LaionCandidates(dataroot, args.laion_subset_size)
    todo = [t for t in models if args.overwrite or not cache_is_complete(f"{args.result_dir}/orig_loss/{t.model_key}")]
    for task in models:  # a finished cache made with other flags is an error here, not at stage 2
        if task not in todo:
            n_ex = len(exemplar_paths(dataroot, task))
            check_loss_cache(f"{args.result_dir}/orig_loss/{task.model_key}",
                             cache_settings(args, task, 2 * n_ex, len(laion), args.batch_size, args.time_samples))
    n_todo = len(todo)
    todo, device, rank, world = process_share(todo, args.device)
    print(f"{len(models)} model(s) in {args.task_json}; {len(models) - n_todo} already cached, {n_todo} to do"
          + (f"; process {rank} of {world} takes {len(todo)}" if world > 1 else ""))
    if not todo:
        return
    base = load_base_model(args.sd_version, device)
    check_shapes(base, laion)
    configure_unet(base.unet, device, args.precision)
    tracker = loss_tracker(base.unet, args.compile)
    pristine = PristineWeights(base.unet)
    for task in tqdm(todo, desc="models", unit="model"):
        cache_dir = f"{args.result_dir}/orig_loss/{task.model_key}"
        loaded = apply_customization(base, pristine, dataroot / task.model_path)
        generator = torch.Generator().manual_seed(args.seed)
        exemplars = exemplar_candidates(base, dataroot, task, args, generator)
        collect = dict(batch_size=args.batch_size, time_samples=args.time_samples, seed=args.seed, device=device,
                       precision=args.precision)
        exemplar_loss = collect_losses(tracker, base.scheduler, exemplars, desc="exemplar losses", **collect)
        laion_loss = collect_losses(tracker, base.scheduler, laion, desc="LAION losses", **collect)
        settings = cache_settings(args, task, len(exemplars), len(laion), args.batch_size, args.time_samples)
        save_loss_cache(cache_dir, exemplar_loss, laion_loss, exemplars.latents.numpy(), settings)
        tqdm.write(f"{task.model_path}: {len(loaded)} customized tensors, {len(exemplars) // 2} exemplars, "
                   f"mean loss exemplar {exemplar_loss.mean():.4f} / LAION {laion_loss.mean():.4f} -> {cache_dir}")


if __name__ == "__main__":
    run(main)
