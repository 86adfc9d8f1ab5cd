"""Both stages and the evaluation end to end on the tiny benchmark, and their handling of bad input."""
import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import compute_influence
import compute_training_loss
import evaluate
from utils.errors import InputError
from benchmarks.runner import python_command
from helpers import STAGE1, paths, stage2_flags

REPO = Path(__file__).resolve().parent.parent
STAGE2 = stage2_flags()
MODELS = ["imagenet/n01440764_0000", "artchive/tinyartist"]
QUERIES = ["imagenet/gpt/n01440764_0000/samples/00000.png", "imagenet/gpt/n01440764_0000/samples/00001.png",
           "artchive/gpt/tinyartist/samples/00000.png", "artchive/gpt/tinyartist/samples/00001.png"]


@pytest.fixture(scope="module")
def finished(tiny_abc, tmp_path_factory):
    """Stage 1 and stage 2 run once on the tiny benchmark."""
    results = tmp_path_factory.mktemp("results")
    compute_training_loss.main(paths(tiny_abc, results) + STAGE1)
    compute_influence.main(paths(tiny_abc, results) + STAGE2)
    return results


def run_cli(script, args):
    return subprocess.run(python_command(script) + args, capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_outputs_at_the_documented_paths(finished):
    for model in MODELS:
        cache = finished / "orig_loss" / model
        settings = json.loads((cache / "settings.json").read_text())
        assert settings["batch_size"] == 20 and settings["time_samples"] == 5 and settings["seed"] == 0
        assert np.load(cache / "exemplar_loss.npy").shape == (6,)  # 3 exemplars, unflipped + flipped
        assert np.load(cache / "laion_loss.npy").shape == (24,)
    for query in QUERIES:
        out = finished / "influence" / query
        assert np.load(out / "laion_loss.npy").shape == (24,)
        assert (out / "visualization.jpg").stat().st_size > 1000
        result = pickle.loads((out / "influence.pkl").read_bytes())
        assert result["influence"].shape == (15,) and sorted(result["rank"]) == list(range(15))
        assert result["n_exemplar"] == 3
        before, after = result["query_loss"]
        assert after > before  # unlearning raised the query's own loss (same noise before and after)


def test_influence_is_after_minus_before_with_flips_folded(finished):
    cache, out = finished / "orig_loss" / MODELS[0], finished / "influence" / QUERIES[0]
    rise = np.load(out / "laion_loss.npy").astype(np.float64) - np.load(cache / "laion_loss.npy")
    result = pickle.loads((out / "influence.pkl").read_bytes())
    np.testing.assert_allclose(result["influence"][3:], np.maximum(rise[:12], rise[12:]))


def test_stage2_is_repeatable(finished, tiny_abc, tmp_path):
    """Same seed, same everything: a second run gives bit-identical after-losses (docs/method.md, pitfall 4)."""
    results = tmp_path / "r"
    (results / "orig_loss").mkdir(parents=True)
    os.symlink(finished / "orig_loss" / "imagenet", results / "orig_loss" / "imagenet")
    os.symlink(finished / "orig_loss" / "artchive", results / "orig_loss" / "artchive")
    compute_influence.main(paths(tiny_abc, results) + STAGE2)
    for q in QUERIES:
        assert np.array_equal(np.load(results / "influence" / q / "laion_loss.npy"),
                              np.load(finished / "influence" / q / "laion_loss.npy"))


def test_rerun_skips_and_overwrite_recomputes(finished, tiny_abc, capsys):
    pkl = finished / "influence" / QUERIES[0] / "influence.pkl"
    cache = finished / "orig_loss" / MODELS[0] / "laion_loss.npy"
    stamps = (pkl.stat().st_mtime_ns, cache.stat().st_mtime_ns)
    compute_training_loss.main(paths(tiny_abc, finished) + STAGE1)
    compute_influence.main(paths(tiny_abc, finished) + STAGE2)
    out = capsys.readouterr().out
    assert "2 already cached, 0 to do" in out and "4 done, 0 to do" in out
    assert (pkl.stat().st_mtime_ns, cache.stat().st_mtime_ns) == stamps
    before = np.load(cache)
    compute_training_loss.main(paths(tiny_abc, finished) + STAGE1 + ["--overwrite"])
    assert cache.stat().st_mtime_ns != stamps[1]
    assert np.array_equal(np.load(cache), before)  # recomputed, and seeded: the same numbers
    ranks = pickle.loads(pkl.read_bytes())["rank"]
    compute_influence.main(paths(tiny_abc, finished) + STAGE2 + ["--overwrite"])
    assert pkl.stat().st_mtime_ns != stamps[0]
    assert np.array_equal(pickle.loads(pkl.read_bytes())["rank"], ranks)


def test_evaluate_writes_tables(finished, tiny_abc, tmp_path, capsys):
    evaluate.main(["--task_json", tiny_abc["task_json"], "--result_dir", str(finished), "--out_dir", str(tmp_path)])
    lines = (tmp_path / "per_query.csv").read_text().splitlines()
    assert lines[0] == "query,test_case,family,n_exemplar,recall@5,recall@10,recall@100,ap" and len(lines) == 5
    md = (tmp_path / "summary.md").read_text()
    assert "| family: style | 2 |" in md and "| all | 4 |" in md
    assert "recall@100" in capsys.readouterr().out
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    all_row = dict(zip(summary[0].split(","), summary[-1].split(",")))
    assert float(all_row["recall@100"]) == 1.0  # 15 candidates: every exemplar is in the top 100


def test_stage2_refuses_a_cache_made_with_other_settings(finished, tiny_abc, tmp_path):
    for flag, value in (("--loss_batch_size", "10"), ("--loss_time_samples", "10"), ("--seed", "1")):
        args = [a for a in STAGE2]
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        with pytest.raises(InputError, match="made with other settings"):
            compute_influence.main(paths(tiny_abc, finished) + args + ["--overwrite"])
    # nothing computed before was lost
    assert all((finished / "influence" / q / "influence.pkl").is_file() for q in QUERIES)


@pytest.mark.parametrize("damage, script, message", [
    ("remove_latents", "compute_training_loss.py", "laion_latents.npy; run data/download_abc.sh"),
    ("remove_exemplar", "compute_training_loss.py", "exemplar image"),
    ("bad_json", "compute_training_loss.py", "not valid JSON"),
    ("unknown_test_case", "compute_influence.py", "test-case file not found"),
    ("models_disagree", "compute_influence.py", "share model_path 'models/imagenet/n01440764_0000' but not train_prompt"),
    ("fisher_missing_param", "compute_influence.py", "no Fisher entry for 1 of the 8"),
    ("missing_cache", "compute_influence.py", "no finished pre-unlearning loss cache"),
])
def test_bad_inputs_exit_nonzero_with_a_message(tiny_copy, tmp_path, damage, script, message):
    root, tasks_path = Path(tiny_copy["dataroot"]), Path(tiny_copy["task_json"])
    results = tmp_path / "results"
    keep = results / "influence" / "old" / "influence.pkl"  # an earlier result that must survive
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"earlier")
    if script == "compute_influence.py" and damage != "missing_cache":
        compute_training_loss.main(paths(tiny_copy, results) + STAGE1)
    if damage == "remove_latents":
        (root / "laion_latents.npy").unlink()
    elif damage == "remove_exemplar":
        next((root / "exemplar" / "artchive").rglob("*.png")).unlink()
    elif damage == "bad_json":
        tasks_path.write_text('[{"synth_image_path": ')
    elif damage == "unknown_test_case":
        tasks_path.write_text(json.dumps([dict(t, test_case="test_laion") for t in json.loads(tasks_path.read_text())]))
    elif damage == "models_disagree":
        tasks = json.loads(tasks_path.read_text())
        tasks[1]["train_prompt"] = "<new1> dog"
        tasks_path.write_text(json.dumps(tasks))
    elif damage == "fisher_missing_param":
        fisher = torch.load(root / "sd_fisher.pt")
        del fisher["mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight"]
        torch.save(fisher, root / "sd_fisher.pt")
    flags = STAGE1 if script == "compute_training_loss.py" else STAGE2
    proc = run_cli(script, paths(tiny_copy, results) + flags)
    assert proc.returncode == 2, proc.stderr
    assert "error: " in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert keep.read_bytes() == b"earlier"
    assert not list(results.rglob("*.tmp-*"))


