"""data/mini_abc_build/sources.py on fake miniature npm package layouts (offline, no torch).

The last test runs on the real packages only when MINI_ABC_NPM_CACHE names an npm prefix holding
them (e.g. data/.cache/npm_v2 after `fetch_packages`).
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.mini_abc_build import sources
from data.mini_abc_build.sources import (DATASOURCE, PACKAGES, SETS, IconSet, fetch_packages,
                                         load_concepts, normalize_key, rasterize, svg_document,
                                         verify_licences, write_notice)

RED = (220, 20, 20)


def _rect(x, y, w, h, colour="#dc1414"):
    return f'<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{colour}"/>'


def _entry(unified, name, category, subcategory, short_name="x"):
    return {"name": name, "unified": unified, "image": unified.lower() + ".png",
            "short_name": short_name, "short_names": [short_name],
            "category": category, "subcategory": subcategory}


DATASOURCE_ENTRIES = [
    dict(_entry("1F600", "GRINNING FACE", "Smileys & Emotion", "face-smiling", "grinning"),
         skin_variations={"1F3FB": {"unified": "1F600-1F3FB"}}),
    _entry("2764-FE0F", "HEAVY BLACK HEART", "Smileys & Emotion", "heart", "heart"),
    _entry("1F34E", "RED APPLE", "Food & Drink", "food-fruit", "apple"),
    _entry("1F449", "WHITE RIGHT POINTING BACKHAND INDEX", "People & Body", "hand-single-finger",
           "point_right"),
    _entry("1F534", "LARGE RED CIRCLE", "Symbols", "geometric", "red_circle"),
    _entry("1F535", "LARGE BLUE CIRCLE", "Symbols", "geometric", "large_blue_circle"),
    # never concepts: a flag, a keycap, a bare skin-tone swatch
    _entry("1F1EB-1F1F7", "France Flag", "Flags", "country-flag", "fr"),
    _entry("0023-FE0F-20E3", "HASH KEY", "Symbols", "keycap", "hash"),
    _entry("1F3FB", "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "Component", "skin-tone", "skin-tone-2"),
]


def _write_package(folder: Path, name: str, version: str, licence: str, files: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "package.json").write_text(json.dumps(
        {"name": name, "version": version, "license": licence}), encoding="utf-8")
    for fname, content in files.items():
        (folder / fname).write_text(json.dumps(content), encoding="utf-8")
    return folder


def _info(style):
    s = SETS[style]
    return {"name": s.title, "author": {"name": s.author, "url": s.source_url},
            "license": {"title": s.licence, "spdx": s.licence}}


@pytest.fixture
def fake_packages(tmp_path):
    """emoji-datasource and three Iconify sets, laid out as npm installs them.

    * noto: ``chars.json`` and ``info.json`` beside icons.json (as the real packages), FE0F in a
      key, a skin-tone variant and a flag in chars, an hFlip alias that chars leaves out;
    * fxemoji: no code-point map at all (matched by icon names), info inside icons.json;
    * openmoji: ``chars`` and ``info`` inside icons.json, icon-specific viewBox, and the same
      picture for the red and the blue circle.
    """
    nm = tmp_path / "node_modules"
    dirs = {DATASOURCE[0]: _write_package(nm / DATASOURCE[0], *DATASOURCE, "MIT",
                                          {"emoji.json": DATASOURCE_ENTRIES})}
    noto_icons = {
        "prefix": "noto", "width": 128, "height": 128,
        "icons": {"grinning-face": {"body": _rect(10, 10, 50, 50, "#ffcc00")},
                  "red-heart": {"body": _rect(0, 0, 128, 64)},
                  "thumbs-up-light-skin-tone": {"body": _rect(0, 0, 9, 9)},
                  "flag-france": {"body": _rect(0, 0, 8, 8, "#0000ff")},
                  "backhand-index-pointing-left": {"body": _rect(0, 0, 32, 128)},
                  "red-circle": {"body": '<circle cx="64" cy="64" r="60" fill="red"/>'},
                  "blue-circle": {"body": '<circle cx="64" cy="64" r="60" fill="blue"/>'}},
        "aliases": {"backhand-index-pointing-right": {"parent": "backhand-index-pointing-left",
                                                      "hFlip": True}},
    }
    noto_chars = {"1f600": "grinning-face", "2764-fe0f": "red-heart", "1f534": "red-circle",
                  "1f535": "blue-circle", "1f44d-1f3fb": "thumbs-up-light-skin-tone",
                  "1f1eb-1f1f7": "flag-france"}
    dirs[SETS["noto"].package] = _write_package(
        nm / SETS["noto"].package, SETS["noto"].package, SETS["noto"].version, "Apache-2.0",
        {"icons.json": noto_icons, "chars.json": noto_chars, "info.json": _info("noto")})

    fx_icons = {
        "prefix": "fxemoji", "width": 512, "height": 512, "info": _info("fxemoji"),
        "icons": {"grinning-face": {"body": _rect(0, 0, 100, 100, "#00aa00")},
                  "redapple": {"body": _rect(0, 0, 200, 100)},          # squashed Unicode name
                  "point-right": {"body": _rect(0, 0, 100, 300)}},      # a short name
        "aliases": {"grinning": {"parent": "grinning-face"}},
    }
    dirs[SETS["fxemoji"].package] = _write_package(
        nm / SETS["fxemoji"].package, SETS["fxemoji"].package, SETS["fxemoji"].version,
        "Apache-2.0", {"icons.json": fx_icons})

    om_icons = {
        "prefix": "openmoji", "width": 72, "height": 72, "info": _info("openmoji"),
        "icons": {"grinning-face": {"body": _rect(1, 2, 3, 4), "width": 36, "height": 48},
                  "red-heart": {"body": _rect(5, 5, 9, 9), "left": -4, "top": 2},
                  "red-apple": {"body": _rect(0, 0, 72, 36, "#00ff00")},
                  "backhand-index-pointing-right": {"body": _rect(0, 0, 9, 72)},
                  "red-circle": {"body": '<circle cx="36" cy="36" r="30" fill="purple"/>'},
                  "blue-circle": {"body": '<circle cx="36" cy="36" r="30" fill="purple"/>'}},
        "chars": {"1f600": "grinning-face", "2764": "red-heart", "1f34e": "red-apple",
                  "1f449": "backhand-index-pointing-right", "1f534": "red-circle",
                  "1f535": "blue-circle"},
    }
    dirs[SETS["openmoji"].package] = _write_package(
        nm / SETS["openmoji"].package, SETS["openmoji"].package, SETS["openmoji"].version,
        "CC-BY-SA-4.0", {"icons.json": om_icons})
    return dirs


STYLES = ["noto", "fxemoji", "openmoji"]


def test_normalize_key_drops_fe0f_and_lowercases():
    assert normalize_key("0023-FE0F-20E3") == "0023-20e3"
    assert normalize_key("2764-FE0F-200D-1F525") == "2764-200d-1f525"
    assert normalize_key("1F600") == "1f600"
    assert normalize_key("1f468_200d_1f373") == "1f468-200d-1f373"


def test_concepts_match_across_sets_by_code_point_then_name(fake_packages):
    concepts = load_concepts(fake_packages, STYLES)
    by_key = {c.key: c for c in concepts}
    # sorted; no flag, keycap, swatch or skin-tone variant; the twin circles are gone
    assert list(by_key) == ["1f34e", "1f449", "1f600", "2764"]

    heart = by_key["2764"]        # "2764-fe0f" in noto's chars and the datasource, "2764" in
    #                               openmoji's
    assert heart.styles == ["noto", "openmoji"]
    assert (heart.name, heart.cldr_name) == ("heavy black heart", "red heart")
    assert (heart.category, heart.subcategory) == ("Smileys & Emotion", "heart")
    assert heart.icons == {"noto": "red-heart", "openmoji": "red-heart"}

    grin = by_key["1f600"]        # fxemoji has no chars: matched by the name noto maps
    assert grin.styles == ["noto", "fxemoji", "openmoji"]
    assert grin.icons["fxemoji"] == "grinning-face"        # the icon, not its alias
    assert "#00aa00" in grin.svgs["fxemoji"]

    apple = by_key["1f34e"]       # fxemoji "redapple": the Unicode name without hyphens
    assert apple.styles == ["fxemoji", "openmoji"] and apple.icons["fxemoji"] == "redapple"
    assert apple.cldr_name == "red apple"

    point = by_key["1f449"]       # noto: its hFlip alias, by the name openmoji maps; fxemoji: a
    assert point.icons == {"noto": "backhand-index-pointing-right",     # GitHub short name
                           "fxemoji": "point-right", "openmoji": "backhand-index-pointing-right"}
    assert point.cldr_name == "backhand index pointing right"


def test_byte_identical_pictures_drop_the_concept_or_only_the_picture(fake_packages):
    kept = {c.key for c in load_concepts(fake_packages, STYLES)}
    assert not kept & {"1f534", "1f535"}
    pictures = {c.key: c for c in load_concepts(fake_packages, STYLES, drop_whole_concept=False)}
    for key in ("1f534", "1f535"):
        assert pictures[key].styles == ["noto"]            # openmoji's shared picture is out
    assert [c.key for c in load_concepts(fake_packages, STYLES, min_styles=3)] == [
        "1f449", "1f600"]


def test_a_style_subset_matches_names_as_the_full_set_does(fake_packages):
    # fxemoji alone still learns noto's and openmoji's names
    only = {c.key: c for c in load_concepts(fake_packages, ["fxemoji"])}
    assert set(only) == {"1f34e", "1f449", "1f600"}
    assert all(c.styles == ["fxemoji"] for c in only.values())


def test_name_overrides_beat_the_name_lookup(fake_packages, monkeypatch):
    # "point-right" made to mean the apple, "redapple" to mean nothing
    monkeypatch.setitem(sources.NAME_OVERRIDES, "fxemoji", {"point-right": "1f34e",
                                                            "redapple": None})
    by_key = {c.key: c for c in load_concepts(fake_packages, STYLES)}
    assert by_key["1f34e"].icons["fxemoji"] == "point-right"
    assert "fxemoji" not in by_key["1f449"].svgs


def test_svg_document_viewbox_from_icon_or_set(fake_packages):
    om = IconSet.read("openmoji", fake_packages[SETS["openmoji"].package])
    assert 'viewBox="0 0 36 48"' in om.svg("grinning-face")              # icon's own size
    assert 'width="36" height="48"' in om.svg("grinning-face")
    assert 'viewBox="-4 2 72 72"' in om.svg("red-heart")                 # set size, icon offset
    assert 'viewBox="0 0 72 72"' in om.svg("red-apple")
    assert om.svg("no-such-icon") is None
    doc = om.svg("red-apple")
    assert doc.startswith('<svg xmlns="http://www.w3.org/2000/svg"') and doc.endswith("</svg>")


def _red_box(img: Image.Image, threshold: int = 128):
    arr = np.asarray(img.convert("RGB")).astype(int)
    ys, xs = np.nonzero((arr[..., 0] > threshold) & (arr[..., 1] < threshold))
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _render_full(svg: str, px: int) -> Image.Image:
    """The SVG's whole viewBox as an image (no cropping), for checking where things are."""
    return sources._render_svg(svg, px)


