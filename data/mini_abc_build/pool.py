"""A large candidate pool for mini-AbC: every icon of every emoji set the registry allows, as mini-AbC's pictures are.

    python -m data.build_mini_abc --out data/mini_abc --stage pool      # about 10 minutes on one core, then encoding

mini-AbC's candidates (its "LAION subset") are the 1,444 pictures its base model was pretrained on. Two-stage
scoring has to be measured where the screen's errors have many more candidates to come from (docs/performance.md,
"At 20,000 candidates"), so this stage writes a second data folder, `<out>/pool/`, in the same layout:

    pool/laion_subset/images/NNNNNN.png   rows 0..1443: mini-AbC's pretraining pictures, byte for byte; then every
                                          other icon (not alias) of the 11 registry sets, set by set in registry
                                          order, icons in name order
    pool/laion_subset/captions.txt        the first 1,444 lines mini-AbC's; then captioned like them (a training
                                          style's icon names its style in 70% of captions, other sets' never: the
                                          base model has no word for them)
    pool/laion_subset/sources.json        per row: style, icon, name, key (the emoji's code points, "" if the icon
                                          is not an emoji-datasource concept)
    pool/NOTICE                           the licences of all 11 sets
    pool/{models,synth,exemplar,json,sd_fisher.pt}   links to mini-AbC's (the same test cases and models)
    pool/laion_latents.npy, laion_text_embeddings.npy   encoded by utils.candidate_arrays (derived, not committed)

Left out: a picture identical in pixels to a model's exemplar (it would be a copy of the answer among the
candidates) or to an earlier row. What was made is summarized in `<out>/pool.json` (committed: counts and digests,
so a rebuild can be checked against it). Resumable: pictures already rendered are kept, the encoding continues.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

from data.mini_abc_build import sources
from data.mini_abc_build.common import TRAINING_STYLES

POOL_DIR = "pool"
LINKED = ("models", "synth", "exemplar", "json", "sd_fisher.pt")
CAPTION_SEED = 4242  # the pool's own caption draws; the first 1,444 captions are mini-AbC's
WITH_STYLE = ("a {name} in the style of {style} art", "a picture of a {name} in the style of {style} art")
PLAIN = ("a {name}", "a picture of a {name}")
STYLE_CAPTION_SHARE = 0.7  # as mini-AbC's pretraining captions (BuildConfig.style_caption_share)


def pixel_digest(img: Image.Image) -> str:
    return hashlib.sha256(np.asarray(img.convert("RGB")).tobytes()).hexdigest()[:16]


def icon_concepts(concepts, icon_sets: Dict[str, "sources.IconSet"]) -> Dict[tuple, object]:
    """{(style, icon name): Concept} for the icons (not aliases) that draw an emoji-datasource concept. A concept
    drawn by an alias (often a flipped icon: another picture) names no icon; a plain alias's picture is its
    icon's, which the pool's pixel check finds."""
    return {(style, name): c for c in concepts for style, name in c.icons.items()
            if name in icon_sets[style].data.get("icons", {})}


def icon_name(icon: str) -> str:
    """An Iconify icon name as words: "woman-juggling-medium-skin-tone" -> "woman juggling medium skin tone"."""
    return " ".join(icon.replace("_", "-").split("-"))


def pool_caption(name: str, style: str, rng: np.random.Generator) -> str:
    """One caption, drawn as mini-AbC's pretraining captions are; only the training styles have a style word."""
    with_style = style in TRAINING_STYLES and rng.random() < STYLE_CAPTION_SHARE
    templates = WITH_STYLE if with_style else PLAIN
    return templates[int(rng.integers(len(templates)))].format(name=name, style=TRAINING_STYLES.get(style, ""))


def plan_rows(icon_sets, concepts, pretraining_rows: List[dict]) -> List[dict]:
    """The rows after mini-AbC's pretraining pictures: every icon of every set, registry order then name order,
    minus the pretraining pictures' own icons. [{style, icon, name, key}]."""
    by_icon = icon_concepts(concepts, icon_sets)
    icon_of = {(c.key, style): icon for (style, icon), c in by_icon.items()}
    taken = {(r["style"], icon_of.get((r["key"], r["style"]))) for r in pretraining_rows}
    rows = []
    for style in (s for s in sources.SETS if s in icon_sets):
        for icon in sorted(icon_sets[style].data.get("icons", {})):
            if (style, icon) in taken:
                continue
            c = by_icon.get((style, icon))
            name = (c.cldr_name or c.name) if c is not None else icon_name(icon)
            rows.append({"style": style, "icon": icon, "name": name, "key": c.key if c is not None else ""})
    return rows


def link_to_mini_abc(pool: Path) -> None:
    """pool/{models,synth,exemplar,json,sd_fisher.pt} as links to mini-AbC's (pool/../abc), kept where present.
    sd_fisher.pt may not be derived yet (--stage derive): its link resolves once it is."""
    for name in LINKED:
        link = pool / name
        if not link.is_symlink() and not link.exists():
            os.symlink(Path("..") / "abc" / name, link)


