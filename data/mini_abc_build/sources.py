"""The three emoji sources of mini-AbC: fetching, matching concepts across them, rasterizing.

Three emoji sets drawn independently by different designers give the same concepts in distinct
styles:

* ``emoji-datasource-google@16.0.0``  -- Google Noto Color Emoji, 64 px PNGs (``img/google/64/``);
* ``emoji-datasource-twitter@16.0.0`` -- Twemoji, 64 px PNGs (``img/twitter/64/``);
* ``openmoji@17.0.0``                 -- OpenMoji SVGs (``color/svg/<HEXCODE>.svg``) with a per-emoji
  author in ``data/openmoji.csv``.

A concept is keyed by its code points with U+FE0F (the emoji presentation selector) removed,
lower-case hex joined by ``-`` (``"2764-fe0f-200d-1f525"`` -> ``"2764-200d-1f525"``): the
emoji-datasource ``image`` names and the OpenMoji ``hexcode`` disagree on FE0F for the same emoji,
and dropping it makes them agree.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image

PACKAGES = {
    "emoji-datasource-google": "16.0.0",
    "emoji-datasource-twitter": "16.0.0",
    "openmoji": "17.0.0",
}

# Where each emoji-datasource package keeps its 64 px PNGs, and the emoji.json flag saying the
# image exists.
_DATASOURCE_IMAGES = {
    "google": ("img/google/64", "has_img_google"),
    "twitter": ("img/twitter/64", "has_img_twitter"),
}


# --------------------------------------------------------------------------------------------
# fetching


def _installed_version(pkg_dir: Path) -> str | None:
    try:
        return json.loads((pkg_dir / "package.json").read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        return None


def fetch_packages(cache_dir) -> dict[str, Path]:
    """Install the three emoji packages at their pinned versions under ``cache_dir``.

    Skips npm when all three are already there at the right versions. Returns
    ``{package name: cache_dir/node_modules/<package>}``. Raises ``RuntimeError`` naming the
    command and what to install when npm is missing or fails.
    """
    cache_dir = Path(cache_dir)
    dirs = {name: cache_dir / "node_modules" / name for name in PACKAGES}
    if all(_installed_version(dirs[n]) == v for n, v in PACKAGES.items()):
        return dirs

    # All three in one call: `npm install --no-save X` into a prefix prunes packages not listed in
    # it, so installing only the missing one would delete the others.
    cmd = ["npm", "install", "--prefix", str(cache_dir), "--no-save", "--ignore-scripts",
           "--no-audit", "--no-fund"] + [f"{n}@{v}" for n, v in PACKAGES.items()]
    shown = " ".join(cmd)
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"npm was not found on PATH; it is needed to run `{shown}`. Install Node.js with npm "
            "(Debian/Ubuntu: `apt-get install nodejs npm`; conda: `conda install -c conda-forge "
            "nodejs`; or https://nodejs.org), or put the three packages there by hand.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run([npm] + cmd[1:], capture_output=True, text=True)
    except OSError as exc:
        raise RuntimeError(f"could not run `{shown}`: {exc}. Check the Node.js/npm install.") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise RuntimeError(
            f"`{shown}` failed with exit code {proc.returncode} (needs Node.js/npm and access to "
            f"the npm registry):\n{tail}")
    wrong = {n: _installed_version(dirs[n]) for n, v in PACKAGES.items()
             if _installed_version(dirs[n]) != v}
    if wrong:
        raise RuntimeError(f"`{shown}` ran but left wrong or missing packages "
                           f"(installed versions: {wrong}); expected {PACKAGES}")
    return dirs


# --------------------------------------------------------------------------------------------
# concepts


def normalize_key(codepoints: str) -> str:
    """``"0023-FE0F-20E3"`` -> ``"0023-20e3"``: lower-case hex, FE0F dropped, ``-``-joined."""
    parts = [p.strip().lower() for p in codepoints.replace("_", "-").split("-")]
    return "-".join(p for p in parts if p and p != "fe0f")


@dataclass(frozen=True)
class Concept:
    """One emoji concept and where each style's picture of it lives (``None``: that set lacks it)."""

    key: str                      # normalized code points, e.g. "1f600", "2764-200d-1f525"
    name: str                     # lower-case emoji-datasource name, e.g. "grinning face"
    category: str                 # emoji-datasource category, e.g. "Smileys & Emotion"
    subcategory: str              # emoji-datasource subcategory, e.g. "face-smiling"
    google_png: Path | None
    twitter_png: Path | None
    openmoji_svg: Path | None
    openmoji_author: str | None
    openmoji_group: str | None    # OpenMoji csv `group`, e.g. "smileys-emotion"
    openmoji_subgroup: str | None  # OpenMoji csv `subgroups` (sic), e.g. "face-smiling"

    @property
    def has_all(self) -> bool:
        """True when all three styles have a picture of this concept."""
        return None not in (self.google_png, self.twitter_png, self.openmoji_svg)


