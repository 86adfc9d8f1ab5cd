"""A customized model on top of the base: the forms a model folder may take, loading each, and its fingerprint
(docs/method.md, section 2).

* Custom Diffusion: `pytorch_custom_diffusion_weights.pt` (AbC), or `.bin` / `.safetensors` as diffusers'
  `train_custom_diffusion.py` saves it (`save_attn_procs`): the cross-attention K/V (and, with
  `--freeze_model crossattn`, Q/out) weights, under UNet or diffusers' processor names.
* LoRA: `pytorch_lora_weights.safetensors` (or `.bin`), as diffusers' LoRA trainers save it
  (`save_lora_weights`): loaded by diffusers into peft layers, fused into the weights, and the layers removed, so
  the UNet (and text encoder) are plain modules again holding the merged weights.
* Full fine-tune (DreamBooth): a diffusers pipeline folder (`model_index.json`, `unet/`, optionally
  `text_encoder/`): its weights replace the base's.

With any form, one `<token>.bin` / `<token>.safetensors` file per modifier token (torch pickle or safetensors
bytes, whatever the name says): `{token: embedding}`. Every token file of the folder is loaded; a prompt
that names a `<token>` the folder does not hold is refused before any work (`check_customized_model`).
"""
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .errors import InputError
from .fingerprints import files_fingerprint
from .io import load_tensors
from .models import BaseModel
from .weights import PristineWeights

CUSTOM_WEIGHTS_FILE = "pytorch_custom_diffusion_weights.pt"  # AbC's name; the trainer's are in CUSTOM_WEIGHTS_FILES
CUSTOM_DIFFUSION_BIN = "pytorch_custom_diffusion_weights.bin"  # diffusers' trainer's pickle form
CUSTOM_WEIGHTS_FILES = (CUSTOM_WEIGHTS_FILE, CUSTOM_DIFFUSION_BIN, "pytorch_custom_diffusion_weights.safetensors")
LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
FULL_MODEL_FILE = "model_index.json"  # a diffusers pipeline folder: a full fine-tune
CONCEPT_TOKEN = "<new1>"
CONCEPT_FILE = "<new1>.bin"
TOKEN_FILE = re.compile(r"^(<[^<>\s/]+>)\.(bin|safetensors)$")
PROMPT_TOKEN = re.compile(r"<[^<>\s]+>")
ACCEPTED = (f"{' / '.join(CUSTOM_WEIGHTS_FILES)} (Custom Diffusion), {' / '.join(LORA_FILES)} (LoRA), or "
            f"{FULL_MODEL_FILE} with unet/ (a full fine-tune, e.g. DreamBooth)")


# diffusers' Custom Diffusion trainer saves processor weights; map them onto the plain UNet names.
_PROCESSOR_KEY = re.compile(r"\.processor\.(to_[kvq]|to_out)_custom_diffusion\.")


def to_unet_parameter_name(key: str) -> str:
    key = key[len("unet."):] if key.startswith("unet.") else key
    return _PROCESSOR_KEY.sub(lambda m: f".{m.group(1)}.", key)


def customization_form(model_dir) -> Tuple[str, List[Path]]:
    """(form, the weight files it loads) of a model folder: 'custom-diffusion', 'lora' or 'full'. Raises
    InputError for a missing folder, a folder with none of the accepted files, or with two forms at once."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"customized model folder not found: {model_dir}")
    found = {"custom-diffusion": [model_dir / f for f in CUSTOM_WEIGHTS_FILES if (model_dir / f).is_file()],
             "lora": [model_dir / f for f in LORA_FILES if (model_dir / f).is_file()],
             "full": full_model_files(model_dir) if (model_dir / FULL_MODEL_FILE).is_file() else []}
    forms = [k for k, v in found.items() if v]
    if not forms:
        raise InputError(f"{model_dir} holds no customized model: expected {ACCEPTED}")
    if len(forms) > 1 or (forms != ["full"] and len(found[forms[0]]) > 1):  # a full model is many files
        several = [p for k in forms for p in found[k]]
        raise InputError(f"{model_dir} holds {len(several)} customized weight files "
                         f"({', '.join(p.name for p in several)}); keep the one the model was saved as")
    return forms[0], found[forms[0]]


def full_model_files(model_dir: Path) -> List[Path]:
    """The weight and config files of a full fine-tune's UNet (required) and text encoder (optional)."""
    unet = sorted(p for p in (model_dir / "unet").glob("*") if p.suffix in (".safetensors", ".bin", ".json"))
    if not any(p.suffix != ".json" for p in unet):
        raise InputError(f"{model_dir} has {FULL_MODEL_FILE} but no unet/ weights: a full fine-tune needs "
                         f"unet/config.json and unet/diffusion_pytorch_model.safetensors (save_pretrained)")
    text = sorted(p for p in (model_dir / "text_encoder").glob("*") if p.suffix in (".safetensors", ".bin", ".json"))
    return unet + text


