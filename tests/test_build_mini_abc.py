"""The mini-AbC builder end to end on a very small configuration, from fake emoji packages (offline)."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import compute_training_loss
from benchmarks.runner import python_command
from data.build_mini_abc import (HELDOUT_STYLES, TRAINING_STYLES, BuildConfig, build, choose_concepts, duotone,
                                 gates_report, usable_concepts)
from data.mini_abc_build import sources
from data.mini_abc_build.customize import CustomizationConfig
from data.mini_abc_build.image_level import ImageLevelConfig
from data.mini_abc_build.judge import JudgeConfig
from data.mini_abc_build.train_base import BaseModelConfig
from utils.tasks import exemplar_paths, load_tasks

CATEGORIES = [("Smileys & Emotion", "face-smiling"), ("Food & Drink", "food-fruit"), ("Objects", "tool"),
              ("Travel & Places", "transport-ground"), ("Activities", "sport"), ("Symbols", "arrow")]


def fake_packages(cache: Path, n: int = 36) -> None:
    """emoji-datasource and every Iconify set of the registry, each drawing n concepts as distinct shapes."""
    rng = np.random.default_rng(0)
    nm = cache / "npm" / "node_modules"
    entries = []
    for i in range(n):
        category, sub = CATEGORIES[i % len(CATEGORIES)]
        entries.append({"name": f"THING {chr(65 + i % 26)}{i}", "unified": f"1F{600 + i:03X}", "short_name": f"t{i}",
                        "short_names": [f"t{i}"], "category": category, "subcategory": sub, "image": "x.png"})
    packages = {sources.DATASOURCE[0]: ({"emoji.json": entries}, "MIT")}
    for style, s in sources.SETS.items():
        icons, chars = {}, {}
        for e in entries:
            name = f"thing-{e['unified'].lower()}"
            c, (x, y), r = rng.integers(0, 255, 3), rng.integers(10, 40, 2), int(rng.integers(10, 30))
            icons[name] = {"body": f'<circle cx="{x}" cy="{y}" r="{r}" fill="rgb({c[0]},{c[1]},{c[2]})"/>'}
            chars[e["unified"].lower()] = name
        info = {"name": s.title, "author": {"name": s.author, "url": s.source_url},
                "license": {"title": s.licence, "spdx": s.licence}}
        packages[s.package] = ({"icons.json": {"prefix": style, "width": 64, "height": 64, "icons": icons},
                                "chars.json": chars, "info.json": info}, s.licence)
    for package, (files, licence) in packages.items():
        folder = nm / package
        folder.mkdir(parents=True)
        (folder / "package.json").write_text(json.dumps({"name": package, "version": sources.PACKAGES[package],
                                                         "license": licence}))
        for name, content in files.items():
            (folder / name).write_text(json.dumps(content))
    (cache / "clip").mkdir(parents=True)  # a tiny stand-in for CLIP's merge list, so no wheel is downloaded
    with gzip.open(cache / "clip" / "bpe_simple_vocab_16e6.txt.gz", "wt") as f:
        f.write("#version\np i\nt h\na r\nth e</w>\n")


def tiny_config() -> BuildConfig:
    return BuildConfig(
        n_concepts=30, n_heldout=6, style_exemplars=3, gate_prompts=4, gate_samples=1, sample_steps=4,
        base=BaseModelConfig(vae_steps=10, diffusion_steps=12, log_every=5, vae_channels=(16, 16, 16),
                             unet_channels=(32, 32), text_hidden=32, text_heads=2, text_layers=1, ema_decay=0.9,
                             checkpoint_every=5, diffusion_batch_size=16),
        customization=CustomizationConfig(steps=3, batch_size=2), style_customization=CustomizationConfig(steps=3, batch_size=2),
        gain_floor=-1.0, judge=JudgeConfig(width=8, epochs=2),
        image_level=ImageLevelConfig(style_exemplars_per_look=2, style_prompts=2, seeds_per_prompt=4, pairs_per_model=2,
                                     min_gap=0.0, style_steps=3, pretraining_pairs=(2, 2), pretraining_seeds=4,
                                     min_style_probability=0.0, attempts=1),
        fisher_samples=16, fisher_samples_all=4)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    fake_packages(cache)
    out = tmp_path_factory.mktemp("mini") / "mini_abc"
    build(out, tiny_config(), cache=cache)
    return out, cache


def test_duotone_keeps_white_background():
    img = Image.new("RGB", (4, 4), "white")
    img.putpixel((1, 1), (0, 0, 0))
    out = np.asarray(duotone(img, (10, 20, 30), (200, 210, 220)))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [10, 20, 30]


def test_concepts_are_drawn_in_every_style_and_split_without_overlap(built):
    _, cache = built
    concepts = sources.load_concepts(sources.fetch_packages(cache / "npm"))
    usable = usable_concepts(concepts)
    assert len(usable) == 30 and all(c.category != "Symbols" for c in usable)  # 36 minus the 6 symbols
    pretrain, heldout = choose_concepts(concepts, tiny_config(), np.random.default_rng(0))
    assert len(heldout) == 6 and not {c.key for c in pretrain} & {c.key for c in heldout}


def test_built_benchmark_has_the_abc_layout_and_its_design(built):
    out, _ = built
    root, plan = out / "abc", json.loads((out / "plan.json").read_text())
    captions = (root / "laion_subset" / "captions.txt").read_text().splitlines()
    rows = json.loads((root / "laion_subset" / "sources.json").read_text())
    assert len(captions) == len(rows) == 24 * len(TRAINING_STYLES)  # pretraining concepts x training styles
    assert {r["style"] for r in rows} == set(TRAINING_STYLES) and not {r["style"] for r in rows} & set(HELDOUT_STYLES)
    heldout = set(plan["heldout_concepts"])
    assert not heldout & {r["key"] for r in rows}  # held-out concepts never reach pretraining
    style_words = set(TRAINING_STYLES.values())
    assert sum(any(f"style of {w} art" in c for w in style_words) for c in captions) > len(captions) / 2
    assert np.load(root / "laion_latents.npy").shape == (2 * len(captions), 4, 8, 8)
    assert (root / "sd_fisher.pt").is_file() and (root / "sd_fisher_all.pt").is_file()
    assert (root / "sd_ekfac.safetensors").is_file() and (root / "sd_ekfac.json").is_file()
    assert json.loads((root / "sd_ekfac_reduce.json").read_text())["kfac_approx"] == "reduce"
    assert "kfac_approx" not in json.loads((root / "sd_fisher.json").read_text())
    assert "CC BY-SA 4.0" in (out / "NOTICE").read_text()
    for spec in plan["models"]:  # exemplars: held-out styles for artchive / observed objects, held-out concepts else
        styles = {style for _, style, _ in spec["exemplars"]}
        keys = {key for key, _, _ in spec["exemplars"]}
        if spec["test_case"] in ("test_artchive", "test_observed_imagenet"):
            assert styles <= set(HELDOUT_STYLES) and not keys & heldout
        else:
            assert styles <= set(TRAINING_STYLES) and keys <= heldout
    gates = json.loads((out / "gates_models.json").read_text())
    report = gates_report(out)  # the README's tables: one row per model, kept or not
    assert sum(line.startswith(("| artchive", "| bamfg", "| unobserved", "| observed")) for line in
               report.splitlines()) == 16 and "base model's samples" in report
    kept = {t.model_path for split in ("test", "val") for t in load_tasks(out / "tasks" / f"{split}.json")}
    assert len(kept) == 16 - len(gates["dropped"])
    for split in ("test", "val"):
        for t in load_tasks(out / "tasks" / f"{split}.json"):
            assert (root / t.synth_image_path).is_file() and exemplar_paths(root, t)
    base = json.loads((out / "gates_base.json").read_text())
    assert 0 <= base["judge"]["concept_top1"] <= 1 and base["prompts"]["samples"] == 4
    log = json.loads((out / "sd-mini" / "training_log.json").read_text())
    assert [e["step"] for e in log["diffusion"]] == [5, 10, 12] and not (out / "sd-mini" / ".checkpoint").exists()
    assert Image.open(out / "grids" / "customized_models.png").size[1] > 16 * 32


def test_repo_scripts_run_unchanged_on_it(built, tmp_path):
    out, _ = built
    compute_training_loss.main(["--sd_version", str(out / "sd-mini"), "--dataroot", str(out / "abc"),
                                "--task_json", str(out / "tasks" / "val.json"), "--result_dir", str(tmp_path),
                                "--laion_subset_size", "48", "--device", "cpu"])
    assert len(list((tmp_path / "orig_loss").rglob("settings.json"))) >= 1


def test_comparison_runner_end_to_end(built, tmp_path):
    """benchmarks/mini_abc_comparison.py on the built miniature: AbU, its two controls, three baselines."""
    import csv
    import subprocess

    out, _ = built
    repo = Path(__file__).resolve().parent.parent
    methods = ["AbU", "AbU, wrong-image control", "AbU, noise-image control", "random", "pixel cosine",
               "gradient similarity (Fisher-whitened, K/V)"]
    flags = ["--bench", str(out), "--split", "val", "--out", str(tmp_path), "--unlearn_steps", "2",
             "--fisher_dataset_size", "1000", "--laion_subset_size", "0", "--methods"] + methods
    proc = subprocess.run(python_command("benchmarks/mini_abc_comparison.py", repo) + flags,
                          capture_output=True, text=True, cwd=repo, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    # the methods asked for, then AbU's image share (derived from AbU and its noise-image control: no run of its own)
    assert [r["method"] for r in rows] == methods + ["AbU, the image's share (influence minus the noise control's)"]
    n = len(load_tasks(out / "tasks" / "val.json"))
    for r in rows:
        assert 0 <= float(r["all ap"]) <= 1 and int(r["n"]) == n
    swapped = json.loads((tmp_path / "wrong_image_tasks.json").read_text())
    original = json.loads((out / "tasks" / "val.json").read_text())
    assert all(a["synth_image_path"] != b["synth_image_path"] and a["prompt"] == b["prompt"]
               for a, b in zip(swapped, original))
    noise = pickle_load(tmp_path / "abu_noise_image_control" / "influence" / original[0]["synth_image_path"][6:]
                        / "influence.pkl")
    assert noise["settings"]["noise_image"] is True
    width, height = Image.open(tmp_path / "comparison.png").size
    assert height >= 620 and width > 620 + 5 * max(len(r["method"]) for r in rows)  # the legend is not cut off
    md = (tmp_path / "comparison.md").read_text()
    assert "| AbU |" in md and "| method | artchive | bamfg | unobserved_imagenet | observed_imagenet |" in md
    assert "exemplar rise z (style / object)" in md and "AbU minus its controls" in md
    margins = md.split("AbU minus its controls")[1]
    assert "| AbU | " in margins and "wrong-image control: style" in margins


def pickle_load(path):
    import pickle

    return pickle.loads(Path(path).read_bytes())


def test_object_match_counts_top_candidates_whose_caption_names_the_object():

    from benchmarks.mini_abc_comparison import object_match

    captions = ["a dog", "a cat face", "a picture of a cat"]
    rank = np.array([0, 3, 2, 1])  # one exemplar (0), then LAION 2, 1, 0
    prompt = "a picture of a cat in the style of <new1> art"
    assert object_match(rank, 1, prompt, captions, k=2) == (1.0, 2 / 3)
    assert object_match(rank, 1, prompt, captions, k=3) == (2 / 3, 2 / 3)
    assert object_match(rank, 1, "a picture of a <new1> object", captions) == (None, None)


def test_method_time_survives_a_rerun_that_only_rescores(tmp_path):
    import time

    from benchmarks.runner import timed

    def work():
        time.sleep(0.2)
        (tmp_path / "q1").mkdir()
        (tmp_path / "q1" / "influence.pkl").write_bytes(b"x")
        return True

    ok, first = timed(tmp_path, "influence.pkl", work)
    assert ok and first >= 0.2
    assert timed(tmp_path, "influence.pkl", lambda: True) == (True, first)  # nothing new: the time stays
    assert json.loads((tmp_path / "timing.json").read_text())["seconds"] == first


def test_wrong_image_control_swaps_across_families_only_when_a_family_has_one_model(tmp_path):

    from benchmarks.mini_abc_comparison import wrong_image_tasks

    def task(case, model, q):
        return {"test_case": case, "model_path": model, "synth_image_path": f"{model}/{q}.png", "prompt": model + q}

    # two style models and one object model, which has nothing to swap with in its own family: its queries join the
    # style pool (the image-level test split's pretraining level is such a family)
    tasks = [task("test_artchive", "s1", "a"), task("test_artchive", "s1", "b"), task("test_bamfg", "s2", "a"),
             task("test_observed_imagenet", "o1", "a"), task("test_observed_imagenet", "o1", "b")]
    swapped = json.loads(wrong_image_tasks(_write(tmp_path / "t.json", tasks), tmp_path / "w.json").read_text())
    assert all(a["synth_image_path"].split("/")[0] != b["model_path"] for a, b in zip(swapped, tasks))
    with pytest.raises(RuntimeError, match="more than half"):  # one model: no other model's image to swap in
        wrong_image_tasks(_write(tmp_path / "o.json", tasks[3:]), tmp_path / "w.json")
    # validation-like: one style model and one object model: images swapped across the two
    val = [t for t in tasks if t["model_path"] in ("s1", "o1")]
    swapped = json.loads(wrong_image_tasks(_write(tmp_path / "v.json", val), tmp_path / "w.json").read_text())
    assert [t["synth_image_path"].split("/")[0] for t in swapped] == ["o1", "o1", "s1", "s1"]
    assert [t["prompt"] for t in swapped] == [t["prompt"] for t in val]
    # test-like: two models in each family: swapped within the family
    full = tasks + [task("test_bamfg", "s2", "b"), task("test_unobserved_imagenet", "o2", "a"),
                    task("test_unobserved_imagenet", "o2", "b")]
    swapped = json.loads(wrong_image_tasks(_write(tmp_path / "f.json", full), tmp_path / "w.json").read_text())
    for before, after in zip(full, swapped):
        owner = after["synth_image_path"].split("/")[0]
        assert owner != before["model_path"] and owner[0] == before["model_path"][0]


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_run_demo_uses_the_comparisons_sizing_and_tuned_n():
    """run_demo.sh spells the comparison's settings out in shell; they must not drift from benchmarks/runner.py."""
    import re

    repo = Path(__file__).resolve().parent.parent
    from benchmarks.runner import SIZING, TUNED

    mini = (repo / "run_demo.sh").read_text().split('B=data/mini_abc\n', 1)[1]
    flag = lambda name: float(re.search(rf"--{name} ([0-9.e+]+)", mini).group(1))  # noqa: E731
    assert flag("laion_subset_size") == SIZING["laion_subset_size"]
    assert flag("batch_size") == flag("loss_batch_size") == SIZING["batch_size"]
    assert flag("time_samples") == flag("loss_time_samples") == SIZING["time_samples"]
    assert flag("unlearn_steps") == SIZING["unlearn_steps"]
    assert flag("unlearn_grad_accum_steps") == SIZING["unlearn_grad_accum_steps"]
    assert flag("fisher_dataset_size") == TUNED["fisher_dataset_size"]