def test_alias_flips_and_rotations_render_where_iconify_puts_them(fake_packages):
    noto = IconSet.read("noto", fake_packages[SETS["noto"].package])
    left = _render_full(noto.svg("backhand-index-pointing-left"), 128)
    right = _render_full(noto.svg("backhand-index-pointing-right"), 128)
    assert _red_box(left) == (0, 0, 32, 128)
    assert _red_box(right) == (96, 0, 128, 128)                         # mirrored
    # a quarter turn clockwise of a wide 20x10 box with the rect at its left end: tall, rect on top
    doc = svg_document({"body": _rect(0, 0, 5, 10), "width": 20, "height": 10, "rotate": 1})
    assert 'viewBox="5 -5 10 20"' in doc
    img = _render_full(doc, 40)
    assert img.size == (20, 40) and _red_box(img) == (0, 0, 20, 10)
    # flip then rotate (Iconify's order): the rect ends at the bottom
    flipped = svg_document({"body": _rect(0, 0, 5, 10), "width": 20, "height": 10, "rotate": 1,
                            "hFlip": True})
    assert _red_box(_render_full(flipped, 40)) == (0, 30, 20, 40)


def test_alias_transformations_combine_with_the_parents():
    s = IconSet("x", {"icons": {"a": {"body": "", "hFlip": True, "rotate": 1}},
                      "aliases": {"b": {"parent": "a", "hFlip": True, "rotate": 2},
                                  "c": {"parent": "b", "width": 5},
                                  "loop1": {"parent": "loop2"}, "loop2": {"parent": "loop1"}}},
                {}, {}, "")
    props = s.resolve("c")
    assert (props["hFlip"], props["rotate"], props["width"], props["height"]) == (False, 3, 5, 16)
    assert s.resolve("loop1") is None


