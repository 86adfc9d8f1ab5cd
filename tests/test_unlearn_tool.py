"""unlearn.py, the tool: it unlearns a query as stage 2 does and saves a Custom Diffusion model that this repo's loader
and diffusers' both load, under which the query's loss is stage 2's recorded loss after unlearning."""
import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import compute_influence
import unlearn
from helpers import STAGE1, paths, stage2_flags
from utils.customization import CUSTOM_DIFFUSION_BIN, apply_customization
from utils.data import ExemplarCandidates
from utils.encoders import encode_images, encode_prompt
from utils.errors import InputError
from utils.losses import LossMeasurement
from utils.models import load_base_model
from utils.transforms import load_image_tensor
from utils.weights import PristineWeights

QUERY = "synth/imagenet/gpt/n01440764_0000/samples/00000.png"
STAGE2 = stage2_flags(steps=3, accum=2, batch=4)


def query_loss(unet, text_encoder, tokenizer, base, dataroot, prompt) -> float:
    """The query's loss as stage 2 measures it (its VAE sample drawn with seed 0, B = 20, T = 5, seed 0)."""
    image = load_image_tensor(Path(dataroot) / QUERY, base.resolution).unsqueeze(0)
    latent = encode_images(base.vae, image, torch.Generator().manual_seed(0))
    candidates = ExemplarCandidates(latent, encode_prompt(tokenizer, text_encoder, prompt))
    return float(LossMeasurement(20, 5, 0, "fp32", False, "cpu").collect(unet, base.scheduler, candidates, "q")[0])


def test_the_saved_model_loads_in_both_loaders_with_stage_2s_loss_after(tiny_copy, tmp_path):
    import compute_training_loss

    results, out = tmp_path / "results", tmp_path / "unlearned"
    compute_training_loss.main(paths(tiny_copy, results) + STAGE1)
    compute_influence.main(paths(tiny_copy, results) + STAGE2)
    stage2 = pickle.loads((results / "influence" / QUERY[len("synth/"):] / "influence.pkl").read_bytes())
    unlearn.main(paths(tiny_copy, results) + STAGE2 + ["--query", "./" + QUERY, "--out", str(out), "--samples", "2",
                                                       "--sample_steps", "3"])
    record = json.loads((out / "unlearned.json").read_text())
    assert record["query_loss"] == list(stage2["query_loss"])  # the same unlearning, to the bit
    assert sorted(p.name for p in out.iterdir()) == sorted([CUSTOM_DIFFUSION_BIN, "<new1>.bin",
                                                            "unlearned.json", "samples.png"])
    prompt = json.loads(Path(tiny_copy["task_json"]).read_text())[0]["prompt"]
    after = stage2["query_loss"][1]

    ours = load_base_model(tiny_copy["sd_version"], "cpu")  # this repo's loader, as the scripts load a model
    apply_customization(ours, PristineWeights(ours.unet), out)
    assert query_loss(ours.unet, ours.text_encoder, ours.tokenizer, ours, tiny_copy["dataroot"], prompt) == after

    from diffusers import StableDiffusionPipeline  # diffusers' own: attention processors and a textual inversion

    pipe = StableDiffusionPipeline.from_pretrained(tiny_copy["sd_version"], safety_checker=None,
                                                   requires_safety_checker=False)
    # diffusers 0.42 installs the loaded processors only when given the pipeline (huggingface/diffusers#9320): without
    # `_pipeline` the UNet silently keeps its own K/V
    pipe.unet.load_attn_procs(out, weight_name=CUSTOM_DIFFUSION_BIN, _pipeline=pipe)
    assert all(type(proc).__name__ == "CustomDiffusionAttnProcessor" for proc in pipe.unet.attn_processors.values())
    pipe.load_textual_inversion(out, weight_name="<new1>.bin")
    theirs = query_loss(pipe.unet, pipe.text_encoder, pipe.tokenizer, ours, tiny_copy["dataroot"], prompt)
    assert theirs == pytest.approx(after, rel=1e-5)

    grid = Image.open(out / "samples.png")  # 4 rows (2 prompts x original / unlearned), the query + 2 samples
    assert grid.height == 4 * (96 + 4) and grid.width > 3 * (96 + 4)
    unlearn.main(paths(tiny_copy, results) + STAGE2 + ["--query", QUERY, "--out", str(out)])  # finished: skipped
    assert json.loads((out / "unlearned.json").read_text()) == record


def test_a_query_not_in_the_task_file_is_refused(tiny_copy, tmp_path):
    with pytest.raises(InputError, match="is not a query of"):
        unlearn.main(paths(tiny_copy, tmp_path) + STAGE2 + ["--query", "synth/none.png", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
