"""Build a tiny, randomly initialized SD-format base model and an AbC-layout dataroot around it.

It exercises every file format and code path of the real benchmark in seconds on a CPU; its
rankings mean nothing (random weights, drawn shapes). Used by the tests and the README's demo:

    python -m data.build_tiny_abc --out data/tiny_abc

writes data/tiny_abc/sd-tiny (pass as --sd_version), data/tiny_abc/abc (pass as --dataroot, with
sd_fisher.pt made by utils.fisher.write_fisher) and data/tiny_abc/tasks.json (pass as --task_json).
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent

from utils.candidate_arrays import encode_candidates
from utils.data import LaionCandidates
from utils.fisher import FisherConfig, write_fisher
from utils.io import save_json
from utils.models import load_base_model
from utils.weights import select_parameter_names

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"
LATENT_SIZE = 8  # UNet sample_size; the VAE downsamples by 2, so images are 16 px

# (test case, model folder, class id, train prompt, query prompts)
MODELS = [
    ("test_unobserved_imagenet", "imagenet", "n01440764_0000", "<new1> fish",
     ["a school of <new1> fish swimming in the ocean", "a watercolor of <new1> fish"]),
    ("test_artchive", "artchive", "tinyartist", "a picture in the style of <new1> art",
     ["a cat in the style of <new1> art", "a house in the style of <new1> art"]),
]
N_EXEMPLARS = 3
N_LAION = 12
CAPTIONS = ["a red circle", "a blue square", "a green fish", "a house at night", "a cat", "a yellow star",
            "an orange tree", "a purple car", "a boat on water", "a white bird", "a black dog", "a pink flower"]


def build_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")


def build_base_model(out: Path, seed: int = 0):
    """Random tiny UNet / VAE / CLIP text encoder with SD v1's noise schedule, saved with save_pretrained."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(out / "_vocab")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=2 * LATENT_SIZE)
    # SD v1.4 ships a PNDM sampling config with the training betas; the scripts read it as DDPM, as there.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    shutil.rmtree(out / "_vocab")
    return pipe


def draw_image(rng: np.random.Generator, size=(24, 32)) -> Image.Image:
    """A random background with a few random shapes; non-square so the center crop matters."""
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        x1, y1 = x0 + rng.integers(4, size[0] // 2 + 1), y0 + rng.integers(4, size[1] // 2 + 1)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x0), int(y0), int(x1), int(y1)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def save_custom_model(pipe, folder: Path, rng: np.random.Generator, processor_keys: bool, seed: int):
    """Perturbed cross-attention K/V (not copies of the base) and a random <new1> embedding."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    params = dict(pipe.unet.named_parameters())
    state = {}
    for name in select_parameter_names(pipe.unet, "cross-attn-kv"):  # what Custom Diffusion trains
        p = params[name].detach()
        value = p + 0.5 * p.std() * torch.randn(p.shape, generator=g)
        if processor_keys:  # the naming of diffusers' Custom Diffusion trainer
            name = name.replace(".to_k.", ".processor.to_k_custom_diffusion.")
            name = name.replace(".to_v.", ".processor.to_v_custom_diffusion.")
        state[name] = value.clone()
    torch.save(state, folder / "pytorch_custom_diffusion_weights.pt")
    dim = pipe.text_encoder.config.hidden_size
    torch.save({"<new1>": torch.randn(dim, generator=g)}, folder / "<new1>.bin")


def build_laion(base, root: Path, rng: np.random.Generator, seed: int):
    """LAION-like candidates: images + captions, then their arrays by the public path a user's own candidates
    take (utils.candidate_arrays, as data/encode_candidates.py)."""
    images_dir = root / "laion_subset" / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for i in range(N_LAION):
        draw_image(rng).save(images_dir / f"{i:06d}.png")
    (root / "laion_subset" / "captions.txt").write_text("\n".join(CAPTIONS[:N_LAION]) + "\n")
    encode_candidates(base, images_dir, root / "laion_subset" / "captions.txt", root, seed=seed)


def build(out: Path, seed: int = 0, fisher_samples: int = 48) -> dict:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(seed)
    sd_dir, root = out / "sd-tiny", out / "abc"
    pipe = build_base_model(sd_dir, seed)
    base = load_base_model(str(sd_dir), "cpu")  # as the scripts load it
    build_laion(base, root, rng, seed)
    tests = {name: [] for name in ("test_artchive", "test_bamfg", "test_observed_imagenet",
                                   "test_unobserved_imagenet")}
    tasks = []
    for m, (test_case, family, cls, train_prompt, prompts) in enumerate(MODELS):
        exemplars = []
        for i in range(N_EXEMPLARS):
            rel = f"exemplar/{family}/{cls}/{i:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            draw_image(rng).save(root / rel)
            exemplars.append(f"dataset/{rel}")
        synth = []
        for i, prompt in enumerate(prompts):
            rel = f"synth/{family}/gpt/{cls}/samples/{i:05d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            draw_image(rng, (16, 16)).save(root / rel)
            synth.append(f"dataset/{rel}")
            tasks.append({"synth_image_path": rel, "prompt": prompt, "test_case": test_case,
                          "test_case_ind": len(tests[test_case]), "model_path": f"models/{family}/{cls}",
                          "train_prompt": train_prompt, "category": "art" if family == "artchive" else "fish"})
        tests[test_case].append({"exemplar": exemplars, "synth": {"gpt": synth}, "class_id": cls,
                                 "category": None if family == "artchive" else "fish"})
        save_custom_model(pipe, root / "models" / family / cls, rng, processor_keys=(m % 2 == 1), seed=seed + 1 + m)
    (root / "json").mkdir(parents=True, exist_ok=True)
    for name, entries in tests.items():
        save_json(root / "json" / f"{name}.json", entries)
    save_json(out / "tasks.json", tasks)

    config = FisherConfig(laion_subset_size=N_LAION, num_samples=fisher_samples, batch_size=8, weight_selection="all",
                          seed=seed)
    write_fisher(base, LaionCandidates(root, N_LAION), root / "sd_fisher.pt", config, "cpu")
    return {"sd_version": str(sd_dir), "dataroot": str(root), "task_json": str(out / "tasks.json")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/tiny_abc", help="output folder (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = build(Path(args.out), args.seed)
    print("built the tiny benchmark; pass these to the scripts:\n"
          f"  --sd_version {paths['sd_version']} --dataroot {paths['dataroot']} --task_json {paths['task_json']}")


if __name__ == "__main__":
    main()
