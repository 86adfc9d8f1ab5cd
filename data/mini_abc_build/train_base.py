"""Train the mini-AbC base model from scratch: a small VAE, then a CLIP text encoder and a UNet together.

The result is a Stable Diffusion v1 pipeline folder (`save_pretrained`) with SD's noise schedule, which the
repo's scripts take as `--sd_version`. Every stage logs its mean loss per window of steps, so a reader can
see it learned (`training_log.json`).

Stage 1, VAE: reconstruction MSE + a small KL term; its scaling factor is 1 / std of the latents (SD v1's
0.18215 plays this role). Stage 2, diffusion: text encoder and UNet on the epsilon-prediction loss of the
scaled latents, with random horizontal flips, 10% of captions dropped to the empty prompt (as in SD's
training), AdamW with warm-up and a cosine decay, gradient clipping, and an exponential moving average
(EMA) of the weights, which is what gets saved and sampled: at small budgets the average separates
pictures from blobs long before the raw weights do.

Long runs checkpoint into `<out>/.checkpoint/` every `checkpoint_every` steps (weights, EMA, optimizer,
random states, logs); calling `train_base_model` again with the same configuration resumes from there.
"""
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from utils.io import save_torch
from utils.encoders import encode_images


@dataclass
class BaseModelConfig:
    image_size: int = 32
    latent_channels: int = 4
    vae_channels: Tuple[int, ...] = (32, 64, 64)  # 3 levels: 32 px -> 8 x 8 latents
    unet_channels: Tuple[int, ...] = (64, 128)
    unet_cross_attention_levels: Optional[Tuple[bool, ...]] = None  # None: every level (the last one in v1)
    unet_layers_per_block: int = 1
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
    diffusion_min_lr: float = 1e-5  # the cosine decays to this
    warmup_steps: int = 100
    ema_decay: float = 0.0  # 0: no EMA (v1); else the ceiling of a decay that rises as (1 + step) / (10 + step)
    caption_dropout: float = 0.1
    log_every: int = 100
    checkpoint_every: int = 0  # steps between checkpoints of the diffusion stage (0: none)
    seed: int = 0
    threads: Optional[int] = None  # torch.set_num_threads; None keeps torch's default
    device: str = "cpu"

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
    attend = config.unet_cross_attention_levels or (True,) * m
    unet = UNet2DConditionModel(
        sample_size=config.latent_size, in_channels=config.latent_channels, out_channels=config.latent_channels,
        layers_per_block=config.unet_layers_per_block, block_out_channels=config.unet_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attend),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend)),
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


def _cosine_lr(optimizer, base_lr: float, step: int, total: int, warmup: int = 100, min_lr: float = 0.0) -> None:
    warm = min(1.0, (step + 1) / warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    for group in optimizer.param_groups:
        group["lr"] = warm * (min_lr + (base_lr - min_lr) * cosine)


def train_vae(vae, images: torch.Tensor, config: BaseModelConfig, progress: Callable = None) -> TrainingLog:
    """images: [N, 3, H, W] in [-1, 1]."""
    log = TrainingLog("vae", config.log_every, config.vae_steps)
    rng = np.random.default_rng(config.seed)
    device = torch.device(config.device)
    vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    for step, idx in enumerate(_batches(len(images), min(config.vae_batch_size, len(images)), config.vae_steps, rng)):
        _cosine_lr(opt, config.vae_lr, step, config.vae_steps, min_lr=0.02 * config.vae_lr)
        x = images[idx]
        x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x).to(device)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = F.mse_loss(recon, x) + config.vae_kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.record(step, loss.item(), progress)
    vae.cpu().eval().requires_grad_(False)
    return log


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor, batch_size: int = 256) -> float:
    """1 / std of the VAE's latent samples over the images, rounded to 5 digits (SD v1: 0.18215)."""
    samples = encode_images(vae, images, torch.Generator().manual_seed(0), batch_size=batch_size, scale=False)
    return round(1.0 / samples.std().item(), 5)


class EMA:
    """Exponential moving average of a set of modules' parameters; decay (1 + step) / (10 + step), capped."""

    def __init__(self, modules, ceiling: float):
        self.ceiling = ceiling
        self.shadow = [copy.deepcopy(m).requires_grad_(False) for m in modules]

    @torch.no_grad()
    def update(self, modules, step: int) -> None:
        decay = min(self.ceiling, (1 + step) / (10 + step))
        for avg, model in zip(self.shadow, modules):
            for a, p in zip(avg.parameters(), model.parameters()):
                a.lerp_(p, 1 - decay)


def _checkpoint_path(out_dir) -> Path:
    return Path(out_dir) / ".checkpoint" / "diffusion.pt"


