"""Attribution baselines that need no unlearning, written in compute_influence.py's output format.

    python compute_baselines.py --method vae --task_json ... --result_dir results/mini_abc/vae_cosine

random: a seeded random score per candidate (the chance level of every metric).
pixel: cosine similarity of the query's pixels and each candidate's, at the model's resolution.
vae: cosine similarity of VAE latents; the query's latent is its VAE posterior mean, the candidates'
     are the cached stage-1 exemplar latents and the LAION latents (so run compute_training_loss.py first).
gradient: gradient similarity in the spirit of TRAK / D-TRAK, on the weights AbU unlearns. For the
     customized model, each candidate's gradient of its stage-1 loss (the same T timesteps and seeded noise
     as the cache, read from its settings.json) w.r.t. the cross-attention K/V weights, and the query's
     likewise under its prompt; score = cosine of the two after whitening by the diagonal Fisher
     (g / sqrt(F)), i.e. g_q^T F^-1 g_i normalized. No unlearning, one backward pass per candidate batch.
Candidates, flip folding (max of a candidate's two rows) and ranking (ties against the exemplars) are as in
compute_influence.py.
"""
import argparse
import time
import zlib
from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from utils.cli import check_dataroot, run
from utils.data import ExemplarCandidates, LaionCandidates, load_exemplar_images
from utils.fisher import load_fisher
from utils.io import InputError, load_json, save_pickle
from utils.layout import EXEMPLAR_LATENTS, SETTINGS, ResultsLayout
from utils.losses import noised_batches, per_row_loss
from utils.metrics import fold_flips, rank_candidates
from utils.models import (PristineWeights, apply_customization, encode_images, encode_prompt, load_base_model,
                          select_parameter_names)
from utils.per_sample_grads import PerSampleLinearGrads
from utils.tasks import exemplar_paths, load_tasks, tasks_by_model
from utils.transforms import load_image_tensor
from utils.visualize import laion_image_paths

