"""Empirical Fisher of the base model over the LAION candidates: the diagonal, in the `sd_fisher.pt` format, or
K-FAC's factors with EK-FAC's eigenvalues (`--kind ekfac`, for unlearn.py / compute_influence.py's
--preconditioner ekfac and kfac).

    python compute_fisher.py --dataroot data/abc     # writes data/abc/sd_fisher.pt and sd_fisher.json
    python compute_fisher.py --dataroot data/abc --kind ekfac  # sd_ekfac.safetensors and sd_ekfac.json
    python compute_fisher.py --dataroot data/abc --kind ekfac --kfac_approx reduce  # sd_ekfac_reduce.safetensors

The diagonal is the mean squared per-sample gradient of the diffusion loss (one random timestep and fresh noise
per sample) for the parameters unlearning updates; the paper used 1,000,000 samples over the 100K subset
(docs/method.md, section 5). EK-FAC (utils.kfac) reads the same samples for the same --laion_subset_size,
--num_samples and --seed, twice (the factors, then the eigenvalues): about twice the diagonal's time.
Progress is checkpointed to <output>.partial: a killed run resumes there. The estimator is utils.fisher.write_fisher.
"""
import argparse
from pathlib import Path

import torch

from utils.cli import check_dataroot, run
from utils.data import LaionCandidates
from utils.fisher import FisherConfig, check_same_kind, write_fisher
from utils.errors import InputError
from utils.kfac import EKFAC_FILE, EKFAC_REDUCE_FILE, KFAC_APPROXIMATIONS
from utils.models import load_base_model
from utils.precision import check_device
from utils.weights import WEIGHT_SELECTIONS


def parse_args(argv=None):
    d = FisherConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataroot", default="data/abc", help="folder with laion_latents.npy and laion_text_embeddings.npy")
    p.add_argument("--sd_version", default="CompVis/stable-diffusion-v1-4", help="base model (Hub id or folder)")
    p.add_argument("--kind", default=d.kind, choices=["diagonal", "ekfac"],
                   help="the diagonal Fisher, or K-FAC's factors and EK-FAC's eigenvalues (Linear weights only)")
    p.add_argument("--kfac_approx", default=d.kfac_approx, choices=list(KFAC_APPROXIMATIONS),
                   help="--kind ekfac: K-FAC's factors over every token (expand), or over each sample's token mean "
                        "input and summed output gradient (reduce; Eschenhagen et al. 2023)")
    p.add_argument("--output", default=None, help="Fisher file to write (default: <dataroot>/sd_fisher.pt, with "
                                                  f"--kind ekfac <dataroot>/{EKFAC_FILE}, with --kfac_approx reduce "
                                                  f"<dataroot>/{EKFAC_REDUCE_FILE})")
    p.add_argument("--laion_subset_size", type=int, default=d.laion_subset_size,
                   help="LAION images sampled from (with flips)")
    p.add_argument("--num_samples", type=int, default=d.num_samples, help="per-sample gradients to average")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="samples per backward pass (Linear-only selections)")
    p.add_argument("--weight_selection", default=d.weight_selection, choices=list(WEIGHT_SELECTIONS),
                   help="parameters to estimate the Fisher of (those that unlearning will update)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the sample order, timesteps and noise")
    p.add_argument("--save_every", type=int, default=10_000, help="checkpoint interval, in samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--overwrite", action="store_true", help="recompute even if the output exists")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_device(args.device)
    if args.kind == "diagonal" and args.kfac_approx != "expand":
        raise InputError(f"--kfac_approx {args.kfac_approx} chooses K-FAC's factors, which --kind diagonal has none "
                         "of: add --kind ekfac, or drop --kfac_approx")
    dataroot = check_dataroot(args.dataroot)
    default = {"diagonal": "sd_fisher.pt", "expand": EKFAC_FILE, "reduce": EKFAC_REDUCE_FILE}
    output = Path(args.output or dataroot / default["diagonal" if args.kind == "diagonal" else args.kfac_approx])
    config = FisherConfig(laion_subset_size=args.laion_subset_size, num_samples=args.num_samples,
                          batch_size=args.batch_size, weight_selection=args.weight_selection, seed=args.seed,
                          kind=args.kind, kfac_approx=args.kfac_approx)
    if output.exists() and not args.overwrite:
        check_same_kind(output, config)  # a file of another kind is named, not kept as if it were this one
        print(f"{output} exists; pass --overwrite to recompute")
        return
    laion = LaionCandidates(dataroot, args.laion_subset_size)
    base = load_base_model(args.sd_version, args.device)
    write_fisher(base, laion, output, config, args.device, save_every=args.save_every, overwrite=args.overwrite)


if __name__ == "__main__":
    run(main)
