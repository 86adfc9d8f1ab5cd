"""The emoji sources of mini-AbC v2: many independently designed emoji styles of the same concepts.

Each style is one Iconify JSON npm package (``@iconify-json/<set>``): a single ``icons.json`` of
SVG bodies, with the set's facts (``info.json``: author, licence) and a code-point map
(``chars.json``) beside it. Concept names and categories come from ``emoji-datasource``'s
``emoji.json`` (data only; its images are not used).

Pipeline: ``fetch_packages`` (npm, pinned) -> ``load_concepts`` (match the same emoji across sets,
build full SVG documents) -> ``rasterize`` (resvg, no cairo) -> ``write_notice`` (licences).

A concept is keyed by its code points: lower-case hex joined by ``-`` with U+FE0F (the emoji
presentation selector) removed, because the sources disagree on FE0F for the same emoji
(``"2764-fe0f"`` in emoji-datasource, ``"2764"`` elsewhere).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from PIL import Image

# --------------------------------------------------------------------------------------------
# the registry of style sets

# Licences (SPDX) that allow redistributing modified images, with their legal-code URLs.
LICENCE_URLS = {
    "Apache-2.0": "https://www.apache.org/licenses/LICENSE-2.0",
    "MIT": "https://opensource.org/license/mit",
    "CC-BY-4.0": "https://creativecommons.org/licenses/by/4.0/",
    "CC-BY-SA-4.0": "https://creativecommons.org/licenses/by-sa/4.0/",
}
SHARE_ALIKE = {"CC-BY-SA-4.0"}


@dataclass(frozen=True)
class StyleSet:
    """Facts about one emoji set, as its npm package states them (package.json and info.json)."""

    package: str          # npm package name
    version: str          # exact pinned version
    title: str            # info.name
    licence: str          # SPDX id; package.json `license` and info.license.spdx agree on it
    author: str           # info.author.name
    source_url: str       # info.author.url: where the artwork comes from
    upstream_version: str | None = None  # info.version: the artwork's own release, when stated
    colour: bool = True   # info.palette: False for single-colour (currentColor) sets
    attribution: str | None = None  # wording the project asks attributions to use


# Versions are what `npm view <pkg> version` gave on 2026-11-28. Facts were read from each
# package's package.json and info.json at that version; `verify_licences` re-checks them.
SETS: dict[str, StyleSet] = {
    "noto": StyleSet("@iconify-json/noto", "1.2.9", "Noto Emoji", "Apache-2.0", "Google Inc",
                     "https://github.com/googlefonts/noto-emoji"),
    "noto-v1": StyleSet("@iconify-json/noto-v1", "1.2.5", "Noto Emoji (v1)", "Apache-2.0",
                        "Google Inc", "https://github.com/googlefonts/noto-emoji"),
    "twemoji": StyleSet("@iconify-json/twemoji", "1.2.5", "Twitter Emoji", "CC-BY-4.0", "Twitter",
                        "https://github.com/jdecked/twemoji"),
    "fluent-emoji": StyleSet("@iconify-json/fluent-emoji", "1.2.7", "Fluent Emoji", "MIT",
                             "Microsoft Corporation",
                             "https://github.com/microsoft/fluentui-emoji"),
    "fluent-emoji-flat": StyleSet("@iconify-json/fluent-emoji-flat", "1.2.6", "Fluent Emoji Flat",
                                  "MIT", "Microsoft Corporation",
                                  "https://github.com/microsoft/fluentui-emoji"),
    "fluent-emoji-high-contrast": StyleSet(
        "@iconify-json/fluent-emoji-high-contrast", "1.2.6", "Fluent Emoji High Contrast", "MIT",
        "Microsoft Corporation", "https://github.com/microsoft/fluentui-emoji", colour=False),
    "emojione": StyleSet("@iconify-json/emojione", "1.2.3", "Emoji One (Colored)", "CC-BY-4.0",
                         "Emoji One", "https://github.com/EmojiTwo/emojitwo", "2.3.0"),
    "emojione-v1": StyleSet("@iconify-json/emojione-v1", "1.2.3", "Emoji One (v1)",
                            "CC-BY-SA-4.0", "Emoji One",
                            "https://github.com/joypixels/emojione-legacy", "1.5.2"),
    "emojione-monotone": StyleSet("@iconify-json/emojione-monotone", "1.2.1",
                                  "Emoji One (Monotone)", "CC-BY-4.0", "Emoji One",
                                  "https://github.com/EmojiTwo/emojitwo", "2.2.7", colour=False),
    "fxemoji": StyleSet("@iconify-json/fxemoji", "1.2.2", "Firefox OS Emoji", "Apache-2.0",
                        "Mozilla", "https://github.com/mozilla/fxemoji", "0.0.2"),
    "openmoji": StyleSet("@iconify-json/openmoji", "1.2.29", "OpenMoji", "CC-BY-SA-4.0",
                         "OpenMoji", "https://github.com/hfg-gmuend/openmoji",
                         attribution="All emojis designed by OpenMoji - the open-source emoji "
                                     "and icon project. License: CC BY-SA 4.0"),
}
# Only sets whose licence allows redistributing modified images belong in the registry.
assert all(s.licence in LICENCE_URLS for s in SETS.values())

# Names and categories (MIT, Copyright (c) 2013 Cal Henderson); only emoji.json is read.
DATASOURCE = ("emoji-datasource", "16.0.0")

PACKAGES: dict[str, str] = {DATASOURCE[0]: DATASOURCE[1],
                            **{s.package: s.version for s in SETS.values()}}


# --------------------------------------------------------------------------------------------
# fetching


def _installed_version(pkg_dir: Path) -> str | None:
    try:
        return json.loads((pkg_dir / "package.json").read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        return None


def _npm_command(cache_dir: Path) -> list[str]:
    return (["npm", "install", "--prefix", str(cache_dir), "--no-save", "--ignore-scripts",
             "--no-audit", "--no-fund"] + [f"{n}@{v}" for n, v in PACKAGES.items()])


def fetch_packages(cache_dir) -> dict[str, Path]:
    """Install every package of ``PACKAGES`` at its pinned version under ``cache_dir``.

    Skips npm when all are already there at the right versions. Returns
    ``{npm package name: cache_dir/node_modules/<package>}``. Raises ``RuntimeError`` naming the
    command and what to install when npm is missing or fails.
    """
    cache_dir = Path(cache_dir)
    dirs = {name: cache_dir / "node_modules" / name for name in PACKAGES}
    if all(_installed_version(dirs[n]) == v for n, v in PACKAGES.items()):
        return dirs

    # All packages in one call: `npm install --no-save X` into a prefix prunes packages not
    # listed in it, so installing only the missing ones would delete the others.
    cmd = _npm_command(cache_dir)
    shown = " ".join(cmd)
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"npm was not found on PATH; it is needed to run `{shown}`. Install Node.js with npm "
            "(Debian/Ubuntu: `apt-get install nodejs npm`; conda: `conda install -c conda-forge "
            "nodejs`; or https://nodejs.org), or put the packages there by hand.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run([npm] + cmd[1:], capture_output=True, text=True)
    except OSError as exc:
        raise RuntimeError(
            f"could not run `{shown}`: {exc}. Check the Node.js/npm install.") from exc
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
# reading one Iconify icon set


def _read_json(path: Path, default=None):
    if not path.is_file():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class IconSet:
    """One Iconify JSON package, read: icons, aliases, code-point map and set facts."""

    style: str
    data: dict                         # icons.json
    info: dict                         # icons.json `info`, else info.json
    chars: dict[str, str]              # normalized code points -> icon or alias name
    licence: str                       # package.json `license`

    @classmethod
    def read(cls, style: str, pkg_dir) -> "IconSet":
        pkg_dir = Path(pkg_dir)
        data = _read_json(pkg_dir / "icons.json")
        # Packages keep `info` and `chars` in their own files; the IconifyJSON format also allows
        # them inside icons.json. Take whichever is there.
        info = data.get("info") or _read_json(pkg_dir / "info.json", {})
        raw_chars = data.get("chars") or _read_json(pkg_dir / "chars.json", {})
        package = _read_json(pkg_dir / "package.json", {})
        chars = {normalize_key(cp): name for cp, name in raw_chars.items()}
        return cls(style, data, info, chars, package.get("license", ""))

    @property
    def names(self) -> list[str]:
        """Every icon and alias name, icons first."""
        return list(self.data.get("icons", {})) + list(self.data.get("aliases", {}))

    def resolve(self, name: str) -> dict | None:
        """The icon ``name`` names, aliases followed, with its viewBox and transformations.

        Returns ``{"body", "left", "top", "width", "height", "rotate", "hFlip", "vFlip"}`` or
        ``None`` when the name is unknown (or an alias chain loops).
        """
        icons, aliases = self.data.get("icons", {}), self.data.get("aliases", {})
        chain: list[dict] = []
        while name not in icons:
            alias = aliases.get(name)
            if alias is None or len(chain) > len(aliases):
                return None
            chain.append(alias)
            name = alias["parent"]
        props = {k: self.data.get(k, d) for k, d in
                 (("left", 0), ("top", 0), ("width", 16), ("height", 16))}
        props.update(rotate=0, hFlip=False, vFlip=False)
        # Innermost first: the icon, then each alias from the parent outwards. Dimensions are
        # overridden; transformations combine (flips toggle, rotations add), as Iconify merges.
        for layer in [icons[name]] + chain[::-1]:
            for k in ("left", "top", "width", "height"):
                if k in layer:
                    props[k] = layer[k]
            props["rotate"] = (props["rotate"] + int(layer.get("rotate", 0))) % 4
            props["hFlip"] ^= bool(layer.get("hFlip", False))
            props["vFlip"] ^= bool(layer.get("vFlip", False))
        props["body"] = icons[name]["body"]
        return props

    def svg(self, name: str) -> str | None:
        """A standalone SVG document of the icon or alias ``name`` (``None`` if unknown)."""
        props = self.resolve(name)
        return None if props is None else svg_document(props)


def _num(x: float) -> str:
    return f"{x:g}"


def svg_document(props: Mapping) -> str:
    """An Iconify icon (body, viewBox, transformations) as a full SVG document.

    Flips apply first, then the quarter-turn rotation about the centre (Iconify's order); an odd
    rotation swaps the viewBox's width and height.
    """
    left, top, w, h = (float(props.get(k, d)) for k, d in
                       (("left", 0), ("top", 0), ("width", 16), ("height", 16)))
    body = props["body"]
    transforms = []
    if props.get("hFlip"):
        transforms.append(f"translate({_num(2 * left + w)} 0) scale(-1 1)")
    if props.get("vFlip"):
        transforms.append(f"translate(0 {_num(2 * top + h)}) scale(1 -1)")
    rotate = int(props.get("rotate", 0)) % 4
    if rotate:
        cx, cy = left + w / 2, top + h / 2
        # SVG applies the rightmost transform first, so the rotation goes to the left of flips.
        transforms.insert(0, f"rotate({90 * rotate} {_num(cx)} {_num(cy)})")
        if rotate % 2:
            left, top, w, h = cx - h / 2, cy - w / 2, h, w
    if transforms:
        body = f'<g transform="{" ".join(transforms)}">{body}</g>'
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{_num(w)}" height="{_num(h)}" '
            f'viewBox="{_num(left)} {_num(top)} {_num(w)} {_num(h)}">{body}</svg>')


def read_sets(pkg_dirs: Mapping[str, Path], styles: Iterable[str] | None = None
              ) -> dict[str, IconSet]:
    """Read the style sets (all of ``SETS`` by default) from ``fetch_packages``'s directories."""
    return {s: IconSet.read(s, pkg_dirs[SETS[s].package]) for s in (styles or SETS)}


def verify_licences(icon_sets: Mapping[str, IconSet]) -> dict[str, str]:
    """Check each set's licence in package.json and info.json against the registry.

    Returns ``{style: SPDX id}``. Raises ``RuntimeError`` when a package states a licence other
    than the registry's (a new version may have changed it: re-check before using it).
    """
    found = {}
    for style, s in icon_sets.items():
        stated = {s.licence, (s.info.get("license") or {}).get("spdx", "")}
        if stated != {SETS[style].licence}:
            raise RuntimeError(f"{SETS[style].package} states licence(s) {sorted(stated)}, the "
                               f"registry says {SETS[style].licence}; check the package's terms")
        found[style] = SETS[style].licence
    return found


# --------------------------------------------------------------------------------------------
# concepts


def normalize_key(codepoints: str) -> str:
    """``"0023-FE0F-20E3"`` -> ``"0023-20e3"``: lower-case hex, FE0F dropped, ``-``-joined."""
    parts = [p.strip().lower() for p in codepoints.replace("_", "-").split("-")]
    return "-".join(p for p in parts if p and p != "fe0f")


def _slug(text: str) -> str:
    """``"SLICE OF PIZZA"`` -> ``"slice-of-pizza"``: the shape of Iconify icon names."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


SKIN_TONES = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}
SKIPPED_CATEGORIES = {"Flags", "Component"}    # Component: the bare skin-tone swatches


@dataclass
class Concept:
    """One emoji concept and its picture in every style set that has it."""

    key: str                      # normalized code points, e.g. "1f600", "2764-200d-1f525"
    name: str                     # lower-case emoji-datasource name, e.g. "grinning face"
    category: str                 # emoji-datasource category, e.g. "Smileys & Emotion"
    subcategory: str              # emoji-datasource subcategory, e.g. "face-smiling"
    # The CLDR short name as the Iconify sets spell it, e.g. "red heart" where emoji-datasource's
    # Unicode name says "heavy black heart", "pizza" for "slice of pizza"; "" if no set maps it.
    cldr_name: str = ""
    svgs: dict[str, str] = field(default_factory=dict)   # style -> SVG document
    icons: dict[str, str] = field(default_factory=dict)  # style -> icon (or alias) name there

    @property
    def styles(self) -> list[str]:
        """The sets that draw this concept, in registry order."""
        return [s for s in SETS if s in self.svgs]


def _readable_name(entry: dict) -> str:
    name = (entry.get("name") or "").strip()
    if not name:
        name = (entry.get("short_name") or "").replace("_", " ").replace("-", " ").strip()
    return " ".join(name.lower().split())


def read_datasource(pkg_dir) -> dict[str, dict]:
    """``{key: emoji.json entry}`` of the candidate concepts: base emoji, no flags or keycaps.

    Skin-tone variants sit inside their base entry (``skin_variations``) and are not read; a
    key holding a skin-tone modifier is skipped too.
    """
    entries = json.loads((Path(pkg_dir) / "emoji.json").read_text(encoding="utf-8"))
    out = {}
    for e in entries:
        key = normalize_key(e["unified"])
        if (e.get("category") in SKIPPED_CATEGORIES or e.get("subcategory") == "keycap"
                or SKIN_TONES & set(key.split("-"))):
            continue
        out[key] = e
    return out


def name_index(icon_sets: Mapping[str, IconSet], datasource: Mapping[str, dict]
               ) -> list[dict[str, str]]:
    """Icon name -> key lookups, most trusted first, for sets without a code-point map.

    Iconify names its emoji icons after the CLDR short names, the same way in every set, so the
    sets that do map code points teach the names of those that do not:

    1. names in any set's ``chars`` (a name two sets map differently goes to the majority);
    2. aliases in those sets (older CLDR names, e.g. ``hugging-face``);
    3. emoji-datasource's Unicode name, slugged (``slice-of-pizza``);
    4. emoji-datasource's short names (``pizza``, ``thumbsup``).
    """
    votes: dict[str, Counter] = defaultdict(Counter)
    for s in icon_sets.values():
        for key, name in s.chars.items():
            votes[name][key] += 1
    charted = {name: c.most_common(1)[0][0] for name, c in votes.items()}
    aliased: dict[str, str] = {}
    for s in icon_sets.values():
        for alias, a in s.data.get("aliases", {}).items():
            if a.get("parent") in charted:
                aliased.setdefault(alias, charted[a["parent"]])
    unicode_names = {_slug(e.get("name") or ""): k for k, e in datasource.items() if e.get("name")}
    short_names: dict[str, str] = {}
    for k, e in datasource.items():
        for sn in e.get("short_names") or [e.get("short_name") or ""]:
            if sn:
                short_names.setdefault(_slug(sn), k)
    return [charted, aliased, unicode_names, short_names]


# Icon names that the name lookup would give to another emoji than the one drawn. Firefox OS Emoji
# has no code-point map and its own names: partly GitHub short codes (`cat` is the cat face,
# `catside` the whole cat), partly plain words. Every fxemoji icon matched by name was checked by
# eye against Noto's picture of the same key (and of the other keys its name could mean); these
# were wrong, and go to the key they draw, or to none (None) where the drawing is none of them:
# `kiss` is a kissing face, `keyboard` a musical keyboard, `window` a desktop window, `up` a hand
# pointing up.
NAME_OVERRIDES: dict[str, dict[str, str | None]] = {
    "fxemoji": {
        "cat": "1f431", "catside": "1f408", "dog": "1f436", "dogside": "1f415",
        "mouse": "1f42d", "mouseside": "1f401", "pig": "1f437", "pigside": "1f416",
        "tiger": "1f42f", "tigerside": "1f405", "sunglasses": "1f60e", "bow": "1f380",
        "wave": "1f30a", "kiss": None, "keyboard": None, "window": None, "up": None,
    },
}


def _squashed(index: list[dict[str, str]]) -> dict[str, str]:
    """Names with the hyphens removed (Firefox OS Emoji writes ``blackdiamondsuit``); only the
    squashed names that point to a single key."""
    keys: dict[str, set] = defaultdict(set)
    for tier in index:
        for name, key in tier.items():
            keys[name.replace("-", "")].add(key)
    return {n: next(iter(ks)) for n, ks in keys.items() if len(ks) == 1}


def _lookup(name: str, index: list[dict[str, str]], squashed: dict[str, str],
            overrides: Mapping[str, str | None]) -> tuple[int, str | None]:
    """``(trust rank, key)`` an icon name points to; lower ranks are more trusted."""
    if name in overrides:
        return -1, overrides[name]
    for rank, tier in enumerate(index):
        if name in tier:
            return rank, tier[name]
    return len(index), squashed.get(name.replace("-", ""))


def match_icons(icon_set: IconSet, wanted: Iterable[str], index: list[dict[str, str]]
                ) -> dict[str, tuple[str, str]]:
    """``{key: (icon name, how)}`` for the wanted keys this set has; ``how`` is ``"chars"``,
    ``"override"`` (``NAME_OVERRIDES``), ``"name"`` (a tier of ``name_index``) or ``"squashed"``.

    Code points first; icon names only for keys the set's ``chars`` lacks (six sets have no
    ``chars`` at all; others leave out e.g. hFlip aliases such as Fluent's right-pointing hands).
    """
    wanted = set(wanted)
    found = {k: (n, "chars") for k, n in icon_set.chars.items()
             if k in wanted and icon_set.resolve(n) is not None}
    # A picture already matched by code point is not offered again under another name.
    used = {icon_set.svg(n) for n, _ in found.values()}
    squashed = _squashed(index)
    overrides = NAME_OVERRIDES.get(icon_set.style, {})
    best: dict[str, tuple[int, str]] = {}     # key -> (trust rank, name)
    for name in icon_set.names:
        rank, key = _lookup(name, index, squashed, overrides)
        if (key in wanted and key not in found and (key not in best or rank < best[key][0])
                and icon_set.svg(name) not in used):
            best[key] = (rank, name)
    how = {-1: "override", len(index): "squashed"}
    for key, (rank, name) in best.items():
        found[key] = (name, how.get(rank, "name"))
    return found


def _drop_duplicates(concepts: list[Concept], whole_concept: bool = True) -> list[Concept]:
    """Leave out pictures that are byte-identical to another concept's picture in the same set:
    such a picture cannot teach which of the names it shows. ``whole_concept``: leave out the
    concepts themselves (in every set), else only those pictures (the concepts keep the rest)."""
    owners: dict[tuple[str, str], set] = defaultdict(set)
    for c in concepts:
        for style, svg in c.svgs.items():
            owners[(style, svg)].add(c.key)
    shared = {(style, key) for (style, _), keys in owners.items() if len(keys) > 1
              for key in keys}
    if whole_concept:
        dropped = {key for _, key in shared}
        return [c for c in concepts if c.key not in dropped]
    for c in concepts:
        for style in [s for s in c.svgs if (s, c.key) in shared]:
            del c.svgs[style], c.icons[style]
    return [c for c in concepts if c.svgs]


def _cldr_names(icon_sets: Iterable[IconSet]) -> dict[str, str]:
    """``{key: "red heart"}``: the icon name most sets give a code point, hyphens as spaces."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for s in icon_sets:
        for key, name in s.chars.items():
            votes[key][name.replace("-", " ")] += 1
    return {key: c.most_common(1)[0][0] for key, c in votes.items()}


def load_concepts(pkg_dirs: Mapping[str, Path], styles: Iterable[str] | None = None,
                  min_styles: int = 1, drop_whole_concept: bool = True) -> list[Concept]:
    """Every emoji-datasource concept drawn by at least ``min_styles`` of the style sets.

    ``pkg_dirs``: ``fetch_packages``'s result (or any ``{npm name: folder}`` holding
    ``emoji-datasource`` and the wanted ``@iconify-json`` sets). ``styles``: the sets to use (all
    of ``SETS`` by default); their licences are verified first. Skin-tone variants, flags and
    keycaps are left out, and so is any concept whose picture is byte-identical to another
    concept's in some set (``drop_whole_concept=False``: only that picture is left out, from
    that set). Sorted by key.
    """
    datasource = read_datasource(pkg_dirs[DATASOURCE[0]])
    # Names are learnt from every set at hand, used or not, so that a set's matches do not
    # depend on which other styles were asked for.
    at_hand = read_sets(pkg_dirs, [s for s in SETS if SETS[s].package in pkg_dirs])
    icon_sets = {s: at_hand[s] for s in (styles or SETS)}
    verify_licences(icon_sets)
    index = name_index(at_hand, datasource)
    cldr = _cldr_names(at_hand.values())
    concepts = {k: Concept(k, _readable_name(e), e.get("category") or "",
                           e.get("subcategory") or "", cldr.get(k, ""))
                for k, e in datasource.items()}
    for style, s in icon_sets.items():
        for key, (name, _) in match_icons(s, concepts, index).items():
            concepts[key].svgs[style] = s.svg(name)
            concepts[key].icons[style] = name
    unique = _drop_duplicates([concepts[k] for k in sorted(concepts)], drop_whole_concept)
    return [c for c in unique if len(c.svgs) >= max(1, min_styles)]


# --------------------------------------------------------------------------------------------
# rasterizing


def _render_svg(svg: str, px: int) -> Image.Image:
    import resvg_py  # lazy: only rasterizing needs it

    # resvg fits the drawing into px x px keeping its aspect ratio; emoji bodies hold no text,
    # so system fonts are not loaded.
    png = resvg_py.svg_to_bytes(svg_string=svg, width=px, height=px, skip_system_fonts=True)
    img = Image.open(io.BytesIO(bytes(png)))   # bytes() also takes older versions' int lists
    img.load()
    return img.convert("RGBA")


def _load_rgba(source, render_px: int) -> Image.Image:
    """An SVG document string, or a path to an SVG or a raster (PNG) file, as RGBA."""
    if isinstance(source, str) and source.lstrip().startswith("<"):
        return _render_svg(source, render_px)
    path = Path(source)
    if path.suffix.lower() == ".svg":
        return _render_svg(path.read_text(encoding="utf-8"), render_px)
    with Image.open(path) as img:
        return img.convert("RGBA")


def rasterize(svg, size: int, margin: float = 0.06, render_px: int = 256) -> Image.Image:
    """An emoji picture as a ``size`` x ``size`` RGB image on white.

    ``svg``: an SVG document string, or a path to an SVG or PNG file. SVGs are rendered with
    resvg at ``render_px`` on the longer side first. The picture is composited on white, cropped
    to the bounding box of its pixels with alpha > 0, padded to a centred square with ``margin``
    (a fraction of the final side) of white on each side, and resized with LANCZOS.
    """
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    rgba = _load_rgba(svg, render_px)
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


# --------------------------------------------------------------------------------------------
# licences


def _set_notice(i: int, style: str) -> str:
    s = SETS[style]
    upstream = f" (artwork release {s.upstream_version})" if s.upstream_version else ""
    lines = [
        f"{i}. {s.title}{upstream} -- npm package {s.package}@{s.version}",
        f"   Artwork by {s.author}, {s.source_url}, as the package states.",
        f"   Licence: {s.licence} ({LICENCE_URLS[s.licence]}).",
    ]
    if s.attribution:
        lines.append(f'   "{s.attribution}"')
    if s.licence in SHARE_ALIKE:
        lines.append("   ShareAlike: the modified images derived from this set are likewise\n"
                     f"   licensed under CC BY-SA 4.0 ({LICENCE_URLS[s.licence]}).")
    return "\n".join(lines) + "\n"


def write_notice(path, styles: Iterable[str], pool_only: Iterable[str] = ()) -> None:
    """Write the NOTICE naming every style set used, its package, version, licence and authors; `pool_only`: sets
    whose pictures only the opt-in candidate pool holds (data/mini_abc_build/pool.py), in a section of their own."""
    styles = [s for s in SETS if s in set(styles)]
    extra = [s for s in SETS if s in set(pool_only) and s not in styles]
    name, version = DATASOURCE
    text = (
        "mini-AbC emoji images -- third-party sources and licences\n"
        "=========================================================\n\n"
        "The images of mini-AbC are derived from the emoji sets below, fetched from the npm\n"
        "registry as Iconify JSON packages (https://iconify.design). Every image was rasterized\n"
        "from its SVG and modified: composited on a white background, cropped to its visible\n"
        "(non-transparent) bounding box, padded to a square with a white margin and resized.\n"
        "No author or source endorses this use.\n\n"
        + "\n".join(_set_notice(i, s) for i, s in enumerate(styles, 1))
        + ("\nThe candidate pool (`python -m data.build_mini_abc --stage pool`, not committed: pool/) also\n"
           "holds every icon of the sets above and of these, modified alike:\n\n"
           + "\n".join(_set_notice(i, s) for i, s in enumerate(extra, len(styles) + 1)) if extra else "")
        + f"\nConcept names and categories: npm package {name}@{version}\n"
        "(https://github.com/iamcal/emoji-data), MIT licence, Copyright (c) 2013 Cal Henderson;\n"
        "only its emoji.json data is used, none of its images.\n"
    )
    Path(path).write_text(text, encoding="utf-8")
