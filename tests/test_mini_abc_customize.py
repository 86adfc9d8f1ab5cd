"""Custom Diffusion fine-tuning of the mini-AbC builder, on the tiny test model."""
from pathlib import Path

import numpy as np
import torch

from data.mini_abc_build.customize import CustomizationConfig, customize
from utils.data import ExemplarCandidates, load_exemplar_images
from utils.losses import collect_losses
from utils.customization import apply_customization
from utils.encoders import encode_images, encode_prompt
from utils.models import load_base_model
from utils.weights import PristineWeights, select_parameter_names


def test_customization_trains_only_kv_and_the_token_and_saves_the_abc_format(tiny_abc, tmp_path):
    root = Path(tiny_abc["dataroot"])
    base = load_base_model(tiny_abc["sd_version"], "cpu")
    exemplar_paths = sorted((root / "exemplar" / "imagenet").rglob("*.png"))
    exemplars = load_exemplar_images(exemplar_paths, base.resolution)[:len(exemplar_paths)]
    prior_paths = sorted((root / "laion_subset" / "images").glob("*.png"))[:6]
    prior = load_exemplar_images(prior_paths, base.resolution)[:6]
    captions = (root / "laion_subset" / "captions.txt").read_text().splitlines()[:6]
    before = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
    text_before = {n: p.detach().clone() for n, p in base.text_encoder.named_parameters()}

    def exemplar_loss(model):
        latents = encode_images(model.vae, exemplars, torch.Generator().manual_seed(0))
        cands = ExemplarCandidates(latents, encode_prompt(model.tokenizer, model.text_encoder, "<new1> fish"))
        return collect_losses(model.unet, model.scheduler, cands, batch_size=40, time_samples=10).mean()

    result = customize(base, exemplars, "<new1> fish", prior, captions, tmp_path / "model",
                       CustomizationConfig(steps=60, batch_size=4, lr=3e-3, token_lr=3e-2, init_token="fish"))
    assert len(result["losses"]) == 60
    changed = {n for n, p in base.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(select_parameter_names(base.unet, "cross-attn-kv"))
    table = base.text_encoder.get_input_embeddings().weight
    table_name = next(n for n, p in base.text_encoder.named_parameters() if p is table)
    text_changed = {n for n, p in base.text_encoder.named_parameters()
                    if p.shape != text_before[n].shape or not torch.equal(p, text_before[n])}
    assert text_changed == {table_name}  # the table grew by the <new1> row, and only that row is new
    assert torch.equal(table[:-1], text_before[table_name])

    # the saved folder loads through the same code as a real AbC model, and the model fits its exemplars better
    fresh = load_base_model(tiny_abc["sd_version"], "cpu")
    assert "<new1>" not in fresh.tokenizer.get_vocab()
    loaded = apply_customization(fresh, PristineWeights(fresh.unet), tmp_path / "model")
    assert len(loaded) == len(select_parameter_names(fresh.unet, "cross-attn-kv"))
    tuned = exemplar_loss(fresh)
    fresh_base = load_base_model(tiny_abc["sd_version"], "cpu")  # untuned, <new1> = its initial embedding
    fresh_base.tokenizer.add_tokens("<new1>")
    fresh_base.text_encoder.resize_token_embeddings(len(fresh_base.tokenizer), mean_resizing=False)
    with torch.no_grad():
        ids = fresh_base.tokenizer("fish", add_special_tokens=False).input_ids
        emb = fresh_base.text_encoder.get_input_embeddings().weight
        emb[-1] = emb[ids].mean(0)
    assert tuned < exemplar_loss(fresh_base)
    assert np.isfinite(result["prior_losses"]).all()


def test_a_coupled_subset_run_shares_the_full_runs_draws(tiny_abc, tmp_path):
    """customize(keep=...): with every exemplar kept it is the plain run bit for bit; with one left out its batches
    are the full run's except the slots that drew it; with none kept only the prior term trains (exemplar loss NaN)
    and the K/V still move. customize(resample=...): the null runs."""
    root = Path(tiny_abc["dataroot"])
    exemplar_paths = sorted((root / "laion_subset" / "images").glob("*.png"))[6:9]
    exemplars = load_exemplar_images(exemplar_paths, 32)[:3]
    prior_paths = sorted((root / "laion_subset" / "images").glob("*.png"))[:6]
    prior = load_exemplar_images(prior_paths, 32)[:6]
    captions = (root / "laion_subset" / "captions.txt").read_text().splitlines()[:6]
    config = CustomizationConfig(steps=6, batch_size=4, lr=3e-3, token_lr=3e-2)

    def run(keep, name, resample=None):
        base = load_base_model(tiny_abc["sd_version"], "cpu")
        result = customize(base, exemplars, ["<new1> fish"] * 3, prior, captions, tmp_path / name, config, keep=keep,
                           resample=resample)
        return result, torch.load(tmp_path / name / "pytorch_custom_diffusion_weights.pt")

    plain, w_plain = run(None, "plain")
    every, w_every = run([0, 1, 2], "every")
    assert plain == every and all(torch.equal(w_plain[k], w_every[k]) for k in w_plain)
    one_out, w_one_out = run([0, 2], "one_out")
    assert np.isfinite(one_out["losses"]).all() and one_out["losses"] != plain["losses"]
    assert one_out["prior_losses"][0] == plain["prior_losses"][0]  # the same draws until the weights differ
    none, w_none = run([], "none")
    assert np.isnan(none["losses"]).all() and np.isfinite(none["prior_losses"]).all()
    assert none["prior_losses"][0] == plain["prior_losses"][0]
    assert any(not torch.equal(w_none[k], w_plain[k]) for k in w_plain)
    # a null run: nothing resampled is the plain run; a share resampled changes the exemplar batches only
    assert run(None, "null_0", resample=(0.0, 0))[0] == plain
    null, _ = run(None, "null_half", resample=(0.5, 0))
    assert null["losses"] != plain["losses"] and null["prior_losses"][0] == plain["prior_losses"][0]
    assert run(None, "null_half_other", resample=(0.5, 1))[0]["losses"] != null["losses"]  # another stream