def test_stage1_refuses_to_skip_a_cache_made_with_other_settings(finished, tiny_abc):
    """A finished cache is skipped only when its settings match; otherwise the rerun names the difference."""
    compute_training_loss.main(paths(tiny_abc, finished) + STAGE1)  # same flags: skipped, no error
    other = STAGE1[:STAGE1.index("--time_samples") + 1] + ["4"] + STAGE1[STAGE1.index("--time_samples") + 2:]
    with pytest.raises(InputError, match="time_samples: cache has 5, this run uses 4"):
        compute_training_loss.main(paths(tiny_abc, finished) + other)


def test_ablation_flags_and_shared_cache(finished, tiny_abc, tmp_path):
    """--loss_cache_dir shares one stage 1; --preconditioner none / ekfac / kfac and --drop_concept_token change the
    result."""
    import compute_fisher

    base = paths(tiny_abc, tmp_path / "plain") + STAGE2 + ["--loss_cache_dir", str(finished / "orig_loss")]
    compute_influence.main(base)
    plain = pickle.loads((tmp_path / "plain" / "influence" / QUERIES[0] / "influence.pkl").read_bytes())
    assert np.array_equal(plain["influence"],
                          pickle.loads((finished / "influence" / QUERIES[0] / "influence.pkl").read_bytes())["influence"])
    ekfac = tmp_path / "ekfac.safetensors"
    compute_fisher.main(["--dataroot", tiny_abc["dataroot"], "--sd_version", tiny_abc["sd_version"], "--kind", "ekfac",
                         "--laion_subset_size", "12", "--num_samples", "24", "--batch_size", "8", "--device", "cpu",
                         "--output", str(ekfac)])
    for flags in (["--preconditioner", "none", "--unlearn_lr", "0.01"], ["--drop_concept_token"],
                  ["--preconditioner", "ekfac", "--fisher_path", str(ekfac)],
                  ["--preconditioner", "kfac", "--fisher_path", str(ekfac), "--unlearn_lr", "0.001"]):
        out = tmp_path / "_".join(flags[:2])
        args = [a if a != str(tmp_path / "plain") else str(out) for a in base] + flags
        compute_influence.main(args)
        other = pickle.loads((out / "influence" / QUERIES[0] / "influence.pkl").read_bytes())
        assert other["settings"][flags[0].lstrip("-")] == (flags[1] if len(flags) > 1 else True)
        assert not np.allclose(other["influence"], plain["influence"])