def _box_svg(box=(10, 20, 30, 50), view=72):
    x0, y0, x1, y1 = box
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {view} {view}">'
            f'{_rect(x0, y0, x1 - x0, y1 - y0, "rgb" + str(RED))}</svg>')


def _non_white_box(img):
    arr = np.asarray(img).astype(int)
    ys, xs = np.nonzero((255 - arr).sum(axis=2) > 30)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _check_rasterized(img, size, margin, aspect=20 / 30):
    assert img.mode == "RGB" and img.size == (size, size)
    arr = np.asarray(img).astype(int)
    for y, x in ((0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)):
        assert (arr[y, x] >= 250).all(), (y, x, arr[y, x])          # white corners
    assert np.abs(arr[size // 2, size // 2] - RED).max() <= 12       # red centre
    # the 20x30 rectangle, cropped and centred: its height fills the side less the margins
    x0, y0, x1, y1 = _non_white_box(img)
    tall = size * (1 - 2 * margin)
    assert abs((y1 - y0) - tall) <= 1.5
    assert abs((x1 - x0) - tall * aspect) <= 1.5
    assert abs((x0 + x1) / 2 - size / 2) <= 1 and abs((y0 + y1) / 2 - size / 2) <= 1


@pytest.mark.parametrize("margin", [0.0, 0.06, 0.25])
def test_rasterize_svg_crops_pads_and_resizes(margin):
    # a rectangle far off-centre in a big transparent view box
    _check_rasterized(rasterize(_box_svg(), 40, margin=margin), 40, margin)


def test_rasterize_exact_pixels_and_paths(tmp_path):
    # 24 px, margin 1/6: the 20x30 rect becomes 16 px tall and 32/3 wide, centred: rows 4..19,
    # columns 6.67..17.33 (LANCZOS leaves a faint pink ring one pixel outside)
    img = rasterize(_box_svg(), 24, margin=1 / 6, render_px=144)
    arr = np.asarray(img).astype(int)
    assert _red_box(img) == (7, 4, 17, 20)
    assert np.abs(arr[12, 12] - RED).max() <= 3 and (arr[12, 4] >= 250).all()
    # the same picture from an .svg file, and from a PNG with colour hidden under alpha 0
    (tmp_path / "e.svg").write_text(_box_svg(), encoding="utf-8")
    assert np.abs(np.asarray(rasterize(tmp_path / "e.svg", 24, 1 / 6, 144)).astype(int)
                  - arr).max() <= 1
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 1] = 255                                   # green, fully transparent
    rgba[3:33, 2:22] = [*RED, 255]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "e.png")
    png = rasterize(tmp_path / "e.png", 40)
    _check_rasterized(png, 40, 0.06)
    assert not (np.abs(np.asarray(png).astype(int) - (0, 255, 0)).sum(axis=2) < 60).any()
    with pytest.raises(ValueError):
        rasterize(_box_svg(), 24, margin=0.5)


