"""Loading the base Stable Diffusion components, and checking that candidate arrays fit them."""
from dataclasses import dataclass

import torch

from .errors import InputError
from .fingerprints import model_fingerprint
from .losses import PREDICTION_TYPES


@dataclass
class BaseModel:
    """The base model's parts, loaded as a user with internet would (`from_pretrained`).

    `fingerprint` identifies the model by what it is, not where it lies: a moved or re-downloaded copy
    has the same one, another model (other weights, schedule or vocabulary) another (`model_fingerprint`).
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    sd_version: str
    fingerprint: str = ""
    text_encoder_pristine: object = None  # utils.weights.PristineWeights of the text encoder, made on first use

    @property
    def resolution(self) -> int:
        """Image size the UNet was trained at: latent size x VAE downsampling (64 x 8 = 512 for SD v1.4)."""
        return int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_base_model(sd_version: str, device) -> BaseModel:
    """UNet, VAE, CLIP text encoder and tokenizer of `sd_version`, and its DDPM training scheduler (whose
    prediction_type, epsilon for SD 1.x and v_prediction for SD 2.x, every loss reads its target from). Raises
    InputError when the model cannot be loaded or predicts something else."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        unet = UNet2DConditionModel.from_pretrained(sd_version, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(sd_version, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(sd_version, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(sd_version, subfolder="tokenizer")
        # SD ships a PNDM config for sampling; training used DDPM with the same betas.
        scheduler = DDPMScheduler.from_pretrained(sd_version, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the base model {sd_version!r} (--sd_version): {e}") from e
    if scheduler.config.prediction_type not in PREDICTION_TYPES:  # every loss reads its target from it
        raise InputError(f"the base model {sd_version!r} (--sd_version): its scheduler's prediction_type is "
                         f"{scheduler.config.prediction_type!r}; the losses know {', '.join(PREDICTION_TYPES)}")
    fingerprint = model_fingerprint(unet, vae, text_encoder, tokenizer, scheduler)  # on the CPU: device-free
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, sd_version, fingerprint)


def check_candidates_fit(base: BaseModel, latents_shape, text_width: int, where: str) -> None:
    """Precomputed candidate arrays must fit the base model (a real-SD dataroot with a tiny model, say)."""
    cfg = base.unet.config
    want = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if tuple(latents_shape[1:]) != want:
        raise InputError(f"{where}: latents have shape {tuple(latents_shape[1:])} per row, but --sd_version "
                         f"{base.sd_version} takes {want}: are --dataroot and --sd_version a pair?")
    if text_width != cfg.cross_attention_dim:
        raise InputError(f"{where}: text embeddings have width {text_width}, the UNet's cross-attention "
                         f"expects {cfg.cross_attention_dim}: are --dataroot and --sd_version a pair?")
