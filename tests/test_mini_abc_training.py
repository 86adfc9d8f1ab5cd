"""The mini-AbC builder's base-model training on a very small configuration."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from data.mini_abc_build.sampling import load_pipeline, sample, save_grid, to_pil
from data.mini_abc_build.tokenizer import bytes_to_unicode, write_clip_vocab
from data.mini_abc_build.train_base import BaseModelConfig, train_base_model
from utils.models import load_base_model
from utils.transforms import to_model_input


def toy_images():
    """Red circles and blue squares on white, 16 px, with their captions."""
    images, captions = [], []
    rng = np.random.default_rng(0)
    for i in range(16):
        img = Image.new("RGB", (16, 16), "white")
        d = ImageDraw.Draw(img)
        x, y = rng.integers(1, 5, 2)
        if i % 2:
            d.ellipse([int(x), int(y), int(x) + 10, int(y) + 10], fill=(220, 30, 30))
            captions.append("a red circle")
        else:
            d.rectangle([int(x), int(y), int(x) + 10, int(y) + 10], fill=(30, 30, 220))
            captions.append("a blue square")
        images.append(to_model_input(img))
    return torch.stack(images), captions


def test_bytes_to_unicode_is_a_bijection_onto_printables():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"


def test_clip_vocab_layout(tmp_path):
    import gzip

    merges = ["#version", "a b", "ab c", "h i</w>"]
    bpe = tmp_path / "bpe.txt.gz"
    with gzip.open(bpe, "wt") as f:
        f.write("\n".join(merges))
    folder = write_clip_vocab(bpe, tmp_path / "tok")
    vocab = json.loads((folder / "vocab.json").read_text())
    assert vocab["a"] < 256 and vocab["a</w>"] == vocab["a"] + 256
    assert vocab["ab"] == 512 and vocab["abc"] == 513 and vocab["hi</w>"] == 514
    assert vocab["<|startoftext|>"] == 515 and vocab["<|endoftext|>"] == 516
    assert (folder / "merges.txt").read_text().splitlines()[1:] == merges[1:]


@pytest.fixture(scope="module")
def toy_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tok")
    words = ["a", "red", "circle", "blue", "square"]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for w in words:  # merge each word left to right into one token
        tok = w[0]
        for ch in w[1:-1]:
            merges.append(f"{tok} {ch}")
            tok += ch
        if len(w) > 1:
            merges.append(f"{tok} {w[-1]}</w>")
    for m in merges:
        if m.replace(" ", "") not in vocab:
            vocab.append(m.replace(" ", ""))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    assert tok.convert_ids_to_tokens(tok("a red circle").input_ids)[1:-1] == ["a</w>", "red</w>", "circle</w>"]
    return tok


def test_base_model_trains_saves_and_loads(toy_tokenizer, tmp_path):
    images, captions = toy_images()
    config = BaseModelConfig(image_size=16, vae_channels=(16, 16), unet_channels=(32, 32), text_hidden=32,
                             text_layers=1, text_heads=2, vae_steps=80, vae_batch_size=16, vae_lr=2e-3,
                             diffusion_steps=120, diffusion_batch_size=16, diffusion_lr=1e-3, log_every=20)
    result = train_base_model(images, captions, toy_tokenizer, tmp_path / "sd", config)
    vae_log, diffusion_log = result["vae"].entries, result["diffusion"].entries
    assert vae_log[-1]["loss"] < 0.5 * vae_log[0]["loss"]
    assert diffusion_log[-1]["loss"] < diffusion_log[0]["loss"]
    logged = json.loads((tmp_path / "sd" / "training_log.json").read_text())
    assert logged["scaling_factor"] == result["scaling_factor"] > 0 and len(logged["diffusion"]) == 6

    base = load_base_model(str(tmp_path / "sd"), "cpu")  # what the repo's scripts will do with --sd_version
    assert base.resolution == 16 and base.vae.config.scaling_factor == result["scaling_factor"]
    pipe = load_pipeline(tmp_path / "sd")
    imgs = sample(pipe, ["a red circle", "a blue square"], seed=0, steps=5)
    assert [im.size for im in imgs] == [(16, 16), (16, 16)]
    again = sample(pipe, ["a red circle"], seed=0, steps=5)
    assert np.array_equal(np.asarray(again[0]), np.asarray(imgs[0]))
    grid = save_grid(tmp_path / "grid.png", [[to_pil(images[0])] + imgs], ["toy"], tile=32)
    assert Image.open(grid).size[1] == 34