METHODS = ("random", "pixel", "vae", "gradient")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--task_json", required=True)
    p.add_argument("--result_dir", required=True, help="this method's own results folder")
    p.add_argument("--loss_cache_dir", default=None,
                   help="stage-1 caches (default <result_dir>/orig_loss); vae reads their exemplar latents, gradient "
                        "their settings (B, T, seed: the same noise as the cache) and exemplar latents")
    p.add_argument("--sd_version", default="CompVis/stable-diffusion-v1-4")
    p.add_argument("--dataroot", default="data/abc")
    p.add_argument("--laion_subset_size", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fisher_path", default=None, help="gradient: diagonal Fisher (default: <dataroot>/sd_fisher.pt)")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def cosine_to_rows(query: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
    q = query.reshape(1, -1).double()
    r = rows.reshape(len(rows), -1).double()
    return torch.nn.functional.cosine_similarity(q, r).numpy()


def laion_rows(laion: LaionCandidates, kind: str, dataroot, resolution: int) -> torch.Tensor:
    """All 2S LAION rows as latents, or as pixels (unflipped images, then flipped), in candidate order."""
    if kind == "vae":
        return torch.cat([laion.batch(s, s + 1024)[0] for s in range(0, len(laion), 1024)])
    paths = laion_image_paths(dataroot)[:laion.subset_size]
    return load_exemplar_images(paths, resolution)


def whitened_unit_gradients(base, names, inv_sqrt_fisher, candidates, settings, desc,
                            first_batch: int = 0) -> torch.Tensor:
    """[rows, P]: each candidate row's gradient of its mean loss over the cache's T timesteps w.r.t. the
    `names` weights, divided by sqrt(F) and scaled to unit length. `candidates` starting at batch
    `first_batch` of the cache's layout get the cache's noise (batch b is seeded with seed + b)."""
    out = []
    params = dict(base.unet.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    try:
        batches = noised_batches(base.scheduler, candidates, settings["batch_size"], settings["time_samples"],
                                 settings["seed"] + first_batch, desc=desc)
        for n, noisy, timesteps, text, noise in batches:
            tracker = PerSampleLinearGrads(base.unet, names, dtype=torch.float32)
            with torch.enable_grad():
                # sum over rows: each row's gradient is then its own; mean over a candidate's T rows below
                per_row_loss(base.unet, noisy, timesteps, text, noise).sum().backward()
            tracker.remove()
            g = tracker.flat().view(n, settings["time_samples"], -1).mean(1) * inv_sqrt_fisher
            out.append(torch.nn.functional.normalize(g.double(), dim=1).float())
            for n_ in names:
                params[n_].grad = None
    finally:
        for n in names:
            params[n].requires_grad_(False)
    return torch.cat(out)


def gradient_influences(args, tasks, dataroot, laion, layout: ResultsLayout) -> dict:
    """{query key: influence over exemplars + LAION}, one pass over the candidates per model."""
    base = load_base_model(args.sd_version, "cpu")
    pristine = PristineWeights(base.unet)
    names = select_parameter_names(base.unet, "cross-attn-kv")  # the weights AbU unlearns
    params = {n: p for n, p in base.unet.named_parameters() if n in names}
    fisher = load_fisher(args.fisher_path or dataroot / "sd_fisher.pt", params)
    inv_sqrt_fisher = torch.cat([fisher[n].rsqrt().flatten() for n in names]).float()
    influences = {}
    for model_path, model_tasks in tasks_by_model(tasks).items():
        cache = layout.loss_cache(model_tasks[0])
        if not (cache / SETTINGS).is_file():
            raise InputError(f"{cache / SETTINGS} not found: run compute_training_loss.py first (--loss_cache_dir)")
        settings = load_json(cache / SETTINGS, "loss-cache settings")
        apply_customization(base, pristine, dataroot / model_path)
        queries = []
        for task in model_tasks:  # the query's latent is drawn as compute_influence.py draws it
            image = load_image_tensor(dataroot / task.synth_image_path, base.resolution).unsqueeze(0)
            latent = encode_images(base.vae, image, torch.Generator().manual_seed(settings["seed"]))
            queries.append(ExemplarCandidates(latent, encode_prompt(base.tokenizer, base.text_encoder, task.prompt)))
        q = torch.cat([whitened_unit_gradients(base, names, inv_sqrt_fisher, c, settings, "query gradient")
                       for c in queries])
        exemplars = ExemplarCandidates(torch.from_numpy(np.load(cache / EXEMPLAR_LATENTS)),
                                       encode_prompt(base.tokenizer, base.text_encoder, model_tasks[0].train_prompt))
        ex_grads = whitened_unit_gradients(base, names, inv_sqrt_fisher, exemplars, settings, "exemplar gradients")
        ex_scores = ex_grads @ q.T
        per_batch = settings["batch_size"] // settings["time_samples"]
        chunk = 50 * per_batch  # streamed: the [rows, P] gradients of all LAION rows are never held at once
        laion_scores = torch.cat([
            whitened_unit_gradients(base, names, inv_sqrt_fisher, _Slice(laion, s, s + chunk), settings,
                                    "LAION gradients", first_batch=s // per_batch) @ q.T
            for s in tqdm(range(0, len(laion), chunk), desc="LAION chunks", leave=False)])
        for j, task in enumerate(model_tasks):
            influences[task.query_key] = np.concatenate([fold_flips(ex_scores[:, j].double().numpy()),
                                                         fold_flips(laion_scores[:, j].double().numpy())])
        pristine.restore()
    return influences


class _Slice:
    """Rows start..stop-1 of a candidate set (same `batch` interface)."""

    def __init__(self, candidates, start: int, stop: int):
        self.candidates, self.start, self.stop = candidates, start, min(stop, len(candidates))

    def __len__(self) -> int:
        return self.stop - self.start

    def batch(self, start: int, stop: int):
        return self.candidates.batch(self.start + start, self.start + min(stop, len(self)))


def main(argv=None):
    args = parse_args(argv)
    dataroot = check_dataroot(args.dataroot)
    tasks = load_tasks(args.task_json)
    laion = LaionCandidates(dataroot, args.laion_subset_size)
    layout = ResultsLayout(args.result_dir, args.loss_cache_dir)
    todo = [t for t in tasks if args.overwrite or not layout.influence_file(t).is_file()]
    start = time.time()
    if args.method == "gradient":
        influences = gradient_influences(args, todo, dataroot, laion, layout)
    else:
        base = load_base_model(args.sd_version, "cpu") if args.method != "random" else None
        rows = laion_rows(laion, args.method, dataroot, base.resolution) if base is not None else None
    for task in tqdm(todo, desc=args.method, unit="query"):
        n_ex = len(exemplar_paths(dataroot, task))
        if args.method == "gradient":
            influence = influences[task.query_key]
        elif args.method == "random":
            rng = np.random.default_rng([args.seed, zlib.crc32(task.synth_image_path.encode())])
            influence = rng.random(n_ex + laion.subset_size)
        else:
            if args.method == "pixel":
                query = load_image_tensor(dataroot / task.synth_image_path, base.resolution)
                ex_rows = load_exemplar_images(exemplar_paths(dataroot, task), base.resolution)
            else:
                cache = layout.loss_cache(task) / EXEMPLAR_LATENTS
                if not cache.is_file():
                    raise InputError(f"{cache} not found: run compute_training_loss.py first (--loss_cache_dir)")
                ex_rows = torch.from_numpy(np.load(cache))
                image = load_image_tensor(dataroot / task.synth_image_path, base.resolution).unsqueeze(0)
                with torch.no_grad():
                    query = base.vae.encode(image).latent_dist.mean[0] * base.vae.config.scaling_factor
            influence = np.concatenate([fold_flips(cosine_to_rows(query, ex_rows)),
                                        fold_flips(cosine_to_rows(query, rows))])
        rank = rank_candidates(influence, n_ex)
        save_pickle(layout.influence_file(task), {"influence": influence, "rank": rank, "n_exemplar": n_ex,
                                             "method": args.method, "task": asdict(task)})
    print(f"{args.method}: {len(todo)} of {len(tasks)} queries in {time.time() - start:.1f} s "
          f"-> {args.result_dir}/influence")


if __name__ == "__main__":
    run(main)