def test_look_position_and_contrast_pairs():
    from data.mini_abc_build.image_level import contrast_pairs, ink_colour, look_position, style_pair_of

    red, blue = np.array([200.0, 0, 0]), np.array([0.0, 0, 200])
    img = Image.new("RGB", (8, 8), "white")
    for x in range(8):
        for y in range(4):
            img.putpixel((x, y), (150, 0, 50))  # 32 inked pixels, a quarter of the way from red to blue
    assert ink_colour(img).tolist() == [150, 0, 50] and look_position(img, red, blue) == pytest.approx(0.25)
    assert np.isnan(look_position(Image.new("RGB", (8, 8), "white"), red, blue))  # no ink, no position
    # prompt 0's extremes pair first (0.1, 0.9), then the next two inwards (0.2, 0.5) while far enough apart; prompt
    # 1's two samples are 0.1 apart
    prompt_of = [0, 0, 0, 0, 0, 1, 1]
    position = [0.1, 0.9, 0.5, 0.2, 0.45, 0.4, 0.5]
    assert contrast_pairs(prompt_of, position, 0.35, n_pairs=5, per_prompt=3) == [(0, 1)]  # 0.5 - 0.2 < 0.35
    assert contrast_pairs(prompt_of, position, 0.3, n_pairs=5, per_prompt=3) == [(0, 1), (3, 2)]
    assert contrast_pairs(prompt_of, position, 0.3, n_pairs=1, per_prompt=3) == [(0, 1)]
    assert contrast_pairs(prompt_of, position, 0.05, n_pairs=5, per_prompt=1) == [(0, 1), (5, 6)]
    # the pretraining level: the two most confident samples of two different styles
    assert style_pair_of([2, 2, 0, 1], [0.9, 0.95, 0.7, 0.5], 0.6) == (1, 2)
    assert style_pair_of([2, 2, 0], [0.9, 0.95, 0.5], 0.6) is None


