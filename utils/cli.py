"""Flags shared by the scripts, and the wrapper that turns input errors into a message and exit code 2."""
import argparse
import sys
from pathlib import Path

import torch

from .io import InputError


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task_json", required=True, help="task file: a JSON list of queries (see tasks/)")
    parser.add_argument("--result_dir", default="results", help="where orig_loss/ and influence/ are written")
    parser.add_argument("--sd_version", default="CompVis/stable-diffusion-v1-4",
                        help="base model: a Hugging Face id or a local diffusers folder")
    parser.add_argument("--dataroot", default="data/abc", help="AbC data folder (layout in README)")
    parser.add_argument("--laion_subset_size", type=int, default=100_000,
                        help="number of LAION images used as candidates (each also flipped)")
    parser.add_argument("--vae_batch_size", type=int, default=20, help="images per VAE encoding batch")
    parser.add_argument("--seed", type=int, default=0,
                        help="loss batch b draws its noise from seed + b; also seeds VAE samples and unlearning")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="UNet precision (utils/speed.py); auto = bf16 on CUDA, fp32 on the CPU; recorded with "
                             "the loss cache, so both stages must resolve to the same; fp32 reproduces the authors' "
                             "numerics")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet for loss tracking")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute outputs that already exist (default: skip finished models/queries)")


def check_dataroot(dataroot) -> Path:
    dataroot = Path(dataroot)
    if not dataroot.is_dir():
        raise InputError(f"dataroot {dataroot} does not exist; run `bash data/download_abc.sh` "
                         f"or pass --dataroot")
    return dataroot


def run(main) -> None:
    """Call main(); an InputError prints 'error: ...' and exits 2 (finished outputs stay on disk)."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