def token_files(model_dir) -> Dict[str, Path]:
    """{token: file} of the folder's modifier-token embeddings (`<new1>.bin`, `<new2>.safetensors`, ...)."""
    model_dir = Path(model_dir)
    out = {}
    for path in sorted(model_dir.iterdir()) if model_dir.is_dir() else []:
        match = TOKEN_FILE.match(path.name)
        if match and path.is_file():
            if match.group(1) in out:
                raise InputError(f"{model_dir} holds two embeddings of {match.group(1)} ({out[match.group(1)].name}, "
                                 f"{path.name}); keep one")
            out[match.group(1)] = path
    return out


def check_customized_model(model_dir, prompts, where: str, tokenizer=None) -> str:
    """Before any work: the folder holds one accepted form, and every `<token>` the prompts name has its embedding
    there; with the base's `tokenizer`, also that the text encoder reads every modifier token of each prompt
    (`check_prompt_length`). Returns the form."""
    form, _ = customization_form(model_dir)
    held = token_files(model_dir)
    for prompt in prompts:  # a token without its embedding would be read as plain text, silently another prompt
        missing = [t for t in PROMPT_TOKEN.findall(prompt) if t not in held]
        if missing:
            raise InputError(f"{where}: the prompt {prompt!r} names {', '.join(missing)}, but {model_dir} holds "
                             f"no embedding for it (files {', '.join(f'{t}.bin' for t in missing)}; it has "
                             f"{', '.join(held) or 'none'}): add the token's file from the training run, or fix the "
                             f"prompt")
        if tokenizer is not None:
            check_prompt_length(tokenizer, prompt, list(held), where)
    return form


_WARNED_LONG = set()  # prompts already warned about in this process: one line each


def prompt_token_count(tokenizer, prompt: str, modifier_tokens) -> Tuple[int, Dict[str, int]]:
    """(tokens the text encoder would be given without truncation, start and end included; {modifier token: its
    position}), counted as the tokenizer splits the prompt once the modifier tokens are single tokens (as
    utils.customization loads them), without changing the tokenizer."""
    tokens = [t for t in modifier_tokens if t in prompt]
    pieces = re.split("(" + "|".join(re.escape(t) for t in tokens) + ")", prompt) if tokens else [prompt]
    count, positions = 1, {}  # the start token
    for piece in pieces:
        if piece in tokens:
            positions.setdefault(piece, count)
            count += 1
        elif piece.strip():
            count += len(tokenizer(piece, add_special_tokens=False).input_ids)
    return count + 1, positions  # the end token


def check_prompt_length(tokenizer, prompt: str, modifier_tokens, where: str) -> None:
    """The text encoder reads tokenizer.model_max_length tokens (77, start and end included) and the rest of a
    prompt is cut (utils.encoders.encode_prompt truncates). A modifier token past the cut would vanish silently,
    leaving another prompt: refused (InputError naming the prompt, its length and the limit). A cut elsewhere is one
    warning line per prompt."""
    limit = tokenizer.model_max_length
    count, positions = prompt_token_count(tokenizer, prompt, modifier_tokens)
    if count <= limit:
        return
    cut = [t for t, i in positions.items() if i >= limit - 1]  # the last place holds the end token
    if cut:
        raise InputError(f"{where}: the prompt {prompt!r} is {count} tokens long (start and end included) and the "
                         f"text encoder reads {limit}: {', '.join(cut)} at token {positions[cut[0]]} would be cut "
                         "off, and the prompt read without it. Shorten the prompt, or put the token earlier")
    if prompt not in _WARNED_LONG:
        _WARNED_LONG.add(prompt)
        print(f"warning: {where}: the prompt {prompt!r} is {count} tokens long and the text encoder reads {limit}; "
              f"its last {count - limit} token(s) are cut (as in training and sampling)", file=sys.stderr)


