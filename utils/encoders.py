"""Encoding inputs: prompts through CLIP, images through the VAE (its posterior sampled with CPU noise)."""
import torch


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
