"""Stage 2: unlearn each synthesized query, re-measure the candidates' losses, rank them by loss increase.

    python compute_influence.py --task_json tasks/demo_task.json

For each query of the task file, writes <result_dir>/influence/<synth path without 'synth/'>/ with
exemplar_loss.npy and laion_loss.npy (after unlearning), visualization.jpg (query + top 10) and, last,
influence.pkl (influence, rank, n_exemplar, query_loss, settings). Needs stage 1's cache of the query's
model, made with the same settings (checked for every query before the first one is unlearned).
"""
import argparse
from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from unlearn import LAION_400M, unlearn
from utils.cli import add_common_args, check_dataroot, run
from utils.data import ExemplarCandidates, LaionCandidates
from utils.fisher import load_fisher
from utils.host_memory import bound_heap_growth
from utils.io import InputError, save_npy, save_pickle
from utils.layout import EXEMPLAR_LOSS, LAION_LOSS, VISUALIZATION, ResultsLayout
from utils.loss_cache import check_loss_cache, load_loss_cache, loss_settings
from utils.losses import collect_losses, validate_batch_layout
from utils.metrics import influence_and_rank
from utils.models import (CONCEPT_TOKEN, WEIGHT_SELECTIONS, PristineWeights, apply_customization,
                          check_candidates_fit, encode_images, encode_prompt, load_base_model, select_parameter_names)
from utils.processes import process_share
from utils.speed import configure_unet, loss_tracker, resolve_precision
from utils.tasks import exemplar_paths, load_tasks
from utils.transforms import load_image_tensor
from utils.visualize import laion_image_paths, save_top_k_figure


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--fisher_path", default=None, help="diagonal Fisher file (default: <dataroot>/sd_fisher.pt)")
    parser.add_argument("--fisher_floor", type=float, default=None,
                        help="clamp Fisher entries to at least this value (default: zero entries are an error)")
    parser.add_argument("--fisher_dataset_size", type=int, default=LAION_400M,
                        help="N in the update lr * grad / (F * N): the pretraining-set size (LAION-400M)")
    parser.add_argument("--weight_selection", default="cross-attn-kv", choices=list(WEIGHT_SELECTIONS),
                        help="which UNet parameters unlearning updates")
    parser.add_argument("--unlearn_lr", type=float, default=0.1, help="unlearning step size")
    parser.add_argument("--unlearn_steps", type=int, default=100, help="number of unlearning steps")
    parser.add_argument("--unlearn_batch_size", type=int, default=16, help="query copies per micro-batch")
    parser.add_argument("--unlearn_grad_accum_steps", type=int, default=10, help="micro-batches per step")
    parser.add_argument("--loss_batch_size", type=int, default=200, help="must equal stage 1's --batch_size")
    parser.add_argument("--loss_time_samples", type=int, default=10, help="must equal stage 1's --time_samples")
    parser.add_argument("--loss_cache_dir", default=None,
                        help="stage-1 caches to subtract from (default: <result_dir>/orig_loss); lets several "
                             "variants, each with its own --result_dir, share one stage 1")
    parser.add_argument("--preconditioner", default="fisher", choices=["fisher", "none"],
                        help="'none' is the paper's plain-gradient-ascent ablation: p += lr * grad / accum")
    parser.add_argument("--drop_concept_token", action="store_true",
                        help="ablation: unlearn the query under its prompt with '<new1>' removed")
    parser.add_argument("--unscaled_synth_latent", action="store_true",
                        help="reproduce the authors' release: unlearn the query's VAE latent WITHOUT the "
                             "scaling factor (default: scaled, like every training candidate)")
    return parser.parse_args(argv)


def query_inputs(base, dataroot, task, args, generator):
    """The query's latent repeated unlearn_batch_size times, and its prompt's text embedding likewise."""
    image = load_image_tensor(dataroot / task.synth_image_path, base.resolution).unsqueeze(0)
    latent = encode_images(base.vae, image, generator, scale=not args.unscaled_synth_latent).to(args.device)
    prompt = task.prompt
    if args.drop_concept_token:
        prompt = " ".join(prompt.replace(CONCEPT_TOKEN, " ").split())
    text = encode_prompt(base.tokenizer, base.text_encoder, prompt)
    n = args.unlearn_batch_size
    return latent.expand(n, -1, -1, -1).contiguous(), text.expand(n, -1, -1).contiguous()


def expected_settings(args, base, laion, dataroot, task, n_exemplars: int):
    """The settings stage 1 must have used for this query's model (utils/loss_cache.py)."""
    return loss_settings(task, base, laion, dataroot, 2 * n_exemplars, batch_size=args.loss_batch_size,
                         time_samples=args.loss_time_samples, seed=args.seed, precision=args.precision,
                         compiled=args.compile, device=args.device)


def preflight(args, dataroot, todo, laion, base, layout):
    """Check every query's image and loss cache before hours of unlearning, not at query 37.
    Returns {model_path: its exemplar paths}."""
    checked = {}
    for task in todo:
        if not (dataroot / task.synth_image_path).is_file():
            raise InputError(f"query image not found: {dataroot / task.synth_image_path} (from {args.task_json})")
        if task.model_path not in checked:
            ex_paths = exemplar_paths(dataroot, task)
            check_loss_cache(layout.loss_cache(task), expected_settings(args, base, laion, dataroot, task, len(ex_paths)))
            checked[task.model_path] = ex_paths
    return checked