def train_diffusion(unet, text_encoder, scheduler, latents: torch.Tensor, token_ids: torch.Tensor,
                    empty_ids: torch.Tensor, config: BaseModelConfig, progress: Callable = None,
                    checkpoint: Optional[Path] = None) -> Tuple[TrainingLog, list]:
    """latents: [N, C, h, w] scaled (unflipped; flips drawn per sample); token_ids: [N, 77].

    Returns the log and the modules to save (the EMA copies when `ema_decay` > 0). With `checkpoint`, saves
    there every `checkpoint_every` steps and resumes from it when it exists."""
    log = TrainingLog("diffusion", config.log_every, config.diffusion_steps)
    device = torch.device(config.device)
    rng = np.random.default_rng(config.seed + 1)
    g = torch.Generator().manual_seed(config.seed + 1)
    modules = [unet.to(device), text_encoder.to(device)]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.diffusion_lr, weight_decay=1e-2)
    ema = EMA(modules, config.ema_decay) if config.ema_decay else None
    alphas = scheduler.alphas_cumprod.to(device)
    batch = min(config.diffusion_batch_size, len(latents))
    batches = _batches(len(latents), batch, config.diffusion_steps, rng)
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        start = _resume(checkpoint, modules, ema, opt, log, g, rng, config)
        batches = _batches(len(latents), batch, config.diffusion_steps, rng)  # continues from the restored rng
        print(f"  resuming the diffusion stage at step {start} from {checkpoint}", flush=True)
    for step in range(start, config.diffusion_steps):
        idx = next(batches)
        _cosine_lr(opt, config.diffusion_lr, step, config.diffusion_steps, config.warmup_steps, config.diffusion_min_lr)
        x = latents[idx]
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        ids = token_ids[idx]
        drop = torch.rand(len(ids), generator=g) < config.caption_dropout
        ids = torch.where(drop.view(-1, 1), empty_ids.view(1, -1), ids)
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, len(alphas), (len(x),), generator=g)
        x, noise, t, ids = x.to(device), noise.to(device), t.to(device), ids.to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x + (1 - a).sqrt() * noise, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema.update(modules, step)
        log.record(step, loss.item(), progress)
        done = step + 1
        if checkpoint is not None and config.checkpoint_every and done % config.checkpoint_every == 0 \
                and done < config.diffusion_steps:
            _save_checkpoint(checkpoint, done, modules, ema, opt, log, g, rng, config)
    final = ema.shadow if ema is not None else modules
    for m in modules + final:
        m.cpu().eval().requires_grad_(False)
    return log, final


def _save_checkpoint(path: Path, done: int, modules, ema, opt, log: TrainingLog, g, rng, config) -> None:
    save_torch(path, {
        "done": done, "config": asdict(config), "modules": [m.state_dict() for m in modules],
        "ema": [m.state_dict() for m in ema.shadow] if ema is not None else None, "optimizer": opt.state_dict(),
        "log": {"entries": log.entries, "window": log._window}, "generator": g.get_state(),
        "rng": rng.bit_generator.state})


def _resume(path: Path, modules, ema, opt, log: TrainingLog, g, rng, config) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["config"] != asdict(config):
        changed = {k for k in state["config"] if state["config"][k] != asdict(config).get(k)}
        raise RuntimeError(f"{path} was made with another configuration (differs in {sorted(changed)}); "
                           f"delete it to start the base model again")
    for m, s in zip(modules, state["modules"]):
        m.load_state_dict(s)
    if ema is not None:
        for m, s in zip(ema.shadow, state["ema"]):
            m.load_state_dict(s)
    opt.load_state_dict(state["optimizer"])
    log.entries, log._window = state["log"]["entries"], state["log"]["window"]
    g.set_state(state["generator"])
    rng.bit_generator.state = state["rng"]
    return int(state["done"])


def tokenize(tokenizer, captions: List[str]) -> torch.Tensor:
    return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


def train_base_model(images: torch.Tensor, captions: List[str], tokenizer, out_dir, config: BaseModelConfig,
                     progress: Callable = None) -> dict:
    """Train VAE, then text encoder + UNet; save the pipeline to out_dir and the logs beside it.

    A checkpoint of the VAE stage and periodic checkpoints of the diffusion stage live in
    out_dir/.checkpoint/ (deleted when done), so a stopped run resumes. Returns {"vae": TrainingLog,
    "diffusion": TrainingLog, "scaling_factor": float, "seconds": {stage: wall seconds of this call}}.
    """
    from diffusers import StableDiffusionPipeline

    if config.threads:
        torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    vae, text_encoder, unet = build_models(config, tokenizer)
    scheduler = sd_scheduler()
    seconds = {}
    vae_file = out_dir / ".checkpoint" / "vae.pt"
    t0 = time.time()
    if vae_file.is_file():
        saved = torch.load(vae_file, map_location="cpu", weights_only=False)
        vae.load_state_dict(saved["vae"])
        vae_log = TrainingLog("vae", config.log_every, config.vae_steps, saved["log"])
        vae.eval().requires_grad_(False)
    else:
        vae_log = train_vae(vae, images, config, progress)
        save_torch(vae_file, {"vae": vae.state_dict(), "log": vae_log.entries})
    seconds["vae"] = round(time.time() - t0)
    scaling = latent_scaling_factor(vae, images)
    vae.register_to_config(scaling_factor=scaling)
    latents = encode_images(vae, images, torch.Generator().manual_seed(config.seed + 2), batch_size=256)
    t0 = time.time()
    diffusion_log, (unet, text_encoder) = train_diffusion(
        unet, text_encoder, scheduler, latents, tokenize(tokenizer, captions), tokenize(tokenizer, [""])[0], config,
        progress, checkpoint=_checkpoint_path(out_dir))
    seconds["diffusion"] = round(time.time() - t0)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    (out_dir / "training_log.json").write_text(json.dumps({
        "config": asdict(config), "scaling_factor": scaling, "seconds_this_run": seconds,
        "vae": vae_log.entries, "diffusion": diffusion_log.entries}, indent=1))
    for f in (vae_file, _checkpoint_path(out_dir)):
        if f.exists():
            f.unlink()
    if vae_file.parent.is_dir() and not any(vae_file.parent.iterdir()):
        vae_file.parent.rmdir()
    return {"vae": vae_log, "diffusion": diffusion_log, "scaling_factor": scaling, "seconds": seconds}
