"""Attribution baselines that need no unlearning, written in compute_influence.py's output format.

    python compute_baselines.py --method vae --task_json ... --result_dir results/mini_abc/vae_cosine

random: a seeded random score per candidate (the chance level of every metric).
pixel: cosine similarity of the query's pixels and each candidate's, at the model's resolution.
vae: cosine similarity of VAE latents; the query's latent is its VAE posterior mean, the candidates'
     are the cached stage-1 exemplar latents and the LAION latents (so run compute_training_loss.py first).
Candidates, flip folding (max of a candidate's two rows) and ranking are as in compute_influence.py.
"""
import argparse
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from compute_influence import INFLUENCE_FILE
from utils.cli import check_dataroot, run
from utils.data import LaionCandidates, load_exemplar_images
from utils.io import InputError, save_pickle
from utils.metrics import fold_flips
from utils.models import load_base_model
from utils.tasks import exemplar_paths, load_tasks
from utils.transforms import load_image_tensor
from utils.visualize import laion_image_paths

METHODS = ("random", "pixel", "vae")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--task_json", required=True)
    p.add_argument("--result_dir", required=True, help="this method's own results folder")
    p.add_argument("--loss_cache_dir", default=None, help="stage-1 caches (for the vae method's exemplar latents); "
                                                         "default <result_dir>/orig_loss")
    p.add_argument("--sd_version", default="CompVis/stable-diffusion-v1-4")
    p.add_argument("--dataroot", default="data/abc")
    p.add_argument("--laion_subset_size", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
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


def main(argv=None):
    args = parse_args(argv)
    dataroot = check_dataroot(args.dataroot)
    tasks = load_tasks(args.task_json)
    laion = LaionCandidates(dataroot, args.laion_subset_size)
    cache_root = Path(args.loss_cache_dir or Path(args.result_dir) / "orig_loss")
    base = load_base_model(args.sd_version, "cpu") if args.method != "random" else None
    rows = laion_rows(laion, args.method, dataroot, base.resolution) if base is not None else None
    start = time.time()
    for task in tqdm(tasks, desc=args.method, unit="query"):
        out = Path(args.result_dir) / "influence" / task.query_key / INFLUENCE_FILE
        if out.is_file() and not args.overwrite:
            continue
        n_ex = len(exemplar_paths(dataroot, task))
        if args.method == "random":
            rng = np.random.default_rng([args.seed, zlib.crc32(task.synth_image_path.encode())])
            influence = rng.random(n_ex + laion.subset_size)
        else:
            if args.method == "pixel":
                query = load_image_tensor(dataroot / task.synth_image_path, base.resolution)
                ex_rows = load_exemplar_images(exemplar_paths(dataroot, task), base.resolution)
            else:
                cache = cache_root / task.model_key / "exemplar_latents.npy"
                if not cache.is_file():
                    raise InputError(f"{cache} not found: run compute_training_loss.py first (--loss_cache_dir)")
                ex_rows = torch.from_numpy(np.load(cache))
                image = load_image_tensor(dataroot / task.synth_image_path, base.resolution).unsqueeze(0)
                with torch.no_grad():
                    query = base.vae.encode(image).latent_dist.mean[0] * base.vae.config.scaling_factor
            influence = np.concatenate([fold_flips(cosine_to_rows(query, ex_rows)),
                                        fold_flips(cosine_to_rows(query, rows))])
        rank = np.argsort(-influence, kind="stable")
        save_pickle(out, {"influence": influence, "rank": rank, "n_exemplar": n_ex, "method": args.method,
                          "task": asdict(task)})
    print(f"{args.method}: {len(tasks)} queries in {time.time() - start:.1f} s -> {args.result_dir}/influence")


if __name__ == "__main__":
    run(main)
