"""Stage 1: the diffusion loss of every training candidate under the customized model, before unlearning.

    python compute_training_loss.py --task_json tasks/demo_task.json

For each distinct model of the task file, writes <result_dir>/orig_loss/<model>/ with exemplar_loss.npy,
laion_loss.npy (each row's mean over the T timesteps), the same per timestep (*_loss_by_t.npy),
exemplar_latents.npy (the VAE samples, reused by stage 2) and, last, settings.json: what made the losses
(utils/loss_cache.py). A finished cache is skipped, after checking it was made with this
run's settings; --overwrite recomputes it.
"""
import argparse
import time

import torch
from tqdm.auto import tqdm

from utils.cli import add_common_args, check_dataroot, run
from utils.data import ExemplarCandidates, LaionCandidates, load_exemplar_images
from utils.host_memory import bound_heap_growth
from utils.io import check_writable, claim, finished_since
from utils.layout import SETTINGS, ResultsLayout
from utils.loss_cache import cache_is_complete, check_loss_cache, loss_settings, save_loss_cache
from utils.losses import collect_losses, validate_batch_layout
from utils.models import (PristineWeights, apply_customization, check_candidates_fit, encode_images, encode_prompt,
                          load_base_model)
from utils.processes import process_share
from utils.speed import configure_unet, loss_tracker, resolve_precision
from utils.tasks import exemplar_paths, load_tasks, unique_models


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch_size", type=int, default=200,
                        help="loss batch size B (candidate-timestep pairs); must match stage 2's --loss_batch_size")
    parser.add_argument("--time_samples", type=int, default=10,
                        help="timesteps T per candidate; must match stage 2's --loss_time_samples")
    return parser.parse_args(argv)


def exemplar_candidates(base, dataroot, task, vae_batch_size: int, generator) -> ExemplarCandidates:
    """Exemplar latents (unflipped, then flipped), all captioned with the task's train_prompt."""
    images = load_exemplar_images(exemplar_paths(dataroot, task), base.resolution)
    latents = encode_images(base.vae, images, generator, batch_size=vae_batch_size)
    text = encode_prompt(base.tokenizer, base.text_encoder, task.train_prompt)
    return ExemplarCandidates(latents, text.cpu())


def main(argv=None):
    args = parse_args(argv)
    args.precision = resolve_precision(args.precision, args.device)  # 'auto' -> the device's; recorded resolved
    bound_heap_growth()  # host memory that follows the batch size, not the number of candidates
    validate_batch_layout(args.batch_size, args.time_samples)
    dataroot = check_dataroot(args.dataroot)
    check_writable(args.result_dir)
    layout = ResultsLayout(args.result_dir)
    models = unique_models(load_tasks(args.task_json))
    laion = LaionCandidates(dataroot, args.laion_subset_size)
    todo = [t for t in models if args.overwrite or not cache_is_complete(layout.loss_cache(t))]
    todo_here, device, rank, world = process_share(todo, args.device)
    print(f"{len(models)} model(s) in {args.task_json}; {len(models) - len(todo)} already cached, {len(todo)} to do"
          + (f"; process {rank} of {world} takes {len(todo_here)}" if world > 1 else ""))
    base = load_base_model(args.sd_version, device)
    check_candidates_fit(base, laion.latents.shape, laion.text_embeddings.shape[-1], dataroot)

    def settings_of(task, n_exemplar_rows):
        return loss_settings(task, base, laion, dataroot, n_exemplar_rows, batch_size=args.batch_size,
                             time_samples=args.time_samples, seed=args.seed, precision=args.precision,
                             compiled=args.compile, device=device)

    for task in models:  # a finished cache made with other settings is an error here, not at stage 2
        if task not in todo:
            check_loss_cache(layout.loss_cache(task), settings_of(task, 2 * len(exemplar_paths(dataroot, task))))
    if not todo_here:
        return
    configure_unet(base.unet, device, args.precision)
    tracker = loss_tracker(base.unet, args.compile)
    pristine = PristineWeights(base.unet)
    started = time.time()
    for task in tqdm(todo_here, desc="models", unit="model"):
        with claim(layout.cache_claim(task), f"the loss cache of {task.model_path}") as mine:
            cache = layout.loss_cache(task)  # finished, or with --overwrite finished by a sibling during this run
            done = cache_is_complete(cache) and finished_since(cache / SETTINGS, started, args.overwrite)
            if mine and not done:
                cache_model(args, task, base, tracker, pristine, laion, dataroot, layout, device, settings_of)


def cache_model(args, task, base, tracker, pristine, laion, dataroot, layout, device, settings_of) -> None:
    """Customize the base model as `task`'s model, measure its exemplars' and the LAION rows' losses, save."""
    loaded = apply_customization(base, pristine, dataroot / task.model_path)
    generator = torch.Generator().manual_seed(args.seed)
    exemplars = exemplar_candidates(base, dataroot, task, args.vae_batch_size, generator)
    collect = dict(batch_size=args.batch_size, time_samples=args.time_samples, seed=args.seed, device=device,
                   precision=args.precision, per_timestep=True)
    exemplar_by_t = collect_losses(tracker, base.scheduler, exemplars, desc="exemplar losses", **collect)
    laion_by_t = collect_losses(tracker, base.scheduler, laion, desc="LAION losses", **collect)
    cache_dir = layout.loss_cache(task)
    save_loss_cache(cache_dir, exemplar_by_t, laion_by_t, exemplars.latents.numpy(),
                    settings_of(task, len(exemplars)), args.sd_version)
    tqdm.write(f"{task.model_path}: {len(loaded)} customized tensors, {len(exemplars) // 2} exemplars, "
               f"mean loss exemplar {exemplar_by_t.mean():.4f} / LAION {laion_by_t.mean():.4f} -> {cache_dir}")


if __name__ == "__main__":
    run(main)
