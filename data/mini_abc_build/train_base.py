"""Train the mini-AbC base model from scratch on a CPU: a small VAE, then a CLIP text encoder and a UNet.

The result is a Stable Diffusion v1 pipeline folder (`save_pretrained`) with SD's noise schedule, which
the repo's scripts take as `--sd_version`. Every stage logs its loss (a JSON list of
{step, loss} every `log_every` steps) so a reader can see it learned.
Stage 1, VAE: reconstruction MSE + a small KL term, on the pretraining images; its scaling factor is
set to 1 / std of the latents (SD v1's 0.18215 plays this role). Stage 2, diffusion: the text encoder
and UNet trained together on the epsilon-prediction loss of the scaled latents (random horizontal flips,
10% of captions dropped to the empty prompt, as in SD's training).
"""
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from utils.models import encode_images


@dataclass
class BaseModelConfig:
    image_size: int = 32
    latent_channels: int = 4
    vae_channels: Tuple[int, ...] = (32, 64, 64)  # 3 levels: 32 px -> 8 x 8 latents
    unet_channels: Tuple[int, ...] = (64, 128)
    unet_attention_head_dim: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    vae_steps: int = 3000
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    diffusion_steps: int = 20000
    diffusion_batch_size: int = 64
    diffusion_lr: float = 5e-4
    caption_dropout: float = 0.1
    log_every: int = 100
    seed: int = 0
    threads: Optional[int] = None  # torch.set_num_threads; None keeps torch's default

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


@dataclass
class TrainingLog:
    """Mean loss over each window of `every` steps (and the last, shorter one)."""

    stage: str
    every: int
    total: int
    entries: List[dict] = field(default_factory=list)
    _window: List[float] = field(default_factory=list)

    def record(self, step: int, loss: float, progress: Callable = None) -> None:
        self._window.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            self.entries.append({"step": step + 1, "loss": float(np.mean(self._window))})
            self._window = []
            if progress:
                progress(self)


def build_models(config: BaseModelConfig, tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config.seed)
    n = len(config.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=config.latent_channels,
                        block_out_channels=config.vae_channels, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1,
                        norm_num_groups=min(32, config.vae_channels[0]), sample_size=config.image_size)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_hidden, intermediate_size=4 * config.text_hidden,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    m = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=config.latent_size, in_channels=config.latent_channels, out_channels=config.latent_channels,
        layers_per_block=1, block_out_channels=config.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (m - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (m - 1),
        cross_attention_dim=config.text_hidden, attention_head_dim=config.unet_attention_head_dim,
        norm_num_groups=min(32, config.unet_channels[0]))
    return vae, text_encoder, unet


def sd_scheduler():
    """SD v1's schedule in the PNDM config that SD ships (the repo reads it back as DDPM for training)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def _batches(n: int, batch_size: int, steps: int, rng: np.random.Generator):
    """`steps` index batches, walking through seeded permutations of range(n)."""
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def _cosine_lr(optimizer, base_lr: float, step: int, total: int, warmup: int = 100) -> None:
    scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in optimizer.param_groups:
        group["lr"] = base_lr * max(scale, 0.02)


def train_vae(vae, images: torch.Tensor, config: BaseModelConfig, progress: Callable = None) -> TrainingLog:
    """images: [N, 3, H, W] in [-1, 1]."""
    log = TrainingLog("vae", config.log_every, config.vae_steps)
    rng = np.random.default_rng(config.seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    for step, idx in enumerate(_batches(len(images), min(config.vae_batch_size, len(images)), config.vae_steps, rng)):
        _cosine_lr(opt, config.vae_lr, step, config.vae_steps)
        x = images[idx]
        x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = F.mse_loss(recon, x) + config.vae_kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.record(step, loss.item(), progress)
    vae.eval().requires_grad_(False)
    return log


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor, batch_size: int = 256) -> float:
    """1 / std of the VAE's latent samples over the images, rounded to 5 digits (SD v1: 0.18215)."""
    samples = encode_images(vae, images, torch.Generator().manual_seed(0), batch_size=batch_size, scale=False)
    return round(1.0 / samples.std().item(), 5)


def train_diffusion(unet, text_encoder, scheduler, latents: torch.Tensor, token_ids: torch.Tensor,
                    empty_ids: torch.Tensor, config: BaseModelConfig, progress: Callable = None) -> TrainingLog:
    """latents: [N, C, h, w] scaled (unflipped; flips drawn per sample); token_ids: [N, 77]."""
    log = TrainingLog("diffusion", config.log_every, config.diffusion_steps)
    rng = np.random.default_rng(config.seed + 1)
    g = torch.Generator().manual_seed(config.seed + 1)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.diffusion_lr, weight_decay=1e-2)
    alphas = scheduler.alphas_cumprod
    batch = min(config.diffusion_batch_size, len(latents))
    for step, idx in enumerate(_batches(len(latents), batch, config.diffusion_steps, rng)):
        _cosine_lr(opt, config.diffusion_lr, step, config.diffusion_steps)
        x = latents[idx]
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        ids = token_ids[idx]
        drop = torch.rand(len(ids), generator=g) < config.caption_dropout
        ids = torch.where(drop.view(-1, 1), empty_ids.view(1, -1), ids)
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, len(alphas), (len(x),), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x + (1 - a).sqrt() * noise
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.record(step, loss.item(), progress)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return log


def tokenize(tokenizer, captions: List[str]) -> torch.Tensor:
    return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


def train_base_model(images: torch.Tensor, captions: List[str], tokenizer, out_dir, config: BaseModelConfig,
                     progress: Callable = None) -> dict:
    """Train VAE, then text encoder + UNet; save the pipeline to out_dir and the logs beside it.

    Returns {"vae": TrainingLog, "diffusion": TrainingLog, "scaling_factor": float}.
    """
    from diffusers import StableDiffusionPipeline

    if config.threads:
        torch.set_num_threads(config.threads)
    vae, text_encoder, unet = build_models(config, tokenizer)
    scheduler = sd_scheduler()
    vae_log = train_vae(vae, images, config, progress)
    scaling = latent_scaling_factor(vae, images)
    vae.register_to_config(scaling_factor=scaling)
    latents = encode_images(vae, images, torch.Generator().manual_seed(config.seed + 2), batch_size=256)
    diffusion_log = train_diffusion(unet, text_encoder, scheduler, latents, tokenize(tokenizer, captions),
                                    tokenize(tokenizer, [""])[0], config, progress)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir)
    (out_dir / "training_log.json").write_text(json.dumps({
        "config": asdict(config), "scaling_factor": scaling,
        "vae": vae_log.entries, "diffusion": diffusion_log.entries}, indent=1))
    return {"vae": vae_log, "diffusion": diffusion_log, "scaling_factor": scaling}
