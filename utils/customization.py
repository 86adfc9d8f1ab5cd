"""A Custom Diffusion model on top of the base: its K/V weights and its <new1> embedding."""
import re
from pathlib import Path
from typing import List, Optional

import torch

from .errors import InputError
from .fingerprints import files_fingerprint
from .models import BaseModel
from .weights import PristineWeights


CUSTOM_WEIGHTS_FILE = "pytorch_custom_diffusion_weights.pt"


CONCEPT_TOKEN = "<new1>"


CONCEPT_FILE = "<new1>.bin"


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