def test_image_level_cases_are_balanced_pairs_with_swapped_answers(built):
    from utils.tasks import image_ground_truth

    out, _ = built
    root = out / "abc"
    for split in ("val", "test"):
        tasks = load_tasks(out / "tasks" / f"image_{split}.json")
        # the tiny judge reads one style in every sample of the tiny base model: no pretraining pairs here (the next
        # test gives that level a judge that reads two)
        assert {t.test_case for t in tasks} >= {"test_looks_style", "test_looks_object"}
        pairs = {}
        for t in tasks:
            truth = image_ground_truth(root, t)
            entry = json.loads((root / "json" / f"{t.test_case}.json").read_text())[t.test_case_ind]
            pairs.setdefault((t.model_path, entry["image_level"][t.synth_image_path]["pair"]), []).append((t, truth))
            assert (root / t.synth_image_path).is_file() and all((root / p).is_file() for r in truth
                                                                 for p in r.matching + r.non_matching)
        for (model, _), members in pairs.items():  # one query of each look, same prompt, answers swapped
            assert len(members) == 2
            (a, ta), (b, tb) = members
            assert a.prompt == b.prompt and a.synth_image_path != b.synth_image_path
            assert [(r.matching, r.non_matching) for r in ta] == [(r.non_matching, r.matching) for r in tb]
    assert Image.open(out / "grids" / "image_level_customization.png").size[0] > 4 * 48
    assert AbC_files_unchanged(root)


