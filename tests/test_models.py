import pytest
import torch

from utils.errors import InputError
from utils.customization import (apply_customization, load_concept_embedding, load_custom_diffusion_weights,
                                 to_unet_parameter_name)
from utils.encoders import encode_prompt
from utils.weights import PristineWeights


def unet_output(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10, 500]), text).sample


def test_processor_key_names_map_to_unet_names():
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight"
    assert to_unet_parameter_name(key) == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_custom_diffusion.0.bias"
    assert to_unet_parameter_name(key) == "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.bias"
    assert to_unet_parameter_name("unet.a.attn2.to_v.weight") == "a.attn2.to_v.weight"


@pytest.mark.parametrize("model", ["imagenet/n01440764_0000", "artchive/tinyartist"])  # UNet / processor keys
def test_custom_weights_load_perturbed_values_under_both_key_styles(base_model, tiny_abc, model):
    folder = f"{tiny_abc['dataroot']}/models/{model}"
    state = torch.load(f"{folder}/pytorch_custom_diffusion_weights.pt")
    assert any("processor" in k for k in state) == (model.startswith("artchive"))
    before = unet_output(base_model)
    pristine = PristineWeights(base_model.unet)
    loaded = load_custom_diffusion_weights(base_model.unet, folder, pristine)
    params = dict(base_model.unet.named_parameters())
    assert len(loaded) == len(state) == 8
    for key, value in state.items():
        assert torch.equal(params[to_unet_parameter_name(key)], value)
    after = unet_output(base_model)
    assert (after - before).abs().max() > 1e-3  # the model really changed
    pristine.restore()
    assert torch.equal(unet_output(base_model), before)  # and the base comes back exactly


def test_bad_custom_weights_fail_loudly(base_model, tmp_path):
    with pytest.raises(InputError, match="holds no customized model"):
        load_custom_diffusion_weights(base_model.unet, tmp_path)
    torch.save({"attn2.to_k.weight": torch.zeros(3)}, tmp_path / "pytorch_custom_diffusion_weights.pt")
    with pytest.raises(InputError, match="name no UNet parameter"):
        load_custom_diffusion_weights(base_model.unet, tmp_path)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    torch.save({name: torch.zeros(7, 7)}, tmp_path / "pytorch_custom_diffusion_weights.pt")
    with pytest.raises(InputError, match="do not fit the base UNet"):
        load_custom_diffusion_weights(base_model.unet, tmp_path)
    torch.save({}, tmp_path / "pytorch_custom_diffusion_weights.pt")
    with pytest.raises(InputError, match="no state dict"):
        load_custom_diffusion_weights(base_model.unet, tmp_path)


def test_concept_embedding_reloads_for_the_next_model(base_model, tiny_abc):
    """docs/method.md, pitfall 7: a second model's <new1> must replace the first one's, not fail."""
    root = tiny_abc["dataroot"]
    tok, enc = base_model.tokenizer, base_model.text_encoder
    ids = []
    for model in ("imagenet/n01440764_0000", "artchive/tinyartist"):
        ids.append(load_concept_embedding(tok, enc, f"{root}/models/{model}"))
        want = torch.load(f"{root}/models/{model}/<new1>.bin")["<new1>"]
        assert torch.equal(enc.get_input_embeddings().weight[ids[-1]], want)
    assert ids[0] == ids[1]
    assert tok("<new1> fish").input_ids[1] == ids[0]  # one token, not split into characters
    a = encode_prompt(tok, enc, "<new1> fish")
    load_concept_embedding(tok, enc, f"{root}/models/imagenet/n01440764_0000")
    assert not torch.allclose(a, encode_prompt(tok, enc, "<new1> fish"))


def test_apply_customization_resets_the_previous_model(base_model, tiny_abc):
    root = tiny_abc["dataroot"]
    pristine = PristineWeights(base_model.unet)
    apply_customization(base_model, pristine, f"{root}/models/artchive/tinyartist")
    first = unet_output(base_model)
    apply_customization(base_model, pristine, f"{root}/models/imagenet/n01440764_0000")
    apply_customization(base_model, pristine, f"{root}/models/artchive/tinyartist")
    assert torch.equal(unet_output(base_model), first)
