"""data/mini_abc_build/pool.py: the large candidate pool, on the fake miniature npm packages (offline, no torch)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.mini_abc_build import pool as pool_module
from data.mini_abc_build import sources
from data.mini_abc_build.pool import icon_name, plan_rows, pool_caption, write_pool_pictures
from tests.test_mini_abc_sources import fake_packages  # noqa: F401  (the fixture)

STYLES = ["noto", "fxemoji", "openmoji"]


def _mini_abc(out: Path, icon_sets, concepts):
    """A mini-AbC data folder with two pretraining pictures (noto's grinning face, openmoji's red apple) and one
    exemplar that is fxemoji's grinning face, as the data stage writes them."""
    by_key = {c.key: c for c in concepts}
    rows = [{"key": "1f600", "style": "noto", "name": "grinning face", "category": "face"},
            {"key": "1f34e", "style": "openmoji", "name": "red apple", "category": "food"}]
    images = out / "abc" / "laion_subset" / "images"
    images.mkdir(parents=True)
    for i, r in enumerate(rows):
        sources.rasterize(by_key[r["key"]].svgs[r["style"]], 32).save(images / f"{i:06d}.png")
    (out / "abc" / "laion_subset" / "captions.txt").write_text("a grinning face\na red apple in the style of outline art\n")
    (out / "abc" / "laion_subset" / "sources.json").write_text(json.dumps(rows))
    (out / "abc" / "exemplar" / "artchive" / "fxemoji").mkdir(parents=True)
    sources.rasterize(by_key["1f600"].svgs["fxemoji"], 32).save(out / "abc" / "exemplar" / "artchive" / "fxemoji" / "000.png")
    (out / "abc" / "models").mkdir()


def test_the_pool_keeps_mini_abcs_rows_first_and_adds_every_other_icon_once(fake_packages, tmp_path, monkeypatch):
    icon_sets = sources.read_sets(fake_packages, STYLES)
    concepts = sources.load_concepts(fake_packages, STYLES, drop_whole_concept=False)
    _mini_abc(tmp_path, icon_sets, concepts)
    made = write_pool_pictures(tmp_path, icon_sets, concepts, 32)
    pool = tmp_path / "pool"
    rows = json.loads((pool / "laion_subset" / "sources.json").read_text())
    captions = (pool / "laion_subset" / "captions.txt").read_text().splitlines()
    images = sorted((pool / "laion_subset" / "images").glob("*.png"))
    # 7 noto + 3 fxemoji + 6 openmoji icons (aliases are not rows) = 16; 2 are mini-AbC's rows; fxemoji's grinning
    # face is the exemplar; openmoji draws the red and the blue circle alike (one dropped)
    assert made["dropped"] == {"same as an exemplar": 1, "same as an earlier row": 1}
    assert len(rows) == len(captions) == len(images) == made["n_images"] == 16 - 2
    for i in range(2):  # mini-AbC's rows first, byte for byte, with their captions
        assert images[i].read_bytes() == (tmp_path / "abc" / "laion_subset" / "images" / f"{i:06d}.png").read_bytes()
    assert captions[:2] == ["a grinning face", "a red apple in the style of outline art"]
    icons = [(r["style"], r["icon"]) for r in rows[2:]]
    assert ("noto", "grinning-face") not in icons and ("openmoji", "red-apple") not in icons
    assert ("noto", "backhand-index-pointing-right") not in icons  # an alias
    assert icons[0][0] == "noto" and icons[-1][0] == "openmoji"  # registry order, then names
    assert [i for s, i in icons if s == "noto"] == sorted(i for s, i in icons if s == "noto")
    named = {(r["style"], r["icon"]): r for r in rows[2:]}
    assert named[("noto", "red-heart")]["key"] == "2764" and named[("noto", "flag-france")]["key"] == ""
    assert named[("noto", "flag-france")]["name"] == "flag france"
    for r, c in zip(rows[2:], captions[2:]):  # only training styles name a style
        assert ("in the style of" in c) <= (r["style"] in ("noto", "openmoji")), (r, c)
        assert r["name"] in c
    digests = {pool_module.pixel_digest(Image.open(p)) for p in images}
    assert len(digests) == len(images)
    assert (pool / "models").is_symlink() and (pool / "models").resolve() == (tmp_path / "abc" / "models").resolve()
    # the Fisher is derived later (--stage derive): its link is there already, and resolves once it is
    assert (pool / "sd_fisher.pt").is_symlink() and not (pool / "sd_fisher.pt").exists()
    (tmp_path / "abc" / "sd_fisher.pt").write_bytes(b"fisher")
    assert (pool / "sd_fisher.pt").read_bytes() == b"fisher"
    assert "Noto Emoji" in (pool / "NOTICE").read_text()

    # a rerun reads the pictures there instead of rendering them, and writes the same files
    before = {p.name: p.read_bytes() for p in images}
    monkeypatch.setattr(sources, "rasterize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rendered")))
    assert write_pool_pictures(tmp_path, icon_sets, concepts, 32) == made
    assert {p.name: p.read_bytes() for p in sorted((pool / "laion_subset" / "images").glob("*.png"))} == before
    assert (pool / "laion_subset" / "captions.txt").read_text().splitlines() == captions


