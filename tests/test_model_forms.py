"""Every customized-model form a diffusers user has, each written by the library that writes it on the tiny model:
diffusers' Custom Diffusion trainer output (.safetensors, .bin with empty self-attention entries, a <new1>.bin
holding safetensors bytes), multi-concept models, a LoRA (peft + diffusers) and a full fine-tune (save_pretrained)."""
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import compute_influence
import compute_training_loss
from helpers import STAGE1, paths, stage2_flags
from utils.customization import apply_customization, check_customized_model, customization_fingerprint
from utils.data import ExemplarCandidates, LaionCandidates
from utils.encoders import encode_prompt
from utils.errors import InputError
from utils.losses import LossMeasurement
from utils.models import load_base_model
from utils.weights import PristineWeights

MODEL = "models/imagenet/n01440764_0000"
PROMPT = "a school of <new1> fish swimming in the ocean"
MEASURE = LossMeasurement(batch_size=20, time_samples=5, seed=0, precision="fp32", compiled=False, device="cpu")


def measure(base, dataroot, prompt) -> np.ndarray:
    """Losses of the 24 LAION rows and of 4 LAION latents captioned with `prompt`, under the model as it is."""
    laion = LaionCandidates(dataroot, 12)
    latents, _ = laion.batch(0, 4)
    captioned = ExemplarCandidates(latents, encode_prompt(base.tokenizer, base.text_encoder, prompt))
    return np.concatenate([MEASURE.collect(base.unet, base.scheduler, c, "losses") for c in (laion, captioned)])


def losses(base, pristine, model_dir, prompt=PROMPT) -> np.ndarray:
    """`measure` under the customized model of `model_dir` (a folder of <dataroot>/models/<family>/)."""
    apply_customization(base, pristine, model_dir)
    return measure(base, Path(model_dir).parents[2], prompt)


def assert_back_to_the_base(base, pristine, root, sd_version) -> None:
    """After another form, a Custom Diffusion model gives a fresh base model's losses bit for bit: the UNet and
    the text encoder were restored."""
    fresh = load_base_model(sd_version, "cpu")
    np.testing.assert_array_equal(losses(base, pristine, root / MODEL),
                                  losses(fresh, PristineWeights(fresh.unet), root / MODEL))


@pytest.fixture
def bench(tiny_copy):
    return tiny_copy, Path(tiny_copy["dataroot"])


@pytest.fixture
def base(tiny_abc):
    model = load_base_model(tiny_abc["sd_version"], "cpu")
    return model, PristineWeights(model.unet)


# ---- 1. diffusers' Custom Diffusion trainer output ----

