"""Sampling from a (customized) base model, and image grids that show what a model learned."""
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
from PIL import Image

from utils.visualize import image_grid


def load_pipeline(sd_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    # SD v1 ships clip_sample=False; DDIM would otherwise clip the predicted latent to [-1, 1]
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe, prompts: Sequence[str], seed: int, steps: int = 50, guidance_scale: float = 3.0,
           batch_size: int = 32) -> List[Image.Image]:
    """One image per prompt; image i starts from the noise of a generator seeded with seed + i (so a prompt
    list can grow, and batching does not change which noise an image gets). DDIM with eta 0 adds no noise
    after the start, so an image depends on its prompt and seed alone."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        out += pipe(batch, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=generators, output_type="pil").images
    return out


def to_pil(x: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> PIL."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def save_grid(path, rows, labels, tile: int = 64) -> Path:
    from utils.io import atomic_write

    return atomic_write(path, lambda f: image_grid(rows, labels, tile).save(f, format="PNG"))
