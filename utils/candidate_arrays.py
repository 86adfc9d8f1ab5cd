"""Turn a folder of candidate images and their captions into the two arrays both stages read.

    <dataroot>/laion_latents.npy           float32 [2N, C, h, w]: VAE latent samples times the scaling factor,
                                           the N images unflipped, then the same N flipped left-right
    <dataroot>/laion_text_embeddings.npy   float32 [N, 77, D]: the text encoder's output for each caption

(docs/method.md, section 2). Images are taken in sorted file-name order, caption line i belongs to image i.
Row r's posterior sample draws its noise from a generator seeded with seed * 2**32 + r, so the arrays do
not depend on the batch size or on where a stopped run resumed. Work goes into `<name>.partial` files and
a progress record; a rerun continues from the last finished batch, and the finished arrays replace the
partial ones in one rename each.
"""
import hashlib
import os
from pathlib import Path
from typing import List

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import LAION_LATENTS, LAION_TEXT_EMBEDDINGS, candidate_image_paths
from .errors import InputError
from .io import load_json, load_npy, read_lines, save_json
from .encoders import encode_prompt, encode_with_noise, latent_hw
from .models import BaseModel
from .transforms import load_image_tensor

PROGRESS = "encode_candidates.progress.json"
RECORD = "encode_candidates.json"


def read_captions(captions_file, n_images: int, images_dir) -> List[str]:
    """One caption per image, line by line in the images' sorted order. Lines end at '\\n' only (utils.io.read_lines):
    a caption may hold U+2028, U+0085 or a form feed, and an empty last caption is a caption."""
    captions = read_lines(captions_file, "captions file", remedy=f"one caption a line, in the sorted order of the "
                                                                  f"images in {images_dir}")
    if len(captions) != n_images:
        raise InputError(f"{captions_file} has {len(captions)} caption lines but {images_dir} has {n_images} images; "
                         f"they must pair up line by line in sorted file-name order")
    return captions


def encode_candidates(base: BaseModel, images_dir, captions_file, out_dir, seed: int = 0, batch_size: int = 20,
                      overwrite: bool = False) -> dict:
    """Write laion_latents.npy and laion_text_embeddings.npy under `out_dir` (see the module docstring).
    Returns the record saved beside them (encode_candidates.json). Skips finished arrays unless `overwrite`."""
    out_dir = Path(out_dir)
    finals = [out_dir / LAION_LATENTS, out_dir / LAION_TEXT_EMBEDDINGS]
    paths = candidate_image_paths(images_dir)
    captions = read_captions(captions_file, len(paths), images_dir)
    n, resolution = len(paths), base.resolution
    settings = {"base_model": base.fingerprint, "seed": seed, "n_images": n, "resolution": resolution,
                "images": _digest([p.name for p in paths]), "captions": _digest(captions)}
    if all(f.is_file() for f in finals) and not overwrite:
        record = load_json(out_dir / RECORD, "encoding record") if (out_dir / RECORD).is_file() else None
        stale = [k for k in settings if record is not None and record.get(k) != settings[k]]
        if not stale:  # made from these sources (or by someone else: no record to tell)
            print(f"{finals[0]} and {finals[1].name} exist; pass --overwrite to remake them")
            return record or {}
        print(f"{finals[0]} and {finals[1].name} were made from other sources ({', '.join(stale)} changed, "
              f"{RECORD}): remaking them")
        overwrite = True
    latents, texts, done = _open_partial(out_dir, settings, n, base, overwrite)
    bar = tqdm(total=n, initial=done, desc="encoding candidates", unit="image")
    for start in range(done, n, batch_size):
        stop = min(start + batch_size, n)
        unflipped = torch.stack([load_image_tensor(p, resolution) for p in paths[start:stop]])
        flipped = unflipped.flip(-1)  # the same left-right flip as loading with flip=True
        for block, images in ((0, unflipped), (n, flipped)):
            eps = torch.stack([_row_noise(base, resolution, seed, block + i) for i in range(start, stop)])
            latents[block + start:block + stop] = encode_with_noise(base.vae, images, eps).numpy()
        texts[start:stop] = encode_prompt(base.tokenizer, base.text_encoder, captions[start:stop]).float().cpu().numpy()
        latents.flush()
        texts.flush()
        save_json(out_dir / PROGRESS, {"settings": settings, "done": stop})  # after the rows it counts are on disk
        bar.update(stop - start)
    bar.close()
    del latents, texts  # close the memory maps before renaming their files
    for final in finals:
        os.replace(final.with_name(final.name + ".partial"), final)
    record = {**settings, "images_dir": str(images_dir), "captions_file": str(captions_file)}
    save_json(out_dir / RECORD, record)
    (out_dir / PROGRESS).unlink()
    print(f"wrote {finals[0]} {tuple(np.load(finals[0], mmap_mode='r').shape)} and {finals[1]} "
          f"{tuple(np.load(finals[1], mmap_mode='r').shape)}")
    return record


def _row_noise(base: BaseModel, resolution: int, seed: int, row: int) -> torch.Tensor:
    shape = (base.vae.config.latent_channels, *latent_hw(base.vae, (resolution, resolution)))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 2**32 + row), dtype=torch.float32)


def _open_partial(out_dir: Path, settings: dict, n: int, base: BaseModel, overwrite: bool):
    """The two partial arrays as writable memory maps and how many images they already hold."""
    out_dir.mkdir(parents=True, exist_ok=True)
    progress_file = out_dir / PROGRESS
    lat_path = out_dir / (LAION_LATENTS + ".partial")
    txt_path = out_dir / (LAION_TEXT_EMBEDDINGS + ".partial")
    if progress_file.is_file() and lat_path.is_file() and txt_path.is_file() and not overwrite:
        progress = load_json(progress_file, "encoding progress record")
        if progress.get("settings") != settings:
            raise InputError(f"{progress_file}: a stopped run with other settings ({progress.get('settings')}) left "
                             f"partial arrays in {out_dir}; pass --overwrite to start again")
        print(f"resuming at image {progress['done']} of {n}")
        remedy = "pass --overwrite to start the encoding again"
        return (load_npy(lat_path, "partial array", mmap_mode="r+", remedy=remedy),
                load_npy(txt_path, "partial array", mmap_mode="r+", remedy=remedy), int(progress["done"]))
    channels = base.vae.config.latent_channels
    h, w = latent_hw(base.vae, (settings["resolution"],) * 2)
    tokens = base.tokenizer.model_max_length
    width = base.text_encoder.config.hidden_size
    latents = np.lib.format.open_memmap(lat_path, mode="w+", dtype=np.float32, shape=(2 * n, channels, h, w))
    texts = np.lib.format.open_memmap(txt_path, mode="w+", dtype=np.float32, shape=(n, tokens, width))
    save_json(progress_file, {"settings": settings, "done": 0})
    return latents, texts, 0


def _digest(items: List[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]