def write_pool_pictures(out: Path, icon_sets, concepts, size: int) -> dict:
    """Render and caption the pool under out/pool (pictures, captions.txt, sources.json, NOTICE, links), from the
    read icon sets and concepts (sources.read_sets / load_concepts). Pictures already there are read, not rendered
    again. Returns {"n_images", "first_rows", "per_style", "dropped"}. Raises RuntimeError when mini-AbC's data stage
    has not run."""
    from tqdm.auto import tqdm

    from utils.io import atomic_write, save_json

    root, pool = out / "abc", out / POOL_DIR
    src_images = sorted((root / "laion_subset" / "images").glob("*.png"))
    if not src_images:
        raise RuntimeError(f"{root / 'laion_subset' / 'images'} holds no pictures: run the data stage first")
    pretraining_rows = json.loads((root / "laion_subset" / "sources.json").read_text())
    captions = (root / "laion_subset" / "captions.txt").read_text().splitlines()
    images_dir = pool / "laion_subset" / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(src_images):  # the first rows: mini-AbC's own files, byte for byte
        target = images_dir / f"{i:06d}.png"
        if not target.is_file():
            shutil.copyfile(path, target)
    seen = {pixel_digest(Image.open(p)) for p in src_images}
    answers = {pixel_digest(Image.open(p)) for p in sorted((root / "exemplar").rglob("*.png"))}
    rng = np.random.default_rng(CAPTION_SEED)
    dropped_file = pool / "laion_subset" / "dropped.json"  # icons decided against: a rerun need not render them
    dropped_icons = json.loads(dropped_file.read_text()) if dropped_file.is_file() else {}
    kept, rows_out = [], [dict(r, icon=None) for r in pretraining_rows]
    for row in tqdm(plan_rows(icon_sets, concepts, pretraining_rows), desc="rendering the pool", unit="icon"):
        caption = pool_caption(row["name"], row["style"], rng)  # drawn for every icon: captions do not shift
        name = f"{row['style']}/{row['icon']}"
        if name in dropped_icons:
            continue
        target = images_dir / f"{len(rows_out):06d}.png"
        img = Image.open(target) if target.is_file() else sources.rasterize(icon_sets[row["style"]].svg(row["icon"]),
                                                                            size)
        digest = pixel_digest(img)
        if digest in answers or digest in seen:
            dropped_icons[name] = "same as an exemplar" if digest in answers else "same as an earlier row"
            save_json(dropped_file, dropped_icons)
            continue
        if not target.is_file():
            atomic_write(target, lambda f: img.save(f, format="PNG"))
        seen.add(digest)
        kept.append(caption)
        rows_out.append(row)
    dropped = {reason: sum(v == reason for v in dropped_icons.values())
               for reason in ("same as an exemplar", "same as an earlier row")}
    for stale in sorted(images_dir.glob("*.png"))[len(rows_out):]:  # a changed plan left extra files
        stale.unlink()
    atomic_write(pool / "laion_subset" / "captions.txt", lambda f: f.write("\n".join(captions + kept) + "\n"),
                 binary=False)
    save_json(pool / "laion_subset" / "sources.json", rows_out)
    sources.write_notice(pool / "NOTICE", icon_sets)
    link_to_mini_abc(pool)
    return {"n_images": len(rows_out), "first_rows": len(src_images),
            "per_style": {s: sum(r["style"] == s for r in rows_out) for s in sources.SETS}, "dropped": dropped}


def build_pool(out: Path, cache: Path, size: int, base_model_dir: Path, device: str = "cpu") -> dict:
    """The stage: fetch the pinned packages, write the pictures (write_pool_pictures), encode them with the base
    model (utils.candidate_arrays), and write the summary out/pool.json. Returns the summary."""
    from utils.candidate_arrays import encode_candidates
    from utils.io import save_json
    from utils.models import load_base_model

    t0 = time.time()
    pkg_dirs = sources.fetch_packages(cache / "npm")
    icon_sets = sources.read_sets(pkg_dirs)
    concepts = sources.load_concepts(pkg_dirs, min_styles=1, drop_whole_concept=False)  # checks the licences
    made = write_pool_pictures(out, icon_sets, concepts, size)
    rendered = time.time() - t0
    pool = out / POOL_DIR
    record = encode_candidates(load_base_model(str(base_model_dir), device), pool / "laion_subset" / "images",
                               pool / "laion_subset" / "captions.txt", pool, batch_size=256)
    summary = {"command": "python -m data.build_mini_abc --out data/mini_abc --stage pool", **made,
               "images": record.get("images"), "captions": record.get("captions"), "caption_seed": CAPTION_SEED,
               "render_seconds": round(rendered), "encode_seconds": round(time.time() - t0 - rendered)}
    save_json(out / "pool.json", summary)
    print(f"pool: {made['n_images']} pictures ({made['first_rows']} of mini-AbC's first), dropped {made['dropped']}; "
          f"{rendered:.0f} s rendering, {time.time() - t0 - rendered:.0f} s encoding -> {pool}", flush=True)
    return summary
