"""Loading the base Stable Diffusion components, a Custom Diffusion model on top, which parameters a method
updates, and encoding inputs."""
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .io import InputError

CUSTOM_WEIGHTS_FILE = "pytorch_custom_diffusion_weights.pt"
CONCEPT_TOKEN = "<new1>"
CONCEPT_FILE = "<new1>.bin"


# A parameter is selected when, for every group, one of the group's substrings occurs in its name
# (docs/method.md, section 4). Custom Diffusion trains exactly the cross-attention K/V ("cross-attn-kv").
WEIGHT_SELECTIONS: Dict[str, List[List[str]]] = {
    "cross-attn-kv": [["attn2"], ["to_k", "to_v"]],
    "cross-attn": [["attn2"]],
    "attn": [["attn"]],
    "all": [],
}


def select_parameter_names(model: torch.nn.Module, weight_selection: str) -> List[str]:
    """Names of the parameters of `model` that `weight_selection` picks, in the model's order."""
    if weight_selection not in WEIGHT_SELECTIONS:
        raise ValueError(f"unknown weight selection {weight_selection!r}; choose from {', '.join(WEIGHT_SELECTIONS)}")
    groups = WEIGHT_SELECTIONS[weight_selection]
    names = [n for n, _ in model.named_parameters() if all(any(s in n for s in g) for g in groups)]
    if not names:
        raise ValueError(f"weight selection {weight_selection!r} matches no parameter of the model")
    return names


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
    fingerprint = model_fingerprint(unet, vae, text_encoder, tokenizer, scheduler)  # on the CPU: device-free
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, sd_version, fingerprint)


def model_fingerprint(unet, vae, text_encoder, tokenizer, scheduler, samples_per_tensor: int = 64) -> str:
    """A short hash of what decides the losses: every weight tensor's name, shape and 64 evenly spaced values
    (first and last included), the noise schedule, the VAE scaling factor and the vocabulary.

    Milliseconds for SD v1.4 (about 1,100 tensors), and independent of the folder, the file format and
    the device; a fine-tuned or different model changes nearly every tensor, so sampling suffices.
    """
    h = hashlib.sha256()
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            k = min(samples_per_tensor, len(flat))  # integer spacing: float linspace rounds past the end
            index = torch.arange(k, dtype=torch.int64) * max(len(flat) - 1, 0) // max(k - 1, 1)
            h.update(f"{part}.{name}{tuple(tensor.shape)}".encode())
            h.update(flat[index].to("cpu", torch.float64).numpy().tobytes())
    schedule = {k: scheduler.config.get(k) for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                     "beta_schedule", "trained_betas", "prediction_type")}
    h.update(json.dumps(schedule, sort_keys=True, default=str).encode())
    h.update(repr(float(vae.config.scaling_factor)).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def files_fingerprint(paths) -> str:
    """Hash of the bytes of a few small files (a customized model: its K/V weights and <new1> embedding)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


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
        elif not torch.isfinite(value).all():
            raise InputError(f"{path}: tensor {key!r} holds NaN or inf; the customized model is damaged "
                             f"(train or download it again)")
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
    (docs/method.md, pitfall 7). Returns the token id.
    """
    path = Path(model_dir) / CONCEPT_FILE
    if not path.is_file():
        raise InputError(f"concept embedding not found: {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or token not in data:
        keys = list(data) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{path}: expected a dict with key {token!r}, found {keys}")
    embedding = data[token].reshape(-1)
    if not torch.isfinite(embedding).all():
        raise InputError(f"{path}: the {token} embedding holds NaN or inf; the customized model is damaged")
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
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        shape = (len(batch), vae.config.latent_channels, *latent_hw(vae, batch.shape[-2:]))
        out.append(encode_with_noise(vae, batch, torch.randn(shape, generator=generator, dtype=torch.float32), scale))
    return torch.cat(out)


def latent_hw(vae, image_hw):
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return tuple(int(x) // factor for x in image_hw)


@torch.no_grad()
def encode_with_noise(vae, images: torch.Tensor, eps: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """mean + std * eps of the VAE posterior of each image (eps given, float32 on the CPU), scaled unless not."""
    device = next(vae.parameters()).device
    dist = vae.encode(images.to(device)).latent_dist
    latent = dist.mean + dist.std * eps.to(device, dist.mean.dtype)
    return (latent * vae.config.scaling_factor if scale else latent).float().cpu()


def apply_customization(base: BaseModel, pristine: PristineWeights, model_dir) -> List[str]:
    """Turn the base model into one customized model: base UNet + its K/V weights + its <new1> embedding."""
    pristine.restore()
    loaded = load_custom_diffusion_weights(base.unet, model_dir, pristine)
    load_concept_embedding(base.tokenizer, base.text_encoder, model_dir)
    return loaded


def customization_fingerprint(model_dir) -> str:
    """Identifies a customized model by its two files' bytes (so a re-trained model is not taken for the old)."""
    model_dir = Path(model_dir)
    paths = [model_dir / CUSTOM_WEIGHTS_FILE, model_dir / CONCEPT_FILE]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"customized model file not found: {missing[0]}")
    return files_fingerprint(paths)
