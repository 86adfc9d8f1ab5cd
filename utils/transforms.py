"""Image preprocessing of docs/method.md, section 3, with PIL and numpy (no torchvision).

Matches torchvision's Resize(size, BILINEAR) -> CenterCrop(size) -> ToTensor -> Normalize(0.5, 0.5):
the shorter side goes to `size`, the longer side to int(size * long / short), the crop offset is
round((extent - size) / 2), and pixels map from [0, 255] to [-1, 1].
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .io import InputError


def load_rgb(path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as e:
        raise InputError(f"cannot read image {path}: {e}") from e


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_model_input(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def load_image_tensor(path, size: int, flip: bool = False) -> torch.Tensor:
    img = resize_center_crop(load_rgb(path), size)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_model_input(img)
