"""The mini-AbC builder end to end on a very small configuration, from fake emoji packages (offline)."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import compute_training_loss
from data.build_mini_abc import BuildConfig, build, duotone, usable_concepts
from data.mini_abc_build.customize import CustomizationConfig
from data.mini_abc_build.sources import PACKAGES, load_concepts
from data.mini_abc_build.train_base import BaseModelConfig
from utils.tasks import exemplar_paths, load_tasks

CATEGORIES = [("Smileys & Emotion", "face-smiling"), ("Animals & Nature", "animal-mammal"),
              ("Food & Drink", "food-fruit"), ("Objects", "tool"), ("Flags", "country-flag")]
AUTHORS = ["Ada Designer", "Ben Drawer", "Cleo Painter"]


def fake_packages(cache: Path, n: int = 40) -> None:
    """emoji-datasource-google/-twitter and openmoji folders with n concepts, each picture distinct."""
    rng = np.random.default_rng(0)
    nm = cache / "npm" / "node_modules"
    entries = []
    for i in range(n):
        category, sub = CATEGORIES[i % len(CATEGORIES)]
        code = f"1F{600 + i:03X}"
        entries.append({"name": f"THING {chr(65 + i % 26)}{i}", "unified": code, "non_qualified": None,
                         "image": f"{code.lower()}.png", "short_name": f"thing{i}", "category": category,
                         "subcategory": sub, "has_img_google": True, "has_img_twitter": True})
    for pkg, style in (("emoji-datasource-google", "google"), ("emoji-datasource-twitter", "twitter")):
        d = nm / pkg
        (d / "img" / style / "64").mkdir(parents=True)
        (d / "package.json").write_text(json.dumps({"version": PACKAGES[pkg]}))
        (d / "emoji.json").write_text(json.dumps(entries))
        for e in entries:
            arr = np.zeros((64, 64, 4), np.uint8)
            x, y = rng.integers(0, 30, 2)
            arr[y:y + 30, x:x + 30] = [*rng.integers(0, 255, 3), 255]
            Image.fromarray(arr, "RGBA").save(d / "img" / style / "64" / e["image"])
    om = nm / "openmoji"
    (om / "color" / "svg").mkdir(parents=True)
    (om / "data").mkdir()
    (om / "package.json").write_text(json.dumps({"version": PACKAGES["openmoji"]}))
    rows = ["emoji,hexcode,group,subgroups,annotation,tags,openmoji_tags,openmoji_author,openmoji_date,skintone"]
    for i, e in enumerate(entries):
        c = rng.integers(0, 255, 3)
        (om / "color" / "svg" / f"{e['unified']}.svg").write_text(
            f'<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg"><circle cx="36" cy="36" r="{10 + i % 20}" '
            f'fill="rgb({c[0]},{c[1]},{c[2]})"/></svg>')
        rows.append(f"x,{e['unified']},g,{e['subcategory']},thing {i},,,{AUTHORS[i % 3]},2020-01-01,")
    (om / "data" / "openmoji.csv").write_text("\n".join(rows) + "\n")
    # a tiny stand-in for CLIP's merge list, so no wheel is downloaded
    (cache / "clip").mkdir(parents=True)
    with gzip.open(cache / "clip" / "bpe_simple_vocab_16e6.txt.gz", "wt") as f:
        f.write("#version\np i\nt h\na r\nth e</w>\n")


def test_duotone_keeps_white_background():
    img = Image.new("RGB", (4, 4), "white")
    img.putpixel((1, 1), (0, 0, 0))
    out = np.asarray(duotone(img, (10, 20, 30), (200, 210, 220)))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [10, 20, 30]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    fake_packages(cache)
    config = BuildConfig(n_heldout=8, models_per_case={"test": 1, "val": 1}, style_exemplars=3,
                         base=BaseModelConfig(vae_steps=10, diffusion_steps=10, log_every=5, vae_channels=(16, 16, 16),
                                              unet_channels=(32, 32), text_hidden=32, text_heads=2, text_layers=1),
                         customization=CustomizationConfig(steps=3, batch_size=2), fisher_samples=16, fisher_samples_all=4)
    out = tmp_path_factory.mktemp("mini") / "mini_abc"
    build(out, config, cache=cache)
    return out, cache


def test_usable_concepts_drop_flags_and_duplicates(built):
    _, cache = built
    nm = cache / "npm" / "node_modules"
    concepts = load_concepts(nm / "emoji-datasource-google", nm / "emoji-datasource-twitter", nm / "openmoji")
    assert len(concepts) == 40
    kept = usable_concepts(concepts, 0)
    assert len(kept) == 32 and all(c.category != "Flags" for c in kept)
    dup = nm / "emoji-datasource-twitter" / "img" / "twitter" / "64"
    (dup / concepts[1].twitter_png.name).write_bytes(concepts[0].google_png.read_bytes())
    assert concepts[1].key not in {c.key for c in usable_concepts(concepts, 0)}


def test_built_benchmark_has_the_abc_layout(built):
    out, _ = built
    root = out / "abc"
    captions = (root / "laion_subset" / "captions.txt").read_text().splitlines()
    images = sorted((root / "laion_subset" / "images").glob("*.png"))
    assert len(captions) == len(images) == 2 * (32 - 8)  # pretraining concepts x (google, twitter)
    assert np.load(root / "laion_latents.npy").shape == (2 * len(images), 4, 8, 8)
    assert np.load(root / "laion_text_embeddings.npy").shape == (len(images), 77, 32)
    assert (root / "sd_fisher.pt").is_file() and (root / "sd_fisher_all.pt").is_file() and (out / "NOTICE").is_file()
    for split, n in (("test", 4), ("val", 4)):  # one model per test case and split, as configured
        tasks = load_tasks(out / "tasks" / f"{split}.json")
        assert len({t.model_path for t in tasks}) == n and len(tasks) == 2 * n
        for t in tasks:
            assert (root / t.synth_image_path).is_file()
            assert (root / t.model_path / "<new1>.bin").is_file()
            assert exemplar_paths(root, t)
    test_models = {t.model_path for t in load_tasks(out / "tasks" / "test.json")}
    assert test_models.isdisjoint({t.model_path for t in load_tasks(out / "tasks" / "val.json")})
    log = json.loads((out / "sd-mini" / "training_log.json").read_text())
    assert len(log["diffusion"]) == 2 and log["scaling_factor"] > 0
    assert Image.open(out / "grids" / "customized_models.png").size[1] > 8 * 32


def test_repo_scripts_run_unchanged_on_it(built, tmp_path):
    out, _ = built
    compute_training_loss.main(["--sd_version", str(out / "sd-mini"), "--dataroot", str(out / "abc"),
                                "--task_json", str(out / "tasks" / "demo.json"), "--result_dir", str(tmp_path),
                                "--laion_subset_size", "48", "--device", "cpu"])
    assert len(list((tmp_path / "orig_loss").rglob("settings.json"))) == 1


def test_comparison_runner_end_to_end(built, tmp_path):
    """benchmarks/mini_abc_comparison.py on the built miniature: AbU, its wrong-image control, three baselines."""
    import csv
    import subprocess
    import sys

    out, _ = built
    repo = Path(__file__).resolve().parent.parent
    methods = ["AbU", "AbU, wrong-image control", "random", "pixel cosine", "gradient similarity (Fisher-whitened, K/V)"]
    flags = ["--bench", str(out), "--split", "val", "--out", str(tmp_path), "--unlearn_steps", "2",
             "--fisher_dataset_size", "1000", "--laion_subset_size", "0", "--methods"] + methods
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "mini_abc_comparison.py")] + flags,
                          capture_output=True, text=True, cwd=repo, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    assert [r["method"] for r in rows] == methods
    for r in rows:
        assert 0 <= float(r["all ap"]) <= 1 and int(r["n"]) == 8
    assert float(rows[0]["collateral"]) == float(rows[0]["collateral"])  # a number for AbU rows
    swapped = json.loads((tmp_path / "wrong_image_tasks.json").read_text())
    original = json.loads((out / "tasks" / "val.json").read_text())
    assert all(a["synth_image_path"] != b["synth_image_path"] and a["prompt"] == b["prompt"]
               for a, b in zip(swapped, original))
    assert Image.open(tmp_path / "comparison.png").size == (1000, 620)
    md = (tmp_path / "comparison.md").read_text()
    assert "| AbU |" in md and "| method | artchive | bamfg | unobserved_imagenet | observed_imagenet |" in md


def test_object_match_counts_top_candidates_whose_caption_names_the_object():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from mini_abc_comparison import object_match

    captions = ["a dog", "a cat face", "a picture of a cat"]
    rank = np.array([0, 3, 2, 1])  # one exemplar (0), then LAION 2, 1, 0
    prompt = "a picture of a cat in the style of <new1> art"
    assert object_match(rank, 1, prompt, captions, k=2) == (1.0, 2 / 3)
    assert object_match(rank, 1, prompt, captions, k=3) == (2 / 3, 2 / 3)
    assert object_match(rank, 1, "a picture of a <new1> object", captions) == (None, None)


def test_method_time_survives_a_rerun_that_only_rescores(tmp_path):
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from runner import timed

    def work():
        time.sleep(0.2)
        (tmp_path / "q1").mkdir()
        (tmp_path / "q1" / "influence.pkl").write_bytes(b"x")
        return True

    ok, first = timed(tmp_path, "influence.pkl", work)
    assert ok and first >= 0.2
    assert timed(tmp_path, "influence.pkl", lambda: True) == (True, first)  # nothing new: the time stays
    assert json.loads((tmp_path / "timing.json").read_text())["seconds"] == first