def test_pretraining_level_pairs_two_styles_of_a_concept_on_an_identity_model(built, tmp_path):
    """With a judge that reads alternating styles, each concept gives a pair: same prompt, the picture of the concept
    in each query's style as its answer and the partner's as the wrong one; the identity model is the base's K/V."""
    import shutil

    import torch

    from data.build_mini_abc import Builder
    from data.mini_abc_build.image_level import ImageLevelStage
    from data.mini_abc_build.sampling import load_pipeline
    from utils.models import load_base_model

    out, cache = built
    copy = tmp_path / "mini_abc"
    shutil.copytree(out, copy)

    class AlternatingJudge:  # style 0, 1, 0, 1, ... with probability ~1
        def __call__(self, x):
            return torch.zeros(len(x), 3), 20.0 * torch.nn.functional.one_hot(torch.arange(len(x)) % 2, 4).float()

    config = tiny_config()
    builder = Builder(copy, config, cache)
    stage = ImageLevelStage(builder, config.image_level)
    rows = json.loads((copy / "abc" / "laion_subset" / "sources.json").read_text())
    stage.pretraining_level("val", builder.plan(), load_pipeline(builder.sd_dir), AlternatingJudge(), rows)
    entry, = stage.cases["test_pretraining_style"]
    truth = entry["image_level"]
    assert len(truth) == 2 * config.image_level.pretraining_pairs[0]
    by_pair = {}
    for path, t in truth.items():
        by_pair.setdefault(t["pair"], []).append(t)
        concept, in_style = t["readings"]
        assert (concept["name"], in_style["name"]) == ("concept in that style", "that style")
        picture = rows[int(Path(concept["matching"][0]).stem)]
        assert TRAINING_STYLES[picture["style"]] == t["label"] and picture["name"] in t["prompt"]
        assert concept["matching"][0] in in_style["matching"] and (copy / "abc" / path).is_file()
    for a, b in by_pair.values():
        assert a["prompt"] == b["prompt"] and a["label"] != b["label"]
        assert [(r["matching"], r["non_matching"]) for r in a["readings"]] == \
            [(r["non_matching"], r["matching"]) for r in b["readings"]]
    base = load_base_model(str(copy / "sd-mini"), "cpu")
    saved = torch.load(copy / "abc" / "models" / "pretraining" / "identity_val" / "pytorch_custom_diffusion_weights.pt")
    params = dict(base.unet.named_parameters())
    assert saved and all(torch.equal(v, params[k]) for k, v in saved.items())
    white = np.asarray(Image.open(copy / "abc" / "exemplar" / "pretraining" / "identity_val" / "000.png"))
    assert (white == 255).all()