def _read_datasource(pkg_dir: Path, style: str) -> dict[str, tuple[dict, Path | None]]:
    """``{key: (emoji.json entry, PNG path or None)}`` for the base (no skin tone) entries."""
    img_sub, flag = _DATASOURCE_IMAGES[style]
    entries = json.loads((pkg_dir / "emoji.json").read_text(encoding="utf-8"))
    out = {}
    for e in entries:
        # Skin-tone variants live inside each base entry under `skin_variations`; they are ignored.
        key = normalize_key(e["unified"])
        png = pkg_dir / img_sub / e["image"]
        out[key] = (e, png if e.get(flag, True) and png.is_file() else None)
    return out


def _read_openmoji(pkg_dir: Path) -> dict[str, dict]:
    """``{key: csv row (+ "svg": Path)}`` for OpenMoji rows that are not skin-tone variants."""
    out = {}
    text = (pkg_dir / "data" / "openmoji.csv").read_text(encoding="utf-8")
    for row in csv.DictReader(io.StringIO(text)):
        if (row.get("skintone") or "").strip():
            continue                      # a skin-tone variant of a base emoji
        svg = pkg_dir / "color" / "svg" / f"{row['hexcode']}.svg"
        if not svg.is_file():
            continue
        out[normalize_key(row["hexcode"])] = dict(row, svg=svg)
    return out


def _readable_name(entry: dict) -> str:
    name = (entry.get("name") or "").strip()
    if not name:
        name = (entry.get("short_name") or "").replace("_", " ").replace("-", " ").strip()
    return " ".join(name.lower().split())


def load_concepts(google_dir, twitter_dir, openmoji_dir) -> list[Concept]:
    """Match the three emoji sets on the FE0F-free code-point key.

    Concepts are the base entries of the emoji-datasource ``emoji.json`` (the union of the google
    and twitter packages' files, which are the same file in 16.0.0); skin-tone variants are left
    out. Each concept's ``*_png`` / ``openmoji_*`` fields are ``None`` when that set has no image
    for it (also when its directory argument is ``None``). OpenMoji rows with no emoji-datasource
    counterpart (e.g. OpenMoji's own non-Unicode "extras") are not returned: they have no name or
    category from emoji-datasource. Use ``[c for c in concepts if c.has_all]`` for the concepts in
    all three styles. Sorted by key.
    """
    sources = {}
    for style, d in (("google", google_dir), ("twitter", twitter_dir)):
        sources[style] = _read_datasource(Path(d), style) if d is not None else {}
    openmoji = _read_openmoji(Path(openmoji_dir)) if openmoji_dir is not None else {}

    concepts = []
    for key in sorted(set(sources["google"]) | set(sources["twitter"])):
        g_entry, g_png = sources["google"].get(key, (None, None))
        t_entry, t_png = sources["twitter"].get(key, (None, None))
        entry = g_entry if g_entry is not None else t_entry
        om = openmoji.get(key)
        concepts.append(Concept(
            key=key,
            name=_readable_name(entry),
            category=entry.get("category") or "",
            subcategory=entry.get("subcategory") or "",
            google_png=g_png,
            twitter_png=t_png,
            openmoji_svg=om["svg"] if om else None,
            openmoji_author=(om.get("openmoji_author") or None) if om else None,
            openmoji_group=(om.get("group") or None) if om else None,
            openmoji_subgroup=(om.get("subgroups") or om.get("subgroup") or None) if om else None,
        ))
    return concepts


# --------------------------------------------------------------------------------------------
# rasterizing


def _load_rgba(path: Path, svg_px: int) -> Image.Image:
    if path.suffix.lower() == ".svg":
        import resvg_py  # the renderer ships in the wheel: no system library

        png = resvg_py.svg_to_bytes(svg_path=str(path), width=svg_px, height=svg_px)
        img = Image.open(io.BytesIO(bytes(png)))
    else:
        img = Image.open(path)
    img.load()
    return img.convert("RGBA")


