"""Loading the base Stable Diffusion components, a Custom Diffusion model on top, and encoding inputs."""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .io import InputError

CUSTOM_WEIGHTS_FILE = "pytorch_custom_diffusion_weights.pt"
CONCEPT_TOKEN = "<new1>"
CONCEPT_FILE = "<new1>.bin"


@dataclass
class BaseModel:
    """The base model's parts, loaded as a user with internet would (`from_pretrained`)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    sd_version: str

    @property
    def resolution(self) -> int:
        """Image size the UNet was trained at: latent size x VAE downsampling (64 x 8 = 512 for SD v1.4)."""
        return int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_base_model(sd_version: str, device) -> BaseModel:
    """UNet, VAE, CLIP text encoder and tokenizer of `sd_version`, and its DDPM training scheduler."""
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
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, sd_version)


class PristineWeights:
    """Base values of every UNet parameter that a customization or an unlearning run changes.

    Invariant: a parameter not saved here still holds its base value, so `protect` before a change
    saves the base value, and `restore` brings the UNet back to the base model (kept on the CPU).
    """

    def __init__(self, module: torch.nn.Module):
        self.params = dict(module.named_parameters())
        self.saved: Dict[str, torch.Tensor] = {}

    def protect(self, names) -> None:
        for n in names:
            if n not in self.saved:
                self.saved[n] = self.params[n].detach().to("cpu", copy=True)

    @torch.no_grad()
    def restore(self) -> None:
        for n, value in self.saved.items():
            self.params[n].copy_(value)


# diffusers' Custom Diffusion trainer saves processor weights; map them onto the plain UNet names.
_PROCESSOR_KEY = re.compile(r"\.processor\.(to_[kvq]|to_out)_custom_diffusion\.")


def to_unet_parameter_name(key: str) -> str:
    key = key[len("unet."):] if key.startswith("unet.") else key
    return _PROCESSOR_KEY.sub(lambda m: f".{m.group(1)}.", key)


def load_custom_diffusion_weights(unet: torch.nn.Module, model_dir,
                                  pristine: Optional[PristineWeights] = None) -> List[str]:
    """Copy a Custom Diffusion state dict into `unet`, checking every key and shape (no strict=False).

    Accepts UNet parameter names (`...attn2.to_k.weight`) or diffusers' processor names
    (`...attn2.processor.to_k_custom_diffusion.weight`). Returns the UNet names that were loaded.
    """
    path = Path(model_dir) / CUSTOM_WEIGHTS_FILE
    if not path.is_file():
        raise InputError(f"customized weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not state:
        raise InputError(f"{path} holds no state dict of tensors")
    params = dict(unet.named_parameters())
    unknown, bad_shape, mapped = [], [], {}
    for key, value in state.items():
        name = to_unet_parameter_name(key)
        if name not in params:
            unknown.append(key)
        elif tuple(params[name].shape) != tuple(value.shape):
            bad_shape.append(f"{key}: file {tuple(value.shape)} vs UNet {tuple(params[name].shape)}")
        else:
            mapped[name] = value
    if bad_shape:
        raise InputError(f"{path}: {len(bad_shape)} tensor(s) do not fit the base UNet, e.g. {bad_shape[0]}; "
                         f"is --sd_version the model it was customized from?")
    if unknown:
        raise InputError(f"{path}: {len(unknown)} of {len(state)} key(s) name no UNet parameter, "
                         f"e.g. {unknown[0]!r}; expected names like "
                         f"'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'")
    if pristine is not None:
        pristine.protect(mapped)
    with torch.no_grad():
        for name, value in mapped.items():
            params[name].copy_(value.to(params[name].dtype))
    return sorted(mapped)


def load_concept_embedding(tokenizer, text_encoder, model_dir, token: str = CONCEPT_TOKEN) -> int:
    """Set the `<new1>` embedding of a customized model; adds the token the first time, overwrites after.

    Unlike the pipeline's `load_textual_inversion`, this may be called again for the next model
    (SPEC pitfall 7). Returns the token id.
    """
    path = Path(model_dir) / CONCEPT_FILE
    if not path.is_file():
        raise InputError(f"concept embedding not found: {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or token not in data:
        keys = list(data) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{path}: expected a dict with key {token!r}, found {keys}")
    embedding = data[token].reshape(-1)
    table = text_encoder.get_input_embeddings()
    if embedding.numel() != table.weight.shape[1]:
        raise InputError(f"{path}: embedding has {embedding.numel()} values, the text encoder expects "
                         f"{table.weight.shape[1]}")
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens(token)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # row set below
        table = text_encoder.get_input_embeddings()
    token_id = tokenizer.convert_tokens_to_ids(token)
    with torch.no_grad():
        table.weight[token_id] = embedding.to(table.weight.dtype)
    return token_id


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt) -> torch.Tensor:
    """CLIP hidden states [n, 77, D] of a prompt (n = 1) or a list of n prompts, padded/truncated to 77 tokens."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    ids = tokenizer(prompts, max_length=tokenizer.model_max_length, padding="max_length",
                    truncation=True, return_tensors="pt").input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0]


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, generator: torch.Generator, batch_size: int = 20,
                  scale: bool = True) -> torch.Tensor:
    """VAE latent samples of images in [-1, 1], times the scaling factor unless `scale` is False.

    The posterior sample draws its noise from `generator` on the CPU so that it repeats across devices.
    """
    device = next(vae.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        dist = vae.encode(images[start:start + batch_size].to(device)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(device, dist.mean.dtype)
        latent = dist.mean + dist.std * eps
        out.append((latent * vae.config.scaling_factor if scale else latent).float().cpu())
    return torch.cat(out)


def apply_customization(base: BaseModel, pristine: PristineWeights, model_dir) -> List[str]:
    """Turn the base model into one customized model: base UNet + its K/V weights + its <new1> embedding."""
    pristine.restore()
    loaded = load_custom_diffusion_weights(base.unet, model_dir, pristine)
    load_concept_embedding(base.tokenizer, base.text_encoder, model_dir)
    return loaded
