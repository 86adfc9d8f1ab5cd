"""Image preprocessing of docs/method.md, section 3, with PIL and numpy (no torchvision).

Matches torchvision's Resize(size, BILINEAR) -> CenterCrop(size) -> ToTensor -> Normalize(0.5, 0.5):
the shorter side goes to `size`, the longer side to int(size * long / short), the crop offset is
round((extent - size) / 2), and pixels map from [0, 255] to [-1, 1].
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import InputError


def load_rgb(path) -> Image.Image:
    """An image as 8-bit RGB. Grayscale, palette, CMYK and 16-bit images are converted; transparent pixels
    are composited on white (as the emoji of mini-AbC are); an empty or unreadable file is an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"image {path} is an empty file (0 bytes); copy or download it again")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}; is it a complete image file?") from e


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16- or 32-bit grayscale: scale to 8 bits, not clip
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


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
