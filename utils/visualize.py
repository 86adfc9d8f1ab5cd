"""The query followed by its top-10 candidates, each labelled with its influence; exemplars outlined in red."""
from pathlib import Path
from typing import List

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .io import atomic_write
from .transforms import load_rgb, resize_center_crop

TILE = 192
LABEL_HEIGHT = 22
RED = (220, 20, 20)


def _tile(path, label: str, outline: bool, font) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE + LABEL_HEIGHT), "white")
    try:
        tile.paste(resize_center_crop(load_rgb(path), TILE), (0, 0))
    except Exception:  # a missing picture must not cost the results it illustrates
        ImageDraw.Draw(tile).text((8, TILE // 2), "image missing", fill="black", font=font)
    draw = ImageDraw.Draw(tile)
    if outline:
        draw.rectangle([0, 0, TILE - 1, TILE - 1], outline=RED, width=5)
    draw.text((4, TILE + 4), label, fill=RED if outline else "black", font=font)
    return tile


def save_top_k_figure(out_path, query_path, influence: np.ndarray, rank: np.ndarray,
                      exemplar_paths: List[Path], laion_paths: List[Path], k: int = 10) -> Path:
    font = ImageFont.load_default(size=14)
    n_ex = len(exemplar_paths)
    tiles = [_tile(query_path, "query", False, font)]
    for idx in rank[:k]:
        idx = int(idx)
        is_exemplar = idx < n_ex
        path = exemplar_paths[idx] if is_exemplar else (
            laion_paths[idx - n_ex] if idx - n_ex < len(laion_paths) else None)
        name = f"exemplar {idx}" if is_exemplar else f"LAION {idx - n_ex}"
        tiles.append(_tile(path, f"{name}: {influence[idx]:.2e}", is_exemplar, font))
    gap = 6
    canvas = Image.new("RGB", (len(tiles) * (TILE + gap) - gap, TILE + LABEL_HEIGHT), "white")
    for i, t in enumerate(tiles):
        canvas.paste(t, (i * (TILE + gap), 0))
    fmt = "JPEG" if str(out_path).lower().endswith((".jpg", ".jpeg")) else "PNG"
    return atomic_write(out_path, lambda f: canvas.save(f, format=fmt))


def image_grid(rows: List[List[Image.Image]], labels: List[str], tile: int = 64, gap: int = 2,
               font_size: int = 12) -> Image.Image:
    """Rows of images (each scaled to `tile` px, nearest neighbour so small pixels stay visible), each row labelled
    on its left, `gap` px apart; an empty slot (None) stays white."""
    font = ImageFont.load_default(size=font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + max(int(probe.textlength(label, font=font)) for label in labels)
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + cols * (tile + gap), len(rows) * (tile + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (images, label) in enumerate(zip(rows, labels)):
        y = r * (tile + gap)
        draw.text((4, y + tile // 2 - font_size // 2), label, fill="black", font=font)
        for c, img in enumerate(images):
            if img is not None:
                grid.paste(img.convert("RGB").resize((tile, tile), Image.NEAREST), (label_w + c * (tile + gap), y))
    return grid


def save_sample_grid(out_path, rows: List[List[Image.Image]], labels: List[str], tile: int = 96) -> Path:
    """image_grid at `tile` px, 4 px apart, written atomically as PNG."""
    grid = image_grid(rows, labels, tile=tile, gap=4, font_size=13)
    return atomic_write(out_path, lambda f: grid.save(f, format="PNG"))