def rasterize(path, size: int, margin: float = 0.06, svg_px: int = 512) -> Image.Image:
    """An emoji picture (PNG or SVG) as a ``size`` x ``size`` RGB image on white.

    Composites on white, crops to the bounding box of the pixels with alpha > 0, pads that to a
    square centred on white with ``margin`` (a fraction of the final side) on each side, and
    resizes with LANCZOS. SVGs are rendered at ``svg_px`` x ``svg_px`` first (OpenMoji glyphs
    fill only about 2/3 of their 72x72 view box, so the crop keeps most of that resolution).
    """
    path = Path(path)
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    rgba = _load_rgba(path, svg_px)
    box = rgba.getchannel("A").getbbox()       # bounding box of alpha > 0; None if all clear
    if box is not None:
        rgba = rgba.crop(box)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")

    w, h = rgb.size
    side = max(1, round(max(w, h) / (1.0 - 2.0 * margin)))
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return canvas.resize((size, size), Image.LANCZOS)


def concept_sources(concept: Concept) -> dict[str, Path | None]:
    """``{"google": png, "twitter": png, "openmoji": svg}`` for one concept."""
    return {"google": concept.google_png, "twitter": concept.twitter_png,
            "openmoji": concept.openmoji_svg}


# --------------------------------------------------------------------------------------------
# licences


def write_notice(path, openmoji_authors: Iterable[str] | None = None) -> None:
    """Write the NOTICE naming every source, its version and licence.

    ``openmoji_authors``: the OpenMoji designers whose glyphs are used; listed in the NOTICE when
    given (CC BY-SA 4.0 asks for attribution).
    """
    g, t, o = (f"{n}@{PACKAGES[n]}" for n in
               ("emoji-datasource-google", "emoji-datasource-twitter", "openmoji"))
    text = f"""\
mini-AbC emoji images -- third-party sources and licences
=========================================================

The images of mini-AbC are derived from three emoji sets, fetched from the npm registry. Every
image was rasterized (SVGs) and modified: composited on a white background, cropped to its
visible (non-transparent) bounding box, padded to a square with a white margin and resized. No
source endorses this use.

1. Google Noto Color Emoji -- npm package {g}
   Images: img/google/64/*.png of emoji-datasource (https://github.com/iamcal/emoji-data, by Cal
   Henderson), taken from Noto Emoji v2.048 (https://github.com/googlefonts/noto-emoji), by
   Google. The package's README states: "Android/Google/Noto images, are available under the
   Apache License 2.0" (https://www.apache.org/licenses/LICENSE-2.0). The package's LICENSE file (MIT, Copyright (c) 2013 Cal Henderson) covers
   the emoji-datasource data and code (emoji.json: names, categories), not the images.

2. Twemoji -- npm package {t}
   Images: img/twitter/64/*.png of emoji-datasource, taken from Twemoji v16.0.1
   (https://github.com/jdecked/twemoji, the maintained fork of twitter/twemoji). Twemoji
   graphics: Copyright Twitter, Inc and other contributors, licensed under CC-BY 4.0
   (https://creativecommons.org/licenses/by/4.0/); the package's README states: "Twitter images
   are available under the Creative Commons Attribution 4.0 license". The package's LICENSE file
   (MIT, Copyright (c) 2013 Cal Henderson) covers the emoji-datasource data and code.

3. OpenMoji -- npm package {o} (https://openmoji.org/, https://github.com/hfg-gmuend/openmoji)
   Images: color/svg/*.svg. "All emojis designed by OpenMoji – the open-source emoji and icon
   project. License: CC BY-SA 4.0" (https://creativecommons.org/licenses/by-sa/4.0/); the
   package's LICENSE.txt is the CC BY-SA 4.0 legal code (its code is LGPL-3.0, not used here).
   Each emoji's designer is listed in the openmoji_author column of the package's
   data/openmoji.csv. Under ShareAlike, the modified OpenMoji images of mini-AbC are likewise
   licensed under CC BY-SA 4.0.
   Citation: Groß, B., Utz, D., & The OpenMoji Contributors. OpenMoji [Dataset].
   https://openmoji.org
"""
    if openmoji_authors is not None:
        names = sorted({a.strip() for a in openmoji_authors if a and a.strip()})
        text += "\n   OpenMoji designers of the glyphs used:\n"
        text += "".join(f"     {n}\n" for n in names)
    Path(path).write_text(text, encoding="utf-8")