def load_custom_diffusion_weights(unet: torch.nn.Module, model_dir,
                                  pristine: Optional[PristineWeights] = None) -> List[str]:
    """Copy a Custom Diffusion state dict into `unet`, checking every key and shape (no strict=False).

    Reads whichever of CUSTOM_WEIGHTS_FILES the folder holds. Accepts UNet parameter names
    (`...attn2.to_k.weight`) or diffusers' processor names (`...attn2.processor.to_k_custom_diffusion.weight`).
    Returns the UNet names that were loaded.
    """
    form, files = customization_form(model_dir)
    if form != "custom-diffusion":
        raise InputError(f"{model_dir} holds a {form} model, not Custom Diffusion weights")
    path = files[0]
    state = load_tensors(path, "customized weights", "train, download or save the model again")
    if not isinstance(state, dict) or not state:
        raise InputError(f"{path} holds no state dict of tensors")
    # diffusers' trainer pickles the self-attention processors too, as empty dicts: nothing was trained there
    state = {k: v for k, v in state.items() if not (isinstance(v, dict) and not v)}
    params = dict(unet.named_parameters())
    unknown, bad_shape, mapped = [], [], {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
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
    """Set the embedding of one modifier token (`<new1>`) of a customized model; adds the token the first time,
    overwrites after.

    Unlike the pipeline's `load_textual_inversion`, this may be called again for the next model
    (docs/method.md, pitfall 7). Returns the token id.
    """
    path = token_files(model_dir).get(token)
    if path is None:
        raise InputError(f"concept embedding not found: {Path(model_dir) / f'{token}.bin'} (nor .safetensors)")
    data = load_tensors(path, "concept embedding", "save it again from the training run")
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


def load_concept_embeddings(tokenizer, text_encoder, model_dir) -> List[str]:
    """Load every modifier token the folder holds (a multi-concept model has one file per token)."""
    tokens = list(token_files(model_dir))
    for token in tokens:
        load_concept_embedding(tokenizer, text_encoder, model_dir, token)
    return tokens


def _quiet_pipeline(base: BaseModel):
    """A StableDiffusionPipeline over the base's own modules (nothing copied), for diffusers' LoRA loader."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                           unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    finally:
        diffusers_logging.set_verbosity(level)


def load_lora(base: BaseModel, model_dir, pristine: PristineWeights, text_pristine: PristineWeights) -> List[str]:
    """Merge a diffusers-format LoRA into the UNet (and text encoder) with diffusers + peft: load, fuse at
    scale 1, remove the LoRA layers. Returns the UNet parameters whose values changed."""
    names = [n for n, _ in base.unet.named_parameters()]
    pristine.protect(names)  # every parameter, on the CPU: which ones a LoRA targets is up to its file
    text_pristine.protect(name for name, _ in base.text_encoder.named_parameters())
    pipe = _quiet_pipeline(base)
    try:
        pipe.load_lora_weights(str(model_dir), adapter_name="customization")
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise InputError(f"{model_dir}: diffusers cannot load this LoRA ({str(e).splitlines()[0]}); is it "
                         f"a LoRA of --sd_version saved with save_lora_weights?") from e
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return [n for n, p in base.unet.named_parameters() if not torch.equal(p.detach().cpu(), pristine.saved[n])]


def load_full_model(base: BaseModel, model_dir, pristine: PristineWeights, text_pristine: PristineWeights) -> List[str]:
    """Copy a full fine-tune's UNet (and text encoder, when its folder has one) into the base, every shape
    checked; the tokenizer stays the base's. Returns the UNet parameters whose values changed."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    model_dir = Path(model_dir)
    unet = load_in_fp32(lambda **kw: UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet",
                                                                          torch_dtype=torch.float32, **kw),
                        model_dir / "unet")
    text = load_in_fp32(lambda **kw: CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder",
                                                                   dtype=torch.float32, **kw),
                        model_dir / "text_encoder") if (model_dir / "text_encoder").is_dir() else None
    changed = copy_weights(base.unet, unet.state_dict(), pristine, model_dir / "unet")
    if text is not None:
        copy_weights(base.text_encoder, text.state_dict(), text_pristine, model_dir / "text_encoder")
    return changed


WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")  # diffusers' and transformers' weight files


def weights_variant(folder: Path) -> Optional[str]:
    """The variant to load from a `save_pretrained` folder: None when it holds plain weights
    (`diffusion_pytorch_model.safetensors`, `model.safetensors`, `.bin`, shards of them), else the one variant its
    files carry (`diffusion_pytorch_model.fp16.safetensors` -> 'fp16'). Raises InputError naming the folder when it
    holds no weights, or several variants and no plain weights."""
    variants, plain = set(), False
    for path in folder.iterdir():
        parts = path.name.split(".")
        if path.suffix not in (".safetensors", ".bin") or parts[0].split("-")[0] not in WEIGHT_STEMS:
            continue
        if len(parts) == 2:
            plain = True
        elif len(parts) == 3:
            variants.add(parts[1].split("-")[0])
    if plain:
        return None
    if len(variants) == 1:
        return variants.pop()
    raise InputError(f"{folder} holds " + (f"the variants {', '.join(sorted(variants))} and no plain weights: keep "
                                           "one variant" if variants else
                                           f"no weights ({' / '.join(s + '.safetensors' for s in WEIGHT_STEMS)})"))


