"""Custom Diffusion fine-tuning on CPU, saved in the AbC model format.

As in Custom Diffusion (Kumari et al., CVPR 2023): only the cross-attention K and V projections of the
UNet and the embedding of a new token `<new1>` are trained, on the exemplars captioned with the
customization prompt, while a prior-preservation loss on images of the same class (captioned with the
class prompt) keeps the model from forgetting the class. The output folder holds `<new1>.bin`
({"<new1>": tensor[D]}) and `pytorch_custom_diffusion_weights.pt` (UNet parameter names), exactly what
the repo's scripts load for a real AbC model.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from utils.io import save_torch
from utils.customization import CONCEPT_FILE, CONCEPT_TOKEN, CUSTOM_WEIGHTS_FILE
from utils.encoders import encode_images
from utils.weights import select_parameter_names


@dataclass
class CustomizationConfig:
    steps: int = 250
    batch_size: int = 8  # exemplar images per step (with repeats); as many prior images
    lr: float = 1e-3  # K/V weights
    token_lr: float = 1e-2  # the <new1> embedding
    prior_weight: float = 1.0
    init_token: Optional[str] = None  # word whose embedding <new1> starts from (default: the mean embedding)
    seed: int = 0
    device: str = "cpu"  # where `base` lives; random draws stay on the CPU, so results repeat across devices


def customize(base, exemplars: torch.Tensor, train_prompt, prior_images: torch.Tensor, prior_captions: List[str],
              out_dir, config: CustomizationConfig = CustomizationConfig(), keep: Optional[Sequence[int]] = None,
              resample: Optional[Tuple[float, int]] = None) -> dict:
    """Fine-tune `base` (utils.models.BaseModel, changed in place: restore it afterwards) and save the model.

    exemplars / prior_images: [n, 3, R, R] in [-1, 1]. train_prompt: one caption for every exemplar, or a list
    with one per exemplar. Returns {"losses": per-step exemplar losses (NaN without exemplars),
    "prior_losses": per-step prior losses}.

    `keep`: train on these exemplars only (the counterfactual models of data/mini_abc_build/counterfactual.py),
    coupled to the run on all of them: every random draw is the same (latent samples, noise, timesteps, flips,
    prior batches), except that a batch slot drawing a left-out exemplar draws again among the kept ones from a
    stream of its own; with none kept only the prior-preservation term trains. Each slot is still uniform over the
    kept exemplars, and two such runs differ by the left-out exemplar, not by the training's luck.

    `resample=(share, stream)`: the *null* counterpart of leaving an exemplar out. Each batch slot draws again,
    with probability `share`, uniformly over the kept exemplars, from a generator seeded by (seed, 2, stream);
    every exemplar's expected exposure is unchanged, while about as many slots change as leaving one of n out
    changes when share = 1/n. Its loss change is what a leave-one-out effect owes to perturbing the training alone
    (docs/counterfactual.md, "Is the truth the exemplar's?").
    """
    unet, text_encoder, tokenizer, scheduler = base.unet, base.text_encoder, base.tokenizer, base.scheduler
    if CONCEPT_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens(CONCEPT_TOKEN)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    token_id = tokenizer.convert_tokens_to_ids(CONCEPT_TOKEN)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        if config.init_token:
            init_ids = tokenizer(config.init_token, add_special_tokens=False).input_ids
            table[token_id] = table[init_ids].mean(0)
        else:
            table[token_id] = table[:token_id].mean(0)

    g = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    ex_latents = encode_images(base.vae, exemplars, g, batch_size=len(exemplars))  # one batch each: one draw
    prior_latents = encode_images(base.vae, prior_images, g, batch_size=len(prior_images))
    ids = lambda prompts: tokenizer(prompts, max_length=tokenizer.model_max_length, padding="max_length",  # noqa: E731
                                    truncation=True, return_tensors="pt").input_ids
    device = torch.device(config.device)
    ex_latents, prior_latents = ex_latents.to(device), prior_latents.to(device)
    prompts = [train_prompt] * len(exemplars) if isinstance(train_prompt, str) else list(train_prompt)
    if len(prompts) != len(exemplars):
        raise ValueError(f"{len(prompts)} captions for {len(exemplars)} exemplars")
    ex_ids = ids(prompts).to(device)
    prior_ids = ids(prior_captions).to(device)

    names = select_parameter_names(unet, "cross-attn-kv")  # what Custom Diffusion trains
    params = dict(unet.named_parameters())
    for n, p in unet.named_parameters():
        p.requires_grad_(n in names)
    text_encoder.requires_grad_(False)
    table.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [params[n] for n in names], "lr": config.lr},
                             {"params": [table], "lr": config.token_lr}], weight_decay=0.0)
    frozen_rows = table.detach().clone()
    alphas = scheduler.alphas_cumprod.to(device)

    def loss_of(latents, token_ids, compute: bool = True):
        """The batch's loss (None when not `compute`: its random draws are made all the same)."""
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, len(alphas), (len(latents),), generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        x = latents.flip(-1) if rng.random() < 0.5 else latents
        if not compute:
            return None
        pred = unet(a.sqrt() * x + (1 - a).sqrt() * noise, t, text_encoder(token_ids)[0]).sample
        return F.mse_loss(pred, noise)

    kept = np.arange(len(exemplars)) if keep is None else np.asarray(sorted(keep), dtype=np.int64)
    left_out = np.setdiff1d(np.arange(len(exemplars)), kept)
    redraw = np.random.default_rng([config.seed, 1])  # only left-out slots draw from it: the rest stay aligned
    null = np.random.default_rng([config.seed, 2, resample[1]]) if resample else None
    losses, prior_losses = [], []
    for _ in range(config.steps):
        ex_idx = rng.integers(0, len(ex_latents), config.batch_size)
        pr_idx = rng.integers(0, len(prior_latents), config.batch_size)
        out = np.isin(ex_idx, left_out)
        if out.any() and len(kept):
            ex_idx[out] = kept[redraw.integers(0, len(kept), int(out.sum()))]
        if null is not None and len(kept):
            again = null.random(len(ex_idx)) < resample[0]
            ex_idx[again] = kept[null.integers(0, len(kept), int(again.sum()))]
        ex_loss = loss_of(ex_latents[ex_idx], ex_ids[ex_idx], compute=len(kept) > 0)
        pr_loss = loss_of(prior_latents[pr_idx], prior_ids[pr_idx])
        opt.zero_grad(set_to_none=True)
        (config.prior_weight * pr_loss if ex_loss is None else ex_loss + config.prior_weight * pr_loss).backward()
        opt.step()
        with torch.no_grad():  # only the <new1> row of the embedding table may move
            keep = torch.ones(len(table), dtype=torch.bool, device=table.device)
            keep[token_id] = False
            table[keep] = frozen_rows[keep]
        losses.append(float("nan") if ex_loss is None else ex_loss.item())
        prior_losses.append(pr_loss.item())
    unet.requires_grad_(False)
    table.requires_grad_(False)

    out_dir = Path(out_dir)
    save_torch(out_dir / CUSTOM_WEIGHTS_FILE, {n: params[n].detach().cpu().clone() for n in names})
    save_torch(out_dir / CONCEPT_FILE, {CONCEPT_TOKEN: table[token_id].detach().cpu().clone()})
    return {"losses": losses, "prior_losses": prior_losses}
