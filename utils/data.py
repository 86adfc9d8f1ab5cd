"""Training candidates as (latent, text embedding) rows: a model's exemplars, then the LAION subset.

Both sets list every unflipped row first, then the same images flipped (docs/method.md, section 3), so
a candidate i has rows i and n + i.
"""
import hashlib
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .errors import InputError
from .io import load_npy
from .transforms import load_image_tensor

LAION_LATENTS = "laion_latents.npy"
LAION_TEXT_EMBEDDINGS = "laion_text_embeddings.npy"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LAION_IMAGES = Path("laion_subset") / "images"


def candidate_image_paths(images_dir, required: bool = True) -> List[Path]:
    """The image files of a candidate folder, in the sorted order that the candidate arrays' rows and the caption
    lines follow: the one listing every reader uses (encoding, the top-10 picture, the pixel baseline, the HTML
    page). Hidden files (`.DS_Store`, `._name`) and files that are not images are not candidates. Raises
    InputError for a missing or image-less folder when `required`; else returns [] for a missing one."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        if not required:
            return []
        raise InputError(f"candidate image folder not found: {images_dir}")
    listed = [p for p in images_dir.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES]
    broken = sorted(p for p in listed if p.is_symlink() and not p.exists())
    if broken:  # skipped, it would shift every later row against the arrays; kept, it cannot be read
        raise InputError(f"{images_dir}: {len(broken)} image link(s) point to nothing, e.g. {broken[0].name} -> "
                         f"{os.readlink(broken[0])}; restore the target(s) or remove the link(s), then re-encode "
                         "the candidates if the folder changed (python -m data.encode_candidates --overwrite)")
    paths = sorted(p for p in listed if p.is_file())
    if not paths and required:
        raise InputError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def laion_image_paths(dataroot, n_rows: Optional[int] = None) -> List[Path]:
    """The LAION subset's images (<dataroot>/laion_subset/images) in candidate order, [] when the folder is absent
    (pictures then show placeholders). With `n_rows` (the arrays' image count), a folder holding another number
    of images is refused: every picture would name the wrong candidates."""
    paths = candidate_image_paths(Path(dataroot) / LAION_IMAGES, required=False)
    if n_rows is not None and paths and len(paths) != n_rows:
        raise InputError(f"{Path(dataroot) / LAION_IMAGES} holds {len(paths)} images but the candidate arrays in "
                         f"{dataroot} hold {n_rows}: pictures would label the wrong candidates. Restore the folder, "
                         f"or re-encode the arrays from it (python -m data.encode_candidates --overwrite)")
    return paths


class ExemplarCandidates:
    """Image latents [2n, C, h, w] (unflipped, then flipped) as candidate rows: a model's exemplars, all with one
    caption embedding [77, D] (or [1, 77, D]); or images with a caption each, [n, 77, D], row r reading caption
    r mod n (the queries whose counterfactual losses data/mini_abc_build/counterfactual.py measures)."""

    def __init__(self, latents: torch.Tensor, text_embedding: torch.Tensor):
        self.latents = latents.float()
        self.text_embedding = text_embedding.float().reshape(-1, *text_embedding.shape[-2:])
        if len(self.text_embedding) not in (1, len(self.latents) // 2):
            raise ValueError(f"{len(self.text_embedding)} caption embeddings for {len(self.latents)} rows: give one, "
                             "or one per image (half the rows)")

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
        latents = self.latents[start:stop]
        if len(self.text_embedding) == 1:
            return latents, self.text_embedding.expand(len(latents), -1, -1)
        rows = torch.arange(start, start + len(latents)) % len(self.text_embedding)
        return latents, self.text_embedding[rows]


def load_exemplar_images(paths: List[Path], resolution: int) -> torch.Tensor:
    """[2n, 3, R, R] in [-1, 1]: every exemplar unflipped, then every exemplar flipped."""
    unflipped = [load_image_tensor(p, resolution) for p in paths]
    flipped = [load_image_tensor(p, resolution, flip=True) for p in paths]
    return torch.stack(unflipped + flipped)


def encode_exemplars(base, paths: List[Path], train_prompt: str, vae_batch_size: int,
                     generator: torch.Generator) -> "ExemplarCandidates":
    """The exemplars as candidates: VAE latents [2n, C, h, w] (unflipped, then flipped; samples drawn from
    `generator`, seeded by --seed in both stages), all captioned with the model's `train_prompt`."""
    from .encoders import encode_images, encode_prompt

    latents = encode_images(base.vae, load_exemplar_images(paths, base.resolution), generator,
                            batch_size=vae_batch_size)
    return ExemplarCandidates(latents, encode_prompt(base.tokenizer, base.text_encoder, train_prompt).cpu())


class LaionCandidates:
    """The first `subset_size` LAION images and their flips, read from memory-mapped arrays.

    `laion_latents.npy` is [2N, C, h, w] (N unflipped rows, then the N flipped), already scaled;
    `laion_text_embeddings.npy` is [N, 77, D]. Row r of the 2S subset rows reads latent r (r < S)
    or N + r - S (flipped block), and text embedding r mod S. Nothing is loaded whole.
    """

    def __init__(self, dataroot, subset_size: int):
        dataroot = Path(dataroot)
        self.dataroot = dataroot
        self.latents = _open_array(dataroot / LAION_LATENTS)
        self.text_embeddings = _open_array(dataroot / LAION_TEXT_EMBEDDINGS)
        if self.latents.ndim != 4 or self.latents.shape[0] % 2:
            raise InputError(f"{dataroot / LAION_LATENTS}: expected [2N, C, h, w] (unflipped then flipped), "
                             f"got shape {self.latents.shape}")
        self.total = self.latents.shape[0] // 2
        if self.text_embeddings.ndim != 3 or self.text_embeddings.shape[0] != self.total:
            raise InputError(f"{dataroot / LAION_TEXT_EMBEDDINGS}: expected [{self.total}, 77, D] to match "
                             f"{self.latents.shape[0]} latent rows, got shape {self.text_embeddings.shape}")
        if not 0 < subset_size <= self.total:
            raise InputError(f"--laion_subset_size {subset_size} must be between 1 and {self.total}, "
                             f"the number of LAION images in {dataroot}")
        self.subset_size = subset_size
        self._fingerprint = None

    def __len__(self) -> int:
        return 2 * self.subset_size

    def batch(self, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
        rows = np.arange(start, min(stop, len(self)))
        latent_rows, text_rows = self._latent_rows(rows), rows % self.subset_size
        latents = np.ascontiguousarray(self.latents[latent_rows], dtype=np.float32)
        texts = np.ascontiguousarray(self.text_embeddings[text_rows], dtype=np.float32)
        for name, values, index in ((LAION_LATENTS, latents, latent_rows), (LAION_TEXT_EMBEDDINGS, texts, text_rows)):
            if not np.isfinite(values).all():  # one damaged row would make every influence of its batch noise
                bad = index[~np.isfinite(values.reshape(len(values), -1)).all(axis=1)]
                raise InputError(f"{self.dataroot / name}: row(s) {bad[:5].tolist()} hold NaN or inf; re-encode the "
                                 f"candidates (python -m data.encode_candidates --overwrite) or download them again")
        return torch.from_numpy(latents), torch.from_numpy(texts)

    def _latent_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.where(rows < self.subset_size, rows, rows - self.subset_size + self.total)

    def fingerprint(self, n_rows: int = 64) -> str:
        """Hash of the shapes and of 64 evenly spaced candidate rows (latent and text) of the subset used:
        re-encoded or reordered arrays get another fingerprint, a moved folder the same one. Reads a few MB."""
        if self._fingerprint is None:
            self._fingerprint = self._hash_rows(n_rows)
        return self._fingerprint

    def _hash_rows(self, n_rows: int) -> str:
        rows = np.unique(np.linspace(0, len(self) - 1, min(n_rows, len(self))).round().astype(np.int64))
        h = hashlib.sha256(f"{self.latents.shape}{self.text_embeddings.shape}{self.subset_size}".encode())
        h.update(np.ascontiguousarray(self.latents[self._latent_rows(rows)], dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.text_embeddings[rows % self.subset_size], dtype=np.float32).tobytes())
        return h.hexdigest()[:16]


def _open_array(path: Path) -> np.ndarray:
    return load_npy(path, "candidate array", mmap_mode="r",
                    remedy="run data/download_abc.sh (or data/encode_candidates.py --overwrite) or check --dataroot")