def unlearning_setup(args, base, dataroot):
    """The parameters unlearning moves, their preconditioner F and the N of p += lr * grad / (F * N) / accum."""
    names = set(select_parameter_names(base.unet, args.weight_selection))
    params = {n: p for n, p in base.unet.named_parameters() if n in names}
    if args.preconditioner == "none":  # F = 1, N = 1: the step is lr * grad / accum
        return params, {n: torch.ones_like(p, dtype=torch.float64) for n, p in params.items()}, 1
    fisher = load_fisher(args.fisher_path or dataroot / "sd_fisher.pt", params, args.fisher_floor, args.device)
    return params, fisher, args.fisher_dataset_size


def main(argv=None):
    args = parse_args(argv)
    args.precision = resolve_precision(args.precision, args.device)  # 'auto' -> the device's; recorded resolved
    bound_heap_growth()  # host memory that follows the batch size, not the number of candidates
    validate_batch_layout(args.loss_batch_size, args.loss_time_samples)
    dataroot = check_dataroot(args.dataroot)
    layout = ResultsLayout(args.result_dir, args.loss_cache_dir)
    tasks = load_tasks(args.task_json)
    todo = [t for t in tasks if args.overwrite or not layout.influence_file(t).is_file()]
    n_todo = len(todo)
    todo, args.device, rank, world = process_share(todo, args.device)
    print(f"{len(tasks)} query(ies) in {args.task_json}; {len(tasks) - n_todo} done, {n_todo} to do"
          + (f"; process {rank} of {world} takes {len(todo)}" if world > 1 else ""))
    if not todo:
        return
    laion = LaionCandidates(dataroot, args.laion_subset_size)
    base = load_base_model(args.sd_version, args.device)
    check_candidates_fit(base, laion.latents.shape, laion.text_embeddings.shape[-1], dataroot)
    exemplars_of = preflight(args, dataroot, todo, laion, base, layout)
    configure_unet(base.unet, args.device, args.precision)
    tracker = loss_tracker(base.unet, args.compile)  # measures losses; unlearning runs the eager UNet
    pristine = PristineWeights(base.unet)
    params, fisher, dataset_size = unlearning_setup(args, base, dataroot)
    laion_paths = laion_image_paths(dataroot)
    for task in tqdm(todo, desc="queries", unit="query"):
        attribute_query(args, task, base, tracker, pristine, params, fisher, dataset_size, laion, dataroot,
                        exemplars_of[task.model_path], laion_paths, layout)


def attribute_query(args, task, base, tracker, pristine, params, fisher, dataset_size, laion, dataroot, ex_paths,
                    laion_paths, layout) -> None:
    """Customize, unlearn the query, re-measure every candidate, rank, and write the query's outputs."""
    apply_customization(base, pristine, dataroot / task.model_path)
    ex_before, laion_before, ex_latents, _ = load_loss_cache(
        layout.loss_cache(task), expected_settings(args, base, laion, dataroot, task, len(ex_paths)))
    collect = dict(batch_size=args.loss_batch_size, time_samples=args.loss_time_samples, seed=args.seed,
                   device=args.device, precision=args.precision)
    generator = torch.Generator().manual_seed(args.seed)
    latents, text = query_inputs(base, dataroot, task, args, generator)
    query = ExemplarCandidates(latents[:1].cpu(), text[:1].cpu())  # the query's own loss, fixed noise
    query_before = collect_losses(tracker, base.scheduler, query, desc="query loss", **collect)
    pristine.protect(params)
    history = unlearn(base.unet, base.scheduler, latents, text, params, fisher, steps=args.unlearn_steps,
                      grad_accum_steps=args.unlearn_grad_accum_steps, lr=args.unlearn_lr,
                      dataset_size=dataset_size, generator=generator, precision=args.precision)

    query_after = collect_losses(tracker, base.scheduler, query, desc="query loss", **collect)
    exemplars = ExemplarCandidates(ex_latents, encode_prompt(base.tokenizer, base.text_encoder,
                                                             task.train_prompt).cpu())
    ex_after = collect_losses(tracker, base.scheduler, exemplars, desc="exemplar losses", **collect)
    laion_after = collect_losses(tracker, base.scheduler, laion, desc="LAION losses", **collect)
    pristine.restore()
    if not (np.isfinite(ex_after).all() and np.isfinite(laion_after).all()):
        raise InputError(f"{task.synth_image_path}: losses after unlearning are not finite; the step is too "
                         f"large (lower --unlearn_lr) or the Fisher has tiny entries (--fisher_floor)")
    influence, rank = influence_and_rank(ex_before, ex_after, laion_before, laion_after)

    out_dir = layout.query_dir(task)
    save_npy(out_dir / EXEMPLAR_LOSS, ex_after)
    save_npy(out_dir / LAION_LOSS, laion_after)
    save_top_k_figure(out_dir / VISUALIZATION, dataroot / task.synth_image_path, influence, rank,
                      ex_paths, laion_paths)
    run_settings = {k: v for k, v in vars(args).items() if k not in ("overwrite", "device")}
    save_pickle(layout.influence_file(task), {  # written last: its presence marks a finished query
        "influence": influence, "rank": rank, "n_exemplar": len(ex_paths),
        "query_loss": (float(query_before[0]), float(query_after[0])),
        "unlearn_loss_history": np.asarray(history), "settings": run_settings, "task": asdict(task)})
    ranks = sorted(int(i) + 1 for i in np.flatnonzero(rank < len(ex_paths)))
    tqdm.write(f"{task.synth_image_path}: query loss {query_before[0]:.4f} -> {query_after[0]:.4f}; "
               f"exemplars at ranks {ranks} of {len(rank)} -> {out_dir}")


if __name__ == "__main__":
    run(main)