def test_rasterize_semi_transparent_goes_on_white():
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 8 8">'
           '<rect width="8" height="8" fill="black" fill-opacity="0.5"/></svg>')
    out = np.asarray(rasterize(svg, 8, margin=0.0, render_px=8)).astype(int)
    assert np.abs(out - 127).max() <= 2                  # black over white at alpha 1/2


def test_render_accepts_a_list_of_ints(monkeypatch):
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (*RED, 255)).save(buf, format="PNG")
    fake = type("resvg_py", (), {"svg_to_bytes": staticmethod(lambda **kw: list(buf.getvalue()))})
    monkeypatch.setitem(sys.modules, "resvg_py", fake)
    assert sources._render_svg("<svg/>", 4).getpixel((0, 0)) == (*RED, 255)


def _installed(tmp_path, versions):
    for name, version in versions.items():
        d = tmp_path / "node_modules" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "package.json").write_text(json.dumps({"name": name, "version": version}))


def test_fetch_packages_skips_npm_when_all_are_installed(tmp_path, monkeypatch):
    def no_npm_run(*a, **k):
        raise AssertionError("npm must not run when the packages are cached")

    _installed(tmp_path, PACKAGES)
    monkeypatch.setattr(sources.subprocess, "run", no_npm_run)
    assert fetch_packages(tmp_path) == {n: tmp_path / "node_modules" / n for n in PACKAGES}
    assert len(PACKAGES) == 12 and all(f"@iconify-json/{s}" in PACKAGES for s in SETS)


def test_fetch_packages_explains_missing_npm(tmp_path, monkeypatch):
    _installed(tmp_path, {**PACKAGES, "@iconify-json/openmoji": "1.0.0"})
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"npm was not found.*Node\.js") as err:
        fetch_packages(tmp_path)
    # the one command names every package, so none gets pruned
    for name, version in PACKAGES.items():
        assert f"{name}@{version}" in str(err.value)


