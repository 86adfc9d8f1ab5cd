"""Names the mini-AbC builder's stages share (data/build_mini_abc.py and the stage modules beside this file), kept
here so that no stage imports the build script and the script imports every stage (docs/mini_abc.md)."""
import re

import numpy as np
from PIL import Image

# training style set -> the word captions and prompts call it by. Four sets that differ at 32 px (flat colour,
# glossy 3D, black outlines, black and white): with seven, most of them flat colour sets, a first build's model
# ignored the style words (docs/mini_abc.md, "What did not work")
TRAINING_STYLES = {"noto": "google", "fluent-emoji": "glossy", "openmoji": "outline",
                   "fluent-emoji-high-contrast": "monochrome"}
# held out of pretraining: the artist-style test case draws its exemplars from these (the last is validation's)
HELDOUT_STYLES = ("emojione-monotone", "emojione-v1", "noto-v1", "fxemoji")
STYLE_PROMPT = "a picture in the style of <new1> art"
# a style model trains on its exemplars captioned with their objects: with the one caption above for all eight, the
# customization memorized the eight pictures and new objects kept the base model's style (docs/mini_abc.md)
STYLE_EXEMPLAR_CAPTION = "a picture of a {name} in the style of <new1> art"
STYLE_QUERY = "a picture of a {obj} in the style of <new1> art"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def duotone(img: Image.Image, dark, light) -> Image.Image:
    """Map luminance onto a two-colour ramp, keeping the white background white."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    lum = (arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None] / 255.0
    out = (1 - lum) * np.array(dark, np.float32) + lum * np.array(light, np.float32)
    background = (arr.min(axis=-1, keepdims=True) > 245)
    out = np.where(background, 255.0, out)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def train_captions(spec, names):
    """A style model's exemplars each captioned with its object (`names`: plan.json's concept names); an object
    model's one exemplar with the model's prompt."""
    if spec["category"] != "art":
        return spec["train_prompt"]
    return [STYLE_EXEMPLAR_CAPTION.format(name=names[key]) for key, _, _ in spec["exemplars"]]


class PipeAsBase:
    """The attributes apply_customization needs, taken from a diffusers pipeline."""

    def __init__(self, pipe):
        self.unet, self.tokenizer, self.text_encoder = pipe.unet, pipe.tokenizer, pipe.text_encoder