def save_as_diffusers_trainer(sd_version, pt_dir: Path, out_dir: Path, safe: bool) -> None:
    """What diffusers' examples/custom_diffusion/train_custom_diffusion.py leaves: Custom Diffusion attention
    processors holding the trained K/V, saved by `save_attn_procs`; the token embedding by its save_new_embed
    (safetensors bytes under the `.bin` name, or a pickle)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(sd_version, subfolder="unet")
    trained = torch.load(pt_dir / "pytorch_custom_diffusion_weights.pt")
    processors = {}
    for name in unet.attn_processors:
        layer = name[:-len(".processor")]
        hidden = unet.get_submodule(layer).to_q.out_features
        if name.endswith("attn2.processor"):
            proc = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=hidden,
                                                cross_attention_dim=unet.config.cross_attention_dim)
            proc.load_state_dict({"to_k_custom_diffusion.weight": trained[f"{layer}.to_k.weight"],
                                  "to_v_custom_diffusion.weight": trained[f"{layer}.to_v.weight"]})
        else:
            proc = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False, hidden_size=hidden)
        processors[name] = proc
    unet.set_attn_processor(processors)
    unet.save_attn_procs(out_dir, safe_serialization=safe)
    embedding = torch.load(pt_dir / "<new1>.bin")
    if safe:
        save_file(embedding, out_dir / "<new1>.bin", metadata={"format": "pt"})
    else:
        torch.save(embedding, out_dir / "<new1>.bin")


@pytest.mark.parametrize("safe, weights", [(True, "pytorch_custom_diffusion_weights.safetensors"),
                                           (False, "pytorch_custom_diffusion_weights.bin")])
def test_diffusers_custom_diffusion_output_loads_as_saved(bench, base, safe, weights, tiny_abc):
    bench_paths, root = bench
    saved = root / "models" / "imagenet" / "trained_by_diffusers"
    save_as_diffusers_trainer(tiny_abc["sd_version"], root / MODEL, saved, safe)
    assert sorted(p.name for p in saved.iterdir()) == sorted(["<new1>.bin", weights])
    if not safe:  # the pickle holds the self-attention processors as empty dicts
        assert any(isinstance(v, dict) and not v for v in torch.load(saved / weights).values())
    else:  # the embedding file is safetensors bytes behind a .bin name
        assert (saved / "<new1>.bin").read_bytes()[8:9] == b"{"
    model, pristine = base
    np.testing.assert_array_equal(losses(model, pristine, saved), losses(model, pristine, root / MODEL))
    assert customization_fingerprint(saved) != customization_fingerprint(root / MODEL)


# ---- 2. multi-concept models ----

def test_every_modifier_token_is_loaded(bench, base):
    _, root = bench
    model, pristine = base
    two = root / "models" / "imagenet" / "two_concepts"
    shutil.copytree(root / MODEL, two)
    prompt = "<new1> fish beside a <new2> castle"
    found = []
    for seed in (0, 1):
        torch.save({"<new2>": torch.randn(32, generator=torch.Generator().manual_seed(seed))}, two / "<new2>.bin")
        found.append(losses(model, pristine, two, prompt))
    assert not np.array_equal(found[0][-4:], found[1][-4:])  # <new2>'s own embedding is read
    np.testing.assert_array_equal(found[0][:24], found[1][:24])  # captions without <new2> do not move


def test_a_prompt_naming_a_token_the_model_lacks_is_refused_before_any_work(bench):
    bench_paths, root = bench
    with pytest.raises(InputError, match=r"names <new3>, but .* holds no embedding for it"):
        check_customized_model(root / MODEL, ["a <new3> fish"], "here")
    tasks = json.loads(Path(bench_paths["task_json"]).read_text())
    tasks[0]["prompt"] = tasks[0]["prompt"].replace("<new1>", "<new1> and <new3>")
    Path(bench_paths["task_json"]).write_text(json.dumps(tasks))
    results = root.parent / "results"
    compute_training_loss.main(paths(bench_paths, results) + STAGE1)  # train prompts are fine
    with pytest.raises(InputError, match="names <new3>"):
        compute_influence.main(paths(bench_paths, results) + stage2_flags(steps=1, accum=1, batch=2))
    assert not (results / "influence").exists()


# ---- 3. LoRA and full fine-tunes ----

def save_lora(sd_version, out_dir: Path, with_text_encoder: bool = True) -> None:
    """A LoRA on the UNet's attention (and the text encoder's) as diffusers' LoRA trainers save it: peft adapters,
    their state dicts converted to diffusers' names, `save_lora_weights`. lora_B drawn at random (peft starts it
    at zero) so that the LoRA changes the model."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)  # peft draws lora_A from the global generator: the same LoRA whatever ran before
    unet = UNet2DConditionModel.from_pretrained(sd_version, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    text = CLIPTextModel.from_pretrained(sd_version, subfolder="text_encoder")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                            text)  # peft itself: transformers' own add_adapter wants a newer peft than PyPI has
    with torch.no_grad():
        for module in (unet, text):
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text))
        if with_text_encoder else None)


def reference_losses_with_unfused_lora(sd_version, lora_dir, root) -> np.ndarray:
    """The same losses from diffusers' own LoRA layers, not merged: what the merged model must reproduce."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_version, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_dir))
    fresh = load_base_model(sd_version, "cpu")
    fresh.unet, fresh.text_encoder = pipe.unet, pipe.text_encoder
    return measure(fresh, root, "a school of fish")


def test_a_lora_is_merged_by_diffusers_and_restored_exactly(bench, base, tiny_abc):
    _, root = bench
    lora = root / "models" / "imagenet" / "a_lora"
    save_lora(tiny_abc["sd_version"], lora)
    model, pristine = base
    merged = losses(model, pristine, lora, "a school of fish")
    np.testing.assert_allclose(merged, reference_losses_with_unfused_lora(tiny_abc["sd_version"], lora, root),
                               rtol=1e-5, atol=1e-6)
    assert_back_to_the_base(model, pristine, root, tiny_abc["sd_version"])
    assert all(type(m).__name__ != "LoraLayer" and "lora" not in n for n, m in model.unet.named_modules())


def save_full_finetune(sd_version, out_dir: Path) -> None:
    """A DreamBooth-style full fine-tune: the whole pipeline with changed UNet and text-encoder weights,
    saved by diffusers' `save_pretrained`."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_version, safety_checker=None, requires_safety_checker=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    pipe.save_pretrained(out_dir)