def load_in_fp32(load, folder: Path):
    """`load(**kw)` a module of a `save_pretrained` folder in float32, whatever dtype its files or its config hold
    (the precision of the computation is --precision's), from its plain weights or its one variant
    (`weights_variant`); an error names the folder and the files it holds."""
    variant = weights_variant(folder)
    try:
        return load(**({"variant": variant} if variant else {}))
    except (OSError, ValueError, RuntimeError) as e:
        held = ", ".join(sorted(p.name for p in folder.iterdir()))
        raise InputError(f"cannot load {folder} (files: {held}): {str(e).splitlines()[0]}") from e


@torch.no_grad()
def copy_weights(module: torch.nn.Module, state: dict, pristine: PristineWeights, where: Path) -> List[str]:
    """Copy `state` into `module`'s parameters (protected first); a token-embedding table with fewer rows than
    the module's (tokens added by an earlier model) fills the first rows. Returns the names that changed."""
    params = dict(module.named_parameters())
    missing = [n for n in params if n not in state]
    bad = [n for n in params if n in state and (state[n].shape[1:] != params[n].shape[1:]
                                                 or state[n].shape[0] > params[n].shape[0])]
    if missing or bad:
        raise InputError(f"{where}: {len(missing)} parameter(s) missing and {len(bad)} of another shape than "
                         f"--sd_version's (e.g. {(missing + bad)[0]!r}); is it a fine-tune of that base model?")
    changed = [n for n, p in params.items() if not torch.equal(p[:len(state[n])], state[n].to(p.dtype))]
    pristine.protect(changed)
    for n in changed:
        params[n][:len(state[n])].copy_(state[n])
    return changed


def text_encoder_pristine(base: BaseModel) -> PristineWeights:
    """The base text encoder's values, kept on the base model (a LoRA or a full fine-tune may change them)."""
    if getattr(base, "text_encoder_pristine", None) is None:
        base.text_encoder_pristine = PristineWeights(base.text_encoder)
    return base.text_encoder_pristine


def apply_customization(base: BaseModel, pristine: PristineWeights, model_dir) -> List[str]:
    """Turn the base model into one customized model, whatever its form: the base restored, the model's
    weights loaded or merged, every modifier token's embedding set. Returns the UNet parameters it changed."""
    text_pristine = text_encoder_pristine(base)
    pristine.restore()
    text_pristine.restore()
    form, _ = customization_form(model_dir)
    if form == "custom-diffusion":
        loaded = load_custom_diffusion_weights(base.unet, model_dir, pristine)
    elif form == "lora":
        loaded = load_lora(base, model_dir, pristine, text_pristine)
    else:
        loaded = load_full_model(base, model_dir, pristine, text_pristine)
    load_concept_embeddings(base.tokenizer, base.text_encoder, model_dir)
    return loaded


def save_custom_diffusion(unet: torch.nn.Module, model_dir, out_dir) -> List[Path]:
    """Write the UNet's cross-attention K/V as a Custom Diffusion model in a form diffusers' own trainer writes
    (examples/custom_diffusion: Custom Diffusion attention processors saved by `save_attn_procs`), with the
    modifier-token files of `model_dir` copied beside them; diffusers' `unet.load_attn_procs` and the pipeline's
    `load_textual_inversion` read it, and so does apply_customization. The pickle form (.bin), since it keeps the
    empty entries of the self-attention processors that load_attn_procs counts (safetensors drops them, and
    diffusers then refuses its own file). The UNet's own processors are put back. Returns the files written."""
    import shutil

    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    original = unet.attn_processors
    processors = {}
    for name in original:
        attention = unet.get_submodule(name[:-len(".processor")])
        kv = name.endswith("attn2.processor")
        proc = CustomDiffusionAttnProcessor(train_kv=kv, train_q_out=False, hidden_size=attention.to_q.out_features,
                                            cross_attention_dim=unet.config.cross_attention_dim if kv else None)
        if kv:
            proc.load_state_dict({"to_k_custom_diffusion.weight": attention.to_k.weight.detach().float().cpu(),
                                  "to_v_custom_diffusion.weight": attention.to_v.weight.detach().float().cpu()})
        processors[name] = proc
    try:
        unet.set_attn_processor(processors)
        unet.save_attn_procs(out_dir, weight_name=CUSTOM_DIFFUSION_BIN, safe_serialization=False)
    finally:
        unet.set_attn_processor(original)
    written = [out_dir / CUSTOM_DIFFUSION_BIN]
    for path in token_files(model_dir).values():
        shutil.copyfile(path, out_dir / path.name)
        written.append(out_dir / path.name)
    return written


def customization_fingerprint(model_dir) -> str:
    """Identifies a customized model by the bytes of what is loaded from it: its weight files, then its token
    files (so a re-trained model is not taken for the old, and a moved folder keeps its caches)."""
    _, files = customization_form(model_dir)
    return files_fingerprint(files + list(token_files(model_dir).values()))