def test_influence_timesteps_below_reads_the_rise_at_the_low_grid_timesteps(finished, tiny_abc, tmp_path):
    """--influence_timesteps_below 500 at T = 5 (t = 0, 200, 400 of the grid): the same unlearning, and the rise of
    those timesteps' mean, each under the noise the full pass gives it; checked against the per-timestep losses of the
    model unlearn.py saves, measured apart."""
    import unlearn
    from utils.customization import apply_customization
    from utils.data import LaionCandidates
    from utils.losses import LossMeasurement, mean_over_timesteps
    from utils.metrics import fold_flips
    from utils.models import load_base_model
    from utils.weights import PristineWeights

    shared = STAGE2 + ["--loss_cache_dir", str(finished / "orig_loss")]
    compute_influence.main(paths(tiny_abc, tmp_path / "low") + shared + ["--influence_timesteps_below", "500"])
    low = pickle.loads((tmp_path / "low" / "influence" / QUERIES[0] / "influence.pkl").read_bytes())
    plain = pickle.loads((finished / "influence" / QUERIES[0] / "influence.pkl").read_bytes())
    assert low["query_loss"] == plain["query_loss"] and low["settings"]["influence_timesteps_below"] == 500
    assert low["forward_equivalents"]["loss tracking"] == (6 + 24) * 3  # rows x 3 of the 5 timesteps

    unlearn.main(paths(tiny_abc, tmp_path / "low") + shared + ["--query", "synth/" + QUERIES[0], "--out",
                                                               str(tmp_path / "unlearned")])
    model = load_base_model(tiny_abc["sd_version"], "cpu")
    apply_customization(model, PristineWeights(model.unet), tmp_path / "unlearned")
    laion = LaionCandidates(Path(tiny_abc["dataroot"]), 12)
    after_by_t = LossMeasurement(20, 5, 0, "fp32", False, "cpu").collect(model.unet, model.scheduler, laion, "after",
                                                                        per_timestep=True)
    np.testing.assert_array_equal(mean_over_timesteps(after_by_t).numpy(),
                                  np.load(finished / "influence" / QUERIES[0] / "laion_loss.npy"))
    after_low = np.load(tmp_path / "low" / "influence" / QUERIES[0] / "laion_loss.npy")
    np.testing.assert_allclose(after_low, mean_over_timesteps(after_by_t[:, :3]).numpy(), rtol=1e-6)
    before_by_t = np.load(finished / "orig_loss" / MODELS[0] / "laion_loss_by_t.npy")
    rise = after_low.astype(np.float64) - mean_over_timesteps(before_by_t[:, :3]).numpy()
    np.testing.assert_allclose(low["influence"][3:], fold_flips(rise))
    ex_before = mean_over_timesteps(np.load(finished / "orig_loss" / MODELS[0] / "exemplar_loss_by_t.npy")[:, :3])
    ex_after = np.load(tmp_path / "low" / "influence" / QUERIES[0] / "exemplar_loss.npy").astype(np.float64)
    np.testing.assert_allclose(low["influence"][:3], fold_flips(ex_after - ex_before.numpy()))
    assert not np.allclose(low["influence"], plain["influence"])
    # every grid timestep below the limit: the paper's influence, to the bit
    compute_influence.main(paths(tiny_abc, tmp_path / "all") + shared + ["--influence_timesteps_below", "1000"])
    every = pickle.loads((tmp_path / "all" / "influence" / QUERIES[0] / "influence.pkl").read_bytes())
    assert np.array_equal(every["influence"], plain["influence"])
    # the collateral stopping rule compares its all-T checks with the all-T losses before, flag or not
    stops = []
    for name, extra in (("c", []), ("c_low", ["--influence_timesteps_below", "500"])):
        rule = ["--stop_rule", "collateral", "--stop_every", "1", "--stop_reference", "4", "--stop_target", "1e9"]
        compute_influence.main(paths(tiny_abc, tmp_path / name) + shared + rule + extra)
        stops.append(pickle.loads((tmp_path / name / "influence" / QUERIES[0] / "influence.pkl").read_bytes()))
    assert stops[0]["query_loss"] == stops[1]["query_loss"]
    assert [c["collateral"] for c in stops[0]["stop"]["checks"]] == [c["collateral"] for c in stops[1]["stop"]["checks"]]