def test_captions_and_names():
    rng = np.random.default_rng(0)
    drawn = [pool_caption("red apple", "noto", rng) for _ in range(200)]
    share = np.mean(["in the style of google art" in c for c in drawn])
    assert 0.6 < share < 0.8  # mini-AbC's 70%
    assert all("style" not in pool_caption("red apple", "twemoji", rng) for _ in range(50))
    assert icon_name("woman-juggling-medium-skin-tone") == "woman juggling medium skin tone"


def test_an_icon_drawn_by_an_alias_is_not_its_parent(fake_packages):
    """noto draws "pointing right" as an hFlip alias of its "pointing left" icon: another picture, so a pretraining
    row of the right-pointing concept leaves the left-pointing icon in the pool, named by its own icon name."""
    icon_sets = sources.read_sets(fake_packages, STYLES)
    concepts = sources.load_concepts(fake_packages, STYLES, drop_whole_concept=False)
    rows = plan_rows(icon_sets, concepts, [{"key": "1f449", "style": "noto"}])
    left = [r for r in rows if (r["style"], r["icon"]) == ("noto", "backhand-index-pointing-left")]
    assert len(left) == 1 and left[0]["name"] == "backhand index pointing left" and left[0]["key"] == ""


def test_a_packed_pool_unpacks_to_the_same_pixels_and_captions(fake_packages, tmp_path, capsys):
    """benchmarks/carry_pool.py: what a lent GPU unpacks is the pool's first N rows, pixel for pixel."""
    from benchmarks import carry_pool
    from utils.errors import InputError

    icon_sets = sources.read_sets(fake_packages, STYLES)
    concepts = sources.load_concepts(fake_packages, STYLES, drop_whole_concept=False)
    here, there = tmp_path / "here", tmp_path / "there"
    _mini_abc(here, icon_sets, concepts)
    n = write_pool_pictures(here, icon_sets, concepts, 32)["n_images"]
    assert n >= 4
    with pytest.raises(InputError, match=f"pack between 3 and {n}"):
        carry_pool.pack(here, 2, tmp_path / "pack")  # no row past mini-AbC's own
    carry_pool.main(["pack", "--bench", str(here), "--carry", str(tmp_path / "pack"), "--rows", str(n - 1)])
    assert "packed rows 2..%d" % (n - 2) in capsys.readouterr().out
    _mini_abc(there, icon_sets, concepts)  # the other machine: mini-AbC from the repository, no pool
    carry_pool.main(["unpack", "--bench", str(there), "--carry", str(tmp_path / "pack")])
    read = lambda root: [np.asarray(Image.open(p)) for p in sorted((root / "pool/laion_subset/images").glob("*.png"))]  # noqa: E731
    want, got = read(here)[: n - 1], read(there)
    assert len(got) == n - 1 and all(np.array_equal(a, b) for a, b in zip(want, got))
    assert (there / "pool/laion_subset/images/000000.png").read_bytes() == (
        here / "abc/laion_subset/images/000000.png").read_bytes()  # mini-AbC's own rows byte for byte
    assert (there / "pool/laion_subset/captions.txt").read_text().splitlines() == (
        here / "pool/laion_subset/captions.txt").read_text().splitlines()[: n - 1]
    assert (there / "pool/models").is_symlink()
    record = json.loads((tmp_path / "pack/pack.json").read_text())
    record["digest"] = "0" * 16  # a pack whose pixels no longer match is refused before anything is written
    (tmp_path / "pack/pack.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match="do not match"):
        carry_pool.unpack(tmp_path / "elsewhere", tmp_path / "pack")
    assert not (tmp_path / "elsewhere").exists()