def AbC_files_unchanged(root: Path) -> bool:
    """AbC's own test-case files carry no image-level key: their format is AbC's."""
    return all("image_level" not in e for tc in ("test_artchive", "test_bamfg", "test_observed_imagenet",
                                                 "test_unobserved_imagenet")
               for e in json.loads((root / "json" / f"{tc}.json").read_text()))


def test_image_level_comparison_and_evaluate_score_auc(built, tmp_path):
    """The comparison runner with --cases image, and evaluate.py, score AUC on the image-level cases; the noise-image
    control, whose two queries of a pair are the same prompt with the same noise, scores a pair-mean AUC of 0.5."""
    import csv
    import subprocess

    import evaluate
    from utils.evaluation import load_results, score_queries
    from utils.layout import ResultsLayout

    out, _ = built
    repo = Path(__file__).resolve().parent.parent
    methods = ["AbU", "AbU, noise-image control", "random"]
    flags = ["--bench", str(out), "--split", "val", "--cases", "image", "--out", str(tmp_path), "--unlearn_steps",
             "2", "--fisher_dataset_size", "1000", "--laion_subset_size", "0", "--methods"] + methods
    proc = subprocess.run(python_command("benchmarks/mini_abc_comparison.py", repo) + flags,
                          capture_output=True, text=True, cwd=repo, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    assert [r["method"] for r in rows] == methods + ["AbU, the image's share (influence minus the noise control's)"]
    for r in rows:
        for tc in ("looks_style", "looks_object"):
            assert 0 <= float(r[f"{tc} auc"]) <= 1
    md = (tmp_path / "comparison.md").read_text()
    assert "AUC, customization, style" in md and "AbU minus its controls, AUC" in md
    tasks = load_tasks(out / "tasks" / "image_val.json")
    found, missing = load_results(ResultsLayout(tmp_path / "abu_noise_image_control"), tasks)
    assert not missing
    noise = score_queries(found, dataroot=out / "abc")
    assert np.mean([r["auc"] for r in noise]) == pytest.approx(0.5, abs=1e-12)  # balanced pairs, prompt only
    evaluate.main(["--task_json", str(out / "tasks" / "image_val.json"), "--result_dir", str(tmp_path / "abu"),
                   "--dataroot", str(out / "abc"), "--out_dir", str(tmp_path / "eval")])
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert "| AUC | image mAP |" in summary and "family: looks_style" in summary


def test_cross_model_derangement_when_random_draws_cannot_find_one():
    from benchmarks.mini_abc_comparison import cross_model_derangement

    models = ["a"] * 8 + ["b"] * 8 + ["c"] * 8  # 1000 random draws almost never avoid all 24 same-model swaps
    perm = cross_model_derangement(models, np.random.default_rng(0), tries=0)
    assert sorted(perm.tolist()) == list(range(24)) and all(models[p] != models[k] for k, p in enumerate(perm))
    assert cross_model_derangement(["a", "a", "a", "b"], np.random.default_rng(0), tries=5) is None  # a holds 3 of 4


def test_counterfactual_stage_retrains_with_the_builders_recipe_and_resumes(built, tmp_path):
    """The counterfactual stage on a copy of the built miniature: every set of every chosen model is retrained and
    measured; the full set at the model's own seed is the committed model again (same recipe, prior images, seed);
    the task files gain every sample of the labelled prompts; a rerun does nothing; the benchmark scores it."""
    import csv
    import shutil
    import subprocess

    from data.mini_abc_build.counterfactual import CounterfactualConfig, load_truth
    from utils.tasks import image_ground_truth

    out, cache = built
    copy = tmp_path / "mini_abc"
    shutil.copytree(out, copy)
    labelled_before = json.loads((copy / "tasks" / "image_val.json").read_text())
    config = tiny_config()
    config.counterfactual = CounterfactualConfig(half_subsets=2, time_samples=4, loss_batch_size=8,
                                                 abc_seeds_per_prompt=2, null_runs=1, training_seeds=3)
    chosen = ["looks_style__looks_0", "imagenet__" + next(  # a two-look style model and a one-exemplar AbC model
        e["class_id"] for e in json.loads((copy / "abc" / "json" / "test_observed_imagenet.json").read_text())
        if e["split"] == "val")]
    build(copy, config, stages=["counterfactual"], cache=cache, bases=chosen)
    plan = json.loads((copy / "counterfactual" / "plan.json").read_text())
    kinds = {b["kind"] for b in plan["bases"]}
    assert {"two-look style", "two-look object", "AbC style", "AbC object"} <= kinds
    assert sorted(p.name for p in (copy / "counterfactual" / "losses").iterdir()) == sorted(chosen)
    for base in (b for b in plan["bases"] if b["name"] in chosen):
        truth = load_truth(copy, base["name"])
        assert set(truth["loss"]) == {s["name"] for s in base["sets"] if s["tier"] <= 2} | {"committed"}
        assert {s["name"] for s in base["sets"] if s["tier"] == 3} >= {"full@2", "loo0@2"}  # planned, not built
        assert truth["queries"] == [q["path"] for q in base["queries"]]
        for values in truth["loss"].values():
            assert values.shape == (len(base["queries"]),) and np.isfinite(values).all()
        np.testing.assert_allclose(truth["loss"]["full@0"], truth["loss"]["committed"], rtol=1e-5)
        assert not np.allclose(truth["loss"]["full@0"], truth["loss"]["full@1"])  # another seed, another model
        n = len(base["exemplars"])
        assert {f"loo{e}@0" for e in range(n)} <= set(truth["loss"])
        if base["kind"] == "two-look style":  # 4 exemplars here: looks alone and 2 halves of 2
            looks = {f"look{x}@{k}" for x in "AB" for k in range(3)}  # each look alone at every training seed
            assert looks | {"half00@0", "half01@0", "null0@0"} <= set(truth["loss"])
            null = next(s for s in base["sets"] if s["name"] == "null0@0")  # every exemplar, a 1/n share redrawn
            assert null["members"] == list(range(n)) and null["resample"] == [1 / n, 0]  # (test_mini_abc_customize)
            assert all(len(s["members"]) == n // 2 for s in base["sets"] if s["name"].startswith("half"))
    # the image-level task file: the labelled queries as before, then every other sample of their prompts
    image_tasks = load_tasks(copy / "tasks" / "image_val.json")
    assert [t.synth_image_path for t in image_tasks[:len(labelled_before)]] == \
        [t["synth_image_path"] for t in labelled_before]
    extra = image_tasks[len(labelled_before):]
    assert extra and all(image_ground_truth(copy / "abc", t) is None for t in extra)
    assert len(load_tasks(copy / "tasks" / "counterfactual_val.json")) == \
        sum(len(b["queries"]) for b in plan["bases"] if b["split"] == "val")
    stamps = {p: p.stat().st_mtime_ns for p in (copy / "counterfactual" / "losses").rglob("*.npz")}
    build(copy, config, stages=["counterfactual"], cache=cache, bases=chosen)  # finished: nothing is redone
    assert {p: p.stat().st_mtime_ns for p in (copy / "counterfactual" / "losses").rglob("*.npz")} == stamps

    repo = Path(__file__).resolve().parent.parent
    flags = ["--bench", str(copy), "--split", "val", "--out", str(tmp_path / "runs"), "--table_dir", str(tmp_path),
             "--unlearn_steps", "2", "--fisher_dataset_size", "1000", "--laion_subset_size", "0", "--no_gradient"]
    proc = subprocess.run(python_command("benchmarks/counterfactual.py", repo) + flags,
                          capture_output=True, text=True, cwd=repo, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "counterfactual_val.md").read_text()
    assert "ceiling: the truth at a second training seed" in md and "AbU, stop rule: combined" in md
    assert "ceiling: the look dependence at a second training seed" in md  # the looks alone at both seeds
    rows = list(csv.DictReader(open(tmp_path / "counterfactual_val.csv")))
    loo = [float(r["mean"]) for r in rows if r["metric"] == "LOO" and r["kind"] == "two-look style"]
    assert loo and all(-1 <= v <= 1 for v in loo if v == v)