def test_a_full_finetune_replaces_the_weights_and_is_restored(bench, base, tiny_abc):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    _, root = bench
    full = root / "models" / "imagenet" / "dreambooth"
    save_full_finetune(tiny_abc["sd_version"], full)
    model, pristine = base
    ours = losses(model, pristine, full, "a school of fish")
    ref = load_base_model(tiny_abc["sd_version"], "cpu")
    ref.unet = UNet2DConditionModel.from_pretrained(full, subfolder="unet").eval()
    ref.text_encoder = CLIPTextModel.from_pretrained(full, subfolder="text_encoder").eval()
    np.testing.assert_array_equal(ours, measure(ref, root, "a school of fish"))  # diffusers' own loading
    assert_back_to_the_base(model, pristine, root, tiny_abc["sd_version"])


def test_a_full_finetune_in_every_layout_save_pretrained_writes(bench, base, tiny_abc, tmp_path):
    """The same fine-tune saved as plain fp32 weights, as an fp16 variant alone, and as both (whose configs then say
    float16): each loads, in float32; with both, the plain weights are read (losses equal the fp32 save's bit for
    bit, where reading the fp16 files or casting by the config would move them); the fp16 variant alone gives the
    losses of diffusers' own loading of it in float32."""
    import shutil

    import torch as _torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    _, root = bench
    model, pristine = base
    plain = root / "models" / "imagenet" / "full_fp32"
    save_full_finetune(tiny_abc["sd_version"], plain)
    half = tmp_path / "half"
    pipe = StableDiffusionPipeline.from_pretrained(plain, safety_checker=None, requires_safety_checker=False)
    pipe.to(_torch.float16).save_pretrained(half, variant="fp16")
    only16, both = root / "models" / "imagenet" / "full_fp16", root / "models" / "imagenet" / "full_both"
    shutil.copytree(half, only16)
    shutil.copytree(plain, both)
    shutil.copytree(half, both, dirs_exist_ok=True)  # the fp16 files beside the fp32 ones; configs now say fp16
    assert json.loads((both / "text_encoder" / "config.json").read_text()).get("dtype") == "float16"
    reference = losses(model, pristine, plain, "a school of fish")
    np.testing.assert_array_equal(losses(model, pristine, both, "a school of fish"), reference)
    ref = load_base_model(tiny_abc["sd_version"], "cpu")
    ref.unet = UNet2DConditionModel.from_pretrained(only16, subfolder="unet", variant="fp16",
                                                    torch_dtype=_torch.float32).eval()
    ref.text_encoder = CLIPTextModel.from_pretrained(only16, subfolder="text_encoder", variant="fp16",
                                                     dtype=_torch.float32).eval()
    got = losses(model, pristine, only16, "a school of fish")
    np.testing.assert_array_equal(got, measure(ref, root, "a school of fish"))
    assert not np.array_equal(got, reference)  # fp16 weights: other losses, as they should be
    assert next(model.unet.parameters()).dtype == _torch.float32
    assert_back_to_the_base(model, pristine, root, tiny_abc["sd_version"])
    weights = only16 / "unet" / "diffusion_pytorch_model.fp16.safetensors"  # two variants, no plain weights:
    shutil.copy(weights, weights.with_name("diffusion_pytorch_model.bf16.safetensors"))  # which one is meant?
    with pytest.raises(InputError, match=f"{only16 / 'unet'} holds the variants bf16, fp16 and no plain weights"):
        losses(model, pristine, only16, "a school of fish")


def test_a_lora_model_runs_through_both_stages(bench, tiny_abc):
    """A task whose model_path is a LoRA folder (with a <new1> embedding beside it, as a LoRA + textual-inversion
    run saves): stage 1 caches it, stage 2 unlearns the merged model's cross-attention K/V, the loss rises."""
    bench_paths, root = bench
    lora = root / "models" / "imagenet" / "n01440764_0000"
    (lora / "pytorch_custom_diffusion_weights.pt").unlink()
    save_lora(tiny_abc["sd_version"], lora, with_text_encoder=False)
    results = root.parent / "results"
    compute_training_loss.main(paths(bench_paths, results) + STAGE1)
    settings = json.loads((results / "orig_loss" / "imagenet" / "n01440764_0000" / "settings.json").read_text())
    assert settings["customized_model"] == customization_fingerprint(lora)
    # small steps: with this random LoRA and the tiny Fisher, ascent at 0.1 overshoots and the loss falls again
    compute_influence.main(paths(bench_paths, results) + stage2_flags() + ["--unlearn_lr", "0.01"])
    result = pickle.loads((results / "influence" / "imagenet" / "gpt" / "n01440764_0000" / "samples" / "00000.png" /
                           "influence.pkl").read_bytes())
    before, after = result["query_loss"]
    assert after > before