def test_fetch_packages_reports_npm_failure(tmp_path, monkeypatch):
    calls = []

    def failing_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="npm error code E404\nboom")

    monkeypatch.setattr(sources.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(sources.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match=r"failed with exit code 1[\s\S]*boom") as err:
        fetch_packages(tmp_path)
    assert "npm install --prefix" in str(err.value)
    assert len(calls) == 1 and calls[0][0] == "/usr/bin/npm"
    assert sorted(a for a in calls[0] if "@" in a[1:]) == sorted(
        f"{n}@{v}" for n, v in PACKAGES.items())

    # npm "succeeds" but leaves a wrong version behind
    def wrong_run(cmd, **kwargs):
        _installed(tmp_path, {**PACKAGES, "emoji-datasource": "15.0.0"})
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(sources.subprocess, "run", wrong_run)
    with pytest.raises(RuntimeError, match="wrong or missing packages"):
        fetch_packages(tmp_path)


def test_licences_are_checked_against_the_registry(fake_packages):
    folder = fake_packages[SETS["openmoji"].package]
    assert verify_licences({"openmoji": IconSet.read("openmoji", folder)}) == {
        "openmoji": "CC-BY-SA-4.0"}
    icons = json.loads((folder / "icons.json").read_text(encoding="utf-8"))
    icons["info"]["license"]["spdx"] = "CC-BY-NC-4.0"
    (folder / "icons.json").write_text(json.dumps(icons), encoding="utf-8")
    with pytest.raises(RuntimeError, match="CC-BY-NC-4.0"):
        load_concepts(fake_packages, STYLES)
    assert all(s.licence in {"Apache-2.0", "MIT", "CC-BY-4.0", "CC-BY-SA-4.0"}
               for s in SETS.values())


def test_write_notice_names_sets_versions_licences(tmp_path):
    write_notice(tmp_path / "NOTICE", ["openmoji", "noto", "twemoji"])
    text = (tmp_path / "NOTICE").read_text(encoding="utf-8")
    for needle in ("@iconify-json/noto@1.2.9", "@iconify-json/twemoji@1.2.5",
                   "@iconify-json/openmoji@1.2.29", "Apache-2.0", "CC-BY-4.0", "CC-BY-SA-4.0",
                   "https://www.apache.org/licenses/LICENSE-2.0",
                   "https://creativecommons.org/licenses/by/4.0/",
                   "https://creativecommons.org/licenses/by-sa/4.0/",
                   "Google Inc", "Twitter", "OpenMoji", "https://github.com/hfg-gmuend/openmoji",
                   "rasterized", "white background", "cropped", "padded", "resized",
                   "emoji-datasource@16.0.0", "Cal Henderson", "All emojis designed by OpenMoji"):
        assert needle in text, needle
    assert text.index("Noto Emoji") < text.index("Twitter Emoji") < text.index("OpenMoji --")
    assert text.count("ShareAlike") == 1                 # only OpenMoji here
    assert "derived from this set are likewise licensed under CC BY-SA 4.0" in " ".join(
        text.split())
    assert "fluent" not in text.lower()                  # sets not used are not named
    write_notice(tmp_path / "NOTICE", ["openmoji", "noto"], pool_only=["noto", "fxemoji"])  # the candidate pool's
    text = (tmp_path / "NOTICE").read_text(encoding="utf-8")
    pool = text.index("The candidate pool")
    assert text.index("Noto Emoji") < text.index("OpenMoji --") < pool < text.index("3. Firefox OS Emoji")
    assert text.count("Noto Emoji --") == 1              # listed once, with the committed pictures


REAL = os.environ.get("MINI_ABC_NPM_CACHE")


@pytest.mark.skipif(not REAL, reason="set MINI_ABC_NPM_CACHE to an npm prefix holding the packages")
def test_real_packages():
    dirs = fetch_packages(REAL)                          # already there: npm does not run
    for style, s in SETS.items():                        # the registry says what the package says
        folder = dirs[s.package]
        info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
        assert (info["name"], info["author"]["name"], info["author"]["url"]) == (
            s.title, s.author, s.source_url), style
        assert info.get("version") == s.upstream_version and info["palette"] == s.colour, style
    concepts = load_concepts(dirs)
    assert 1300 <= len(concepts) <= 1700, len(concepts)
    assert 900 <= sum(len(c.svgs) >= 9 for c in concepts) <= 1200
    by_key = {c.key: c for c in concepts}
    apple = by_key["1f34e"]
    assert (apple.name, apple.category) == ("red apple", "Food & Drink")
    assert apple.styles == list(SETS)
    assert "1f431" not in by_key        # Fluent Flat draws "cat face" exactly as "grinning cat"
    right = by_key["1f449"].icons
    assert right["fluent-emoji-flat"] == "backhand-index-pointing-right"   # an hFlip alias
    for style in SETS:
        assert rasterize(apple.svgs[style], 32).size == (32, 32)