def test_a_finished_result_made_with_another_fisher_file_is_refused(finished, tiny_abc, tmp_path, capsys):
    """The Fisher file is an input of the result (its bytes' fingerprint): the same bytes elsewhere are reused, another
    file under the same flags (a K-FAC-reduce file for an expand one, a rebuilt Fisher) is refused, naming it."""
    import shutil

    fisher = Path(tiny_abc["dataroot"]) / "sd_fisher.pt"
    (tmp_path / "same").mkdir()
    shutil.copy(fisher, tmp_path / "same" / "sd_fisher.pt")
    compute_influence.main(paths(tiny_abc, finished) + STAGE2 + ["--fisher_path", str(tmp_path / "same" / "sd_fisher.pt")])
    assert "4 done, 0 to do" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    torch.save({k: 2 * v for k, v in torch.load(fisher).items()}, tmp_path / "other" / "sd_fisher.pt")
    with pytest.raises(InputError, match="made from other inputs") as e:
        compute_influence.main(paths(tiny_abc, finished) + STAGE2 + ["--fisher_path",
                                                                     str(tmp_path / "other" / "sd_fisher.pt")])
    assert "fisher: the result has" in str(e.value)


def test_baselines_write_rankings_evaluate_reads(finished, tiny_abc, tmp_path):
    import compute_baselines

    for method in ("random", "pixel", "vae", "gradient"):
        out = tmp_path / method
        compute_baselines.main(["--method", method, "--task_json", tiny_abc["task_json"], "--result_dir", str(out),
                                "--loss_cache_dir", str(finished / "orig_loss"), "--sd_version", tiny_abc["sd_version"],
                                "--dataroot", tiny_abc["dataroot"], "--laion_subset_size", "12"])
        r = pickle.loads((out / "influence" / QUERIES[0] / "influence.pkl").read_bytes())
        assert r["influence"].shape == (15,) and sorted(r["rank"]) == list(range(15))
        evaluate.main(["--task_json", tiny_abc["task_json"], "--result_dir", str(out), "--out_dir", str(out / "eval")])
    # the pixel baseline ranks an exact copy of the query first
    from utils.baselines import cosine_to_rows
    q = torch.rand(3, 4, 4)
    assert cosine_to_rows(q, torch.stack([torch.rand(3, 4, 4), q])).argmax() == 1


def test_a_run_that_unlearns_nothing_scores_at_the_bottom(finished, tiny_abc, tmp_path):
    """Zero steps: every influence is exactly 0 and the tie goes against the exemplars, as in AbC's evaluation."""
    out = tmp_path / "nothing"
    args = [a if a != "3" else "0" for a in STAGE2]  # --unlearn_steps 0
    compute_influence.main(paths(tiny_abc, out) + args + ["--loss_cache_dir", str(finished / "orig_loss")])
    result = pickle.loads((out / "influence" / QUERIES[0] / "influence.pkl").read_bytes())
    assert not result["influence"].any()
    assert result["rank"].tolist() == list(range(3, 15)) + [0, 1, 2]
    evaluate.main(["--task_json", tiny_abc["task_json"], "--result_dir", str(out), "--out_dir", str(tmp_path / "e")])
    rows = (tmp_path / "e" / "per_query.csv").read_text().splitlines()[1:]
    worst_ap = (1 / 13 + 2 / 14 + 3 / 15) / 3  # three exemplars at ranks 13, 14, 15 of 15
    assert all(float(r.split(",")[-1]) == pytest.approx(worst_ap) for r in rows)
    assert all(float(r.split(",")[4]) == 0 for r in rows)  # Recall@5
