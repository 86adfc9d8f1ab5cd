"""An AbC-layout benchmark around a randomly initialized model of Stable Diffusion v1.4's exact shapes.

    python -m benchmarks.sd_shaped --out /tmp/sd_shaped --images 200            # SD v1.4 shapes (GPU timing)
    python -m benchmarks.sd_shaped --out /tmp/sd_shaped --images 12 --scale tiny  # the same layout, tiny (CPU)
    python -m benchmarks.sd_shaped --out /tmp/attn16 --images 12 --scale attn16   # tiny, attention at 16 x 16

Speed does not depend on the weights, so the CLIs themselves (both stages, exact and two-stage, every
--precision and --compile) can be timed on it where the real SD weights cannot be downloaded: writes
<out>/sd (a diffusers pipeline folder: UNet, VAE, CLIP text encoder with CLIP's real vocabulary from
data/mini_abc/sd-mini, SD's scheduler), <out>/abc (random LAION latents and caption embeddings, one customized
model, its exemplars and two queries at the model's resolution, a Fisher) and <out>/tasks.json.
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

from benchmarks.runner import write_random_candidates
from utils.io import save_json
from utils.weights import select_parameter_names

TOKENIZER = REPO / "data" / "mini_abc" / "sd-mini" / "tokenizer"


def build_pipeline(out: Path, scale: str):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    if scale == "sd14":  # SD v1.4: UNet2DConditionModel's defaults at 64 x 64 with CLIP ViT-L/14's width
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512, scaling_factor=0.18215)
        text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77)
    else:  # tiny: attention at 8 x 8 latents; attn16: at 16 x 16 (the CPU timing fixture of the heap policies)
        unet = UNet2DConditionModel(sample_size=8 if scale == "tiny" else 16, block_out_channels=(32, 64),
                                    layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16,
                            sample_size=16)
        text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=77)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    return pipe


def build_data(root: Path, pipe, n_images: int) -> list:
    rng = np.random.default_rng(0)
    latent = pipe.unet.config.sample_size
    resolution = latent * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    width = pipe.text_encoder.config.hidden_size
    root.mkdir(parents=True, exist_ok=True)
    write_random_candidates(root, n_images, latent, width, rng)

    def picture(rel):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(root / rel)
        return rel

    exemplars = [picture(f"exemplar/sd/model/{i:03d}.png") for i in range(3)]
    queries = [picture(f"synth/sd/gpt/model/samples/{i:05d}.png") for i in range(2)]
    params = dict(pipe.unet.named_parameters())
    names = select_parameter_names(pipe.unet, "cross-attn-kv")
    g = torch.Generator().manual_seed(0)
    model = root / "models" / "sd" / "model"
    model.mkdir(parents=True, exist_ok=True)
    torch.save({n: params[n].detach() + 0.1 * params[n].detach().std() * torch.randn(params[n].shape, generator=g)
                for n in names}, model / "pytorch_custom_diffusion_weights.pt")
    torch.save({"<new1>": torch.randn(width, generator=g)}, model / "<new1>.bin")
    torch.save({n: torch.rand(params[n].shape, generator=g) * 1e-6 + 1e-8 for n in names}, root / "sd_fisher.pt")
    save_json(root / "json" / "test_sd.json", [{"exemplar": [f"dataset/{e}" for e in exemplars],
                                                "synth": {"gpt": [f"dataset/{q}" for q in queries]},
                                                "class_id": "model", "category": "thing"}])
    return [{"synth_image_path": q, "prompt": f"a photo of a <new1> thing number {i}", "test_case": "test_sd",
             "test_case_ind": 0, "model_path": "models/sd/model", "train_prompt": "<new1> thing", "category": "thing"}
            for i, q in enumerate(queries)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=200, help="LAION-like candidates (each also flipped)")
    p.add_argument("--scale", default="sd14", choices=["sd14", "tiny", "attn16"])
    args = p.parse_args()
    out = Path(args.out)
    pipe = build_pipeline(out / "sd", args.scale)
    tasks = build_data(out / "abc", pipe, args.images)
    save_json(out / "tasks.json", tasks)
    print(f"built {out}: --sd_version {out / 'sd'} --dataroot {out / 'abc'} --task_json {out / 'tasks.json'} "
          f"--laion_subset_size {args.images}")


if __name__ == "__main__":
    main()
