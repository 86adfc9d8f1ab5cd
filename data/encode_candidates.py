"""Encode your own training candidates: a folder of images + a captions file -> the arrays both stages read.

    python -m data.encode_candidates --dataroot data/mine --sd_version CompVis/stable-diffusion-v1-4

reads <dataroot>/laion_subset/images/* (sorted by file name) and <dataroot>/laion_subset/captions.txt (line i
is the caption of image i), and writes <dataroot>/laion_latents.npy ([2N, 4, 64, 64] for SD v1.4: scaled
VAE latents, unflipped then flipped) and <dataroot>/laion_text_embeddings.npy ([N, 77, 768]), with the base
model's VAE and text encoder, batched, with a progress bar. A stopped run resumes where it stopped; finished
arrays are kept unless --overwrite. The same function (utils.candidate_arrays.encode_candidates) builds the
arrays of the tiny and mini-AbC benchmarks.
"""
import argparse
from pathlib import Path

import torch


from utils.candidate_arrays import encode_candidates
from utils.cli import run
from utils.models import load_base_model
from utils.precision import check_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataroot", required=True, help="benchmark folder; the arrays are written here")
    p.add_argument("--sd_version", default="CompVis/stable-diffusion-v1-4", help="base model (Hub id or folder)")
    p.add_argument("--images_dir", default=None, help="default <dataroot>/laion_subset/images")
    p.add_argument("--captions", default=None, help="default <dataroot>/laion_subset/captions.txt")
    p.add_argument("--batch_size", type=int, default=20, help="images per VAE batch (each also flipped)")
    p.add_argument("--seed", type=int, default=0, help="seeds the VAE posterior samples (row r: seed * 2**32 + r)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="remake finished arrays, or restart a stopped run")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_device(args.device)
    root = Path(args.dataroot)
    images_dir = Path(args.images_dir or root / "laion_subset" / "images")
    captions = Path(args.captions or root / "laion_subset" / "captions.txt")
    base = load_base_model(args.sd_version, args.device)
    encode_candidates(base, images_dir, captions, root, seed=args.seed, batch_size=args.batch_size,
                      overwrite=args.overwrite)


if __name__ == "__main__":
    run(main)
