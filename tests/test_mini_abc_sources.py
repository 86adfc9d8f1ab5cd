"""data/mini_abc_build/sources.py on fake miniatures of the three npm package layouts (offline).

The last test runs on the real packages only when MINI_ABC_NPM_CACHE names an npm prefix holding
them (e.g. data/.cache/npm after `fetch_packages`).
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.mini_abc_build import sources
from data.mini_abc_build.sources import (PACKAGES, fetch_packages, load_concepts, normalize_key,
                                         rasterize, write_notice)

RED = (220, 20, 20)


def _png_with_margins(path, size=64, box=(10, 20, 30, 50), color=RED):
    """A transparent PNG (with green hidden under alpha 0) holding one opaque rectangle."""
    arr = np.zeros((size, size, 4), np.uint8)
    arr[..., 1] = 255                                   # green, but fully transparent
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1, :3] = color
    arr[y0:y1, x0:x1, 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGBA").save(path)
    return path


def _svg_with_margins(path, box=(10, 20, 30, 50)):
    x0, y0, x1, y1 = box
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '<svg id="emoji" viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg">'
        f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="rgb{RED}"/></svg>',
        encoding="utf-8")
    return path


def _entry(unified, name, short_name, image, category, subcategory, google=True, twitter=True):
    return {"name": name, "unified": unified,
            "non_qualified": unified.replace("-FE0F", "") if "FE0F" in unified else None,
            "image": image, "short_name": short_name, "short_names": [short_name],
            "category": category, "subcategory": subcategory,
            "has_img_apple": True, "has_img_google": google, "has_img_twitter": twitter,
            "has_img_facebook": False}


@pytest.fixture
def fake_packages(tmp_path):
    """Miniature emoji-datasource-google/-twitter and openmoji package folders."""
    nm = tmp_path / "node_modules"
    entries = [
        _entry("1F600", "GRINNING FACE", "grinning", "1f600.png", "Smileys & Emotion", "face-smiling"),
        _entry("2764-FE0F", "HEAVY BLACK HEART", "heart", "2764-fe0f.png", "Smileys & Emotion",
               "heart"),
        # no OpenMoji row, and no Twemoji image
        _entry("1F431", "", "cat_face", "1f431.png", "Animals & Nature", "animal-mammal",
               twitter=False),
    ]
    entries[0]["skin_variations"] = {"1F3FB": {"unified": "1F600-1F3FB", "image": "1f600-1f3fb.png"}}
    dirs = {}
    for pkg, style in (("emoji-datasource-google", "google"), ("emoji-datasource-twitter", "twitter")):
        d = nm / pkg
        d.mkdir(parents=True)
        (d / "emoji.json").write_text(json.dumps(entries), encoding="utf-8")
        for e in entries:
            if e[f"has_img_{style}"]:
                _png_with_margins(d / "img" / style / "64" / e["image"])
        _png_with_margins(d / "img" / style / "64" / "1f600-1f3fb.png")
        dirs[pkg] = d

    om = nm / "openmoji"
    (om / "data").mkdir(parents=True)
    header = ("emoji,hexcode,group,subgroups,annotation,tags,openmoji_tags,openmoji_author,"
              "openmoji_date,skintone,skintone_combination,skintone_base_emoji,"
              "skintone_base_hexcode,unicode,order\n")
    rows = [
        "😀,1F600,smileys-emotion,face-smiling,grinning face,,,Emily Jäger,2018-04-18,,,,,1,1\n",
        "❤,2764,smileys-emotion,heart,red heart,,,Lisa Schulz,2018-04-18,,,,,1,2\n",
        # a skin-tone variant and an OpenMoji-only extra: neither may become a concept
        "😀🏻,1F600-1F3FB,smileys-emotion,face-smiling,x,,,Someone,2018,1,single,😀,1F600,1,3\n",
        ",E000,extras-openmoji,symbol-other,hfg,,,Benedikt Groß,2018,,,,,,4\n",
    ]
    (om / "data" / "openmoji.csv").write_text(header + "".join(rows), encoding="utf-8")
    for hexcode in ("1F600", "2764", "1F600-1F3FB", "E000"):
        _svg_with_margins(om / "color" / "svg" / f"{hexcode}.svg")
    dirs["openmoji"] = om
    return dirs


def test_normalize_key_drops_fe0f_and_lowercases():
    assert normalize_key("0023-FE0F-20E3") == "0023-20e3"
    assert normalize_key("2764-FE0F-200D-1F525") == "2764-200d-1f525"
    assert normalize_key("1f600") == "1f600"


def test_load_concepts_matches_on_fe0f_free_key(fake_packages):
    concepts = load_concepts(fake_packages["emoji-datasource-google"],
                             fake_packages["emoji-datasource-twitter"], fake_packages["openmoji"])
    assert [c.key for c in concepts] == ["1f431", "1f600", "2764"]     # sorted; no variants, no extras
    by_key = {c.key: c for c in concepts}

    heart = by_key["2764"]                  # emoji-datasource has FE0F, OpenMoji does not
    assert heart.has_all
    assert heart.name == "heavy black heart"
    assert heart.google_png.name == "2764-fe0f.png" and "google" in heart.google_png.parts
    assert heart.twitter_png.name == "2764-fe0f.png" and "twitter" in heart.twitter_png.parts
    assert heart.openmoji_svg.name == "2764.svg"
    assert (heart.openmoji_author, heart.openmoji_group, heart.openmoji_subgroup) == (
        "Lisa Schulz", "smileys-emotion", "heart")

    grin = by_key["1f600"]
    assert grin.has_all and grin.openmoji_author == "Emily Jäger"
    assert (grin.category, grin.subcategory) == ("Smileys & Emotion", "face-smiling")

    cat = by_key["1f431"]                   # unmatched pieces are None, the concept stays
    assert not cat.has_all
    assert cat.name == "cat face"          # empty `name` falls back to short_name
    assert cat.google_png is not None and cat.twitter_png is None
    assert cat.openmoji_svg is None and cat.openmoji_author is None

    again = load_concepts(fake_packages["emoji-datasource-google"],
                          fake_packages["emoji-datasource-twitter"], fake_packages["openmoji"])
    assert again == concepts


def test_load_concepts_without_openmoji(fake_packages):
    concepts = load_concepts(fake_packages["emoji-datasource-google"],
                             fake_packages["emoji-datasource-twitter"], None)
    assert len(concepts) == 3 and all(c.openmoji_svg is None for c in concepts)


def _non_white_box(img):
    arr = np.asarray(img).astype(int)
    ys, xs = np.nonzero((255 - arr).sum(axis=2) > 30)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _check_rasterized(img, size, margin):
    assert img.mode == "RGB" and img.size == (size, size)
    arr = np.asarray(img).astype(int)
    # corners white (transparent green must not show), centre red
    for y, x in ((0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)):
        assert (arr[y, x] >= 250).all(), (y, x, arr[y, x])
    assert np.abs(arr[size // 2, size // 2] - RED).max() <= 12
    # the 20x30 rectangle, cropped and centred: its height fills the side less the margins
    x0, y0, x1, y1 = _non_white_box(img)
    tall = size * (1 - 2 * margin)
    assert abs((y1 - y0) - tall) <= 2
    assert abs((x1 - x0) - tall * 20 / 30) <= 2
    assert abs((x0 + x1) / 2 - size / 2) <= 1 and abs((y0 + y1) / 2 - size / 2) <= 1
    assert not (np.abs(arr - (0, 255, 0)).sum(axis=2) < 60).any()        # no green anywhere


@pytest.mark.parametrize("margin", [0.0, 0.06])
def test_rasterize_png_crops_pads_and_resizes(tmp_path, margin):
    # rectangle far off-centre in a big transparent canvas
    png = _png_with_margins(tmp_path / "e.png", size=64, box=(2, 3, 22, 33))
    _check_rasterized(rasterize(png, 40, margin=margin), 40, margin)
    assert rasterize(png, 16).size == (16, 16)


def test_rasterize_semi_transparent_goes_on_white(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 3] = 128                      # half-transparent black everywhere
    Image.fromarray(arr, "RGBA").save(tmp_path / "half.png")
    out = np.asarray(rasterize(tmp_path / "half.png", 8, margin=0.0)).astype(int)
    assert np.abs(out - 127).max() <= 2     # black over white at alpha 1/2 -> mid grey


def test_rasterize_svg_crops_pads_and_resizes(tmp_path):
    svg = _svg_with_margins(tmp_path / "e.svg", box=(10, 20, 30, 50))
    _check_rasterized(rasterize(svg, 40, margin=0.06, svg_px=144), 40, 0.06)


def test_fetch_packages_reuses_cache_and_explains_missing_npm(tmp_path, monkeypatch):
    def no_npm_run(*a, **k):
        raise AssertionError("npm must not run when the packages are cached")

    for name, version in PACKAGES.items():
        d = tmp_path / "node_modules" / name
        d.mkdir(parents=True)
        (d / "package.json").write_text(json.dumps({"name": name, "version": version}))
    monkeypatch.setattr(sources.subprocess, "run", no_npm_run)
    assert fetch_packages(tmp_path) == {n: tmp_path / "node_modules" / n for n in PACKAGES}

    (tmp_path / "node_modules" / "openmoji" / "package.json").write_text('{"version": "1.0.0"}')
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"npm.*Node\.js") as err:
        fetch_packages(tmp_path)
    assert "openmoji@17.0.0" in str(err.value)


def test_write_notice_names_sources_versions_licences(tmp_path):
    write_notice(tmp_path / "NOTICE", openmoji_authors=["Lisa Schulz", "Emily Jäger", "Lisa Schulz"])
    text = (tmp_path / "NOTICE").read_text(encoding="utf-8")
    for needle in ("emoji-datasource-google@16.0.0", "emoji-datasource-twitter@16.0.0",
                   "openmoji@17.0.0", "Apache License 2.0", "CC-BY 4.0", "CC BY-SA 4.0",
                   "Twitter, Inc and other contributors", "openmoji_author", "resized",
                   "Emily Jäger"):
        assert needle in text, needle
    assert text.count("Lisa Schulz") == 1


REAL = os.environ.get("MINI_ABC_NPM_CACHE")


@pytest.mark.skipif(not REAL, reason="set MINI_ABC_NPM_CACHE to an npm prefix holding the packages")
def test_real_packages_match_about_1900_concepts():
    nm = Path(REAL) / "node_modules"
    concepts = load_concepts(nm / "emoji-datasource-google", nm / "emoji-datasource-twitter",
                             nm / "openmoji")
    full = [c for c in concepts if c.has_all]
    assert 1800 <= len(full) <= 2100, len(full)
    grin = next(c for c in concepts if c.key == "1f600")
    assert grin.name == "grinning face" and grin.openmoji_author
    for path in (grin.google_png, grin.twitter_png):
        assert rasterize(path, 32).size == (32, 32)
    assert rasterize(grin.openmoji_svg, 32).size == (32, 32)
