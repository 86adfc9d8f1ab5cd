"""The two-stage mode (utils/screening.py): subset losses keep the exact pass's noise, the first-order screen is a
directional derivative, and re-scoring every candidate reproduces exact AbU bit for bit."""
import pickle

import numpy as np
import pytest
import torch

import compute_influence
import compute_training_loss
from utils.data import LaionCandidates
from utils.errors import InputError
from utils.losses import collect_losses
from utils.weights import select_parameter_names
from utils.screening import SCREENS, caption_screen, could_enter_top, first_order_screen, screen_timesteps
from helpers import STAGE1, paths, stage2_flags

STAGE2 = stage2_flags()
QUERY = "imagenet/gpt/n01440764_0000/samples/00000.png"


@pytest.fixture(scope="module")
def cache(tiny_abc, tmp_path_factory):
    results = tmp_path_factory.mktemp("two_stage")
    compute_training_loss.main(paths(tiny_abc, results) + STAGE1)
    return results


def load(results, query=QUERY):
    return pickle.loads((results / "influence" / query / "influence.pkl").read_bytes())


def test_subset_losses_keep_the_noise_of_the_full_pass(base_model, tiny_abc):
    laion = LaionCandidates(tiny_abc["dataroot"], subset_size=12)
    run = dict(batch_size=20, time_samples=5, seed=0)
    full = collect_losses(base_model.unet, base_model.scheduler, laion, per_timestep=True, **run)
    assert full.shape == (24, 5)
    np.testing.assert_array_equal(collect_losses(base_model.unet, base_model.scheduler, laion, **run),
                                  torch.from_numpy(full).mean(1).numpy())
    rows, steps = np.array([3, 4, 17, 23]), np.array([1, 3])  # rows of different batches, 2 of the 5 timesteps
    part = collect_losses(base_model.unet, base_model.scheduler, laion, rows=rows, timestep_index=steps,
                          per_timestep=True, **run)
    np.testing.assert_allclose(part, full[rows][:, steps], rtol=1e-5)  # other batch mates: only the last bits move


def test_screen_timesteps_spread_over_the_grid():
    assert screen_timesteps(10, 1).tolist() == [5] and screen_timesteps(10, 2).tolist() == [2, 7]
    assert screen_timesteps(5, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="between 1 and"):
        screen_timesteps(5, 6)


def test_first_order_screen_is_the_directional_derivative(base_model, tiny_abc):
    """Against a central finite difference of each row's loss along each query's weight change."""
    laion = LaionCandidates(tiny_abc["dataroot"], subset_size=3)
    names = select_parameter_names(base_model.unet, "cross-attn-kv")
    params = dict(base_model.unet.named_parameters())
    g = torch.Generator().manual_seed(0)
    deltas = [{n: 0.5 * params[n].detach().std() * torch.randn(params[n].shape, generator=g) for n in names}
              for _ in range(2)]
    run = dict(batch_size=10, time_samples=5, seed=0)
    steps = np.array([1, 3])
    screen = first_order_screen(base_model.unet, base_model.scheduler, laion, deltas, timestep_index=steps,
                                device="cpu", precision="fp32", **run)
    assert screen.shape == (6, 2)
    eps = 1e-2
    for q, delta in enumerate(deltas):
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                for n in names:
                    params[n].add_(sign * eps * delta[n])
            losses.append(collect_losses(base_model.unet, base_model.scheduler, laion, timestep_index=steps,
                                         per_timestep=True, **run).astype(np.float64).mean(1))
            with torch.no_grad():
                for n in names:
                    params[n].sub_(sign * eps * delta[n])
        finite = (losses[0] - losses[1]) / (2 * eps)
        np.testing.assert_allclose(screen[:, q], finite, rtol=0.02, atol=1e-5)
        assert np.abs(finite).max() > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("screen,flips", [(s, 2) for s in SCREENS] + [("coarse", 1), ("coarse+caption", 1)])
def test_rescoring_every_candidate_is_exact_abu(tiny_abc, cache, tmp_path, screen, flips):
    exact, two = tmp_path / "exact", tmp_path / "two"
    shared = ["--loss_cache_dir", str(cache / "orig_loss")]
    compute_influence.main(paths(tiny_abc, exact) + STAGE2 + shared)
    compute_influence.main(paths(tiny_abc, two) + STAGE2 + shared + ["--mode", "two-stage", "--screen", screen,
                                                                      "--rescore_top", "15", "--screen_flips",
                                                                      str(flips)])
    for query in (QUERY, "artchive/gpt/tinyartist/samples/00001.png"):
        a, b = load(exact, query), load(two, query)
        assert np.array_equal(a["influence"], b["influence"]) and np.array_equal(a["rank"], b["rank"])
        assert a["query_loss"] == b["query_loss"] and b["mode"] == "two-stage" and b["rescored"] == 15
        assert b["screen"].shape == (15,) and np.isfinite(b["screen"]).all()
        cost_a, cost_b = a["forward_equivalents"], b["forward_equivalents"]
        assert cost_a["loss tracking"] == 30 * 5 == cost_b["re-scoring"]  # 15 candidates x 2 flips x T

        if screen == "caption":
            assert cost_b["screen"] == 0  # no UNet pass
        else:  # 15 candidates x the flips screened x T' = 1 (the first-order screen: 3 passes shared by 2 queries)
            assert cost_b["screen"] == 15 * flips * (1.5 if screen == "first-order" else 1)


def test_the_one_flip_screen_is_the_unflipped_images_rise(tiny_abc, cache, tmp_path):
    exact, two = tmp_path / "exact", tmp_path / "two"
    shared = ["--loss_cache_dir", str(cache / "orig_loss")]
    compute_influence.main(paths(tiny_abc, exact) + STAGE2 + shared)
    compute_influence.main(paths(tiny_abc, two) + STAGE2 + shared + [  # the screen at all T = 5 timesteps
        "--mode", "two-stage", "--screen_flips", "1", "--screen_time_samples", "5", "--rescore_top", "2"])
    before = [np.load(cache / "orig_loss" / "imagenet" / "n01440764_0000" / f) for f in ("exemplar_loss.npy",
                                                                                          "laion_loss.npy")]
    after = [np.load(exact / "influence" / QUERY / f) for f in ("exemplar_loss.npy", "laion_loss.npy")]
    unflipped = np.concatenate([(a - b)[:len(b) // 2] for a, b in zip(after, before)]).astype(np.float64)
    assert np.allclose(load(two)["screen"], unflipped, rtol=0, atol=1e-6)  # each candidate's unflipped row
    assert load(two)["forward_equivalents"]["screen"] == 15 * 5


def test_one_flip_applies_to_the_coarse_screens_only(tiny_abc, cache, tmp_path):
    with pytest.raises(InputError, match="--screen_flips 1 applies to the coarse screens"):
        compute_influence.main(paths(tiny_abc, tmp_path) + STAGE2 + ["--mode", "two-stage", "--screen", "caption",
                                                                      "--screen_flips", "1"])


def test_the_caption_screen_is_what_the_k_v_change_does_to_a_caption(base_model, tiny_abc):
    """One candidate's caption score equals sum over the cross-attention K/V layers of ||to_k'(c) - to_k(c)||^2,
    computed by the UNet's own modules before and after a weight change; flips share it, exemplars share one."""
    from utils.encoders import encode_prompt

    laion = LaionCandidates(tiny_abc["dataroot"], subset_size=12)
    gen = torch.Generator().manual_seed(0)
    names = [n for n in select_parameter_names(base_model.unet, "cross-attn-kv") if n.endswith(".weight")]
    params = dict(base_model.unet.named_parameters())
    deltas = [{n: torch.randn(params[n].shape, generator=gen) * 0.1 for n in names} for _ in range(2)]
    exemplar_text = encode_prompt(base_model.tokenizer, base_model.text_encoder, "<new1> fish").cpu()
    scores = caption_screen(deltas, exemplar_text, 6, laion.text_embeddings[:12])
    assert scores["exemplar"].shape == (6, 2) and scores["laion"].shape == (24, 2)
    np.testing.assert_array_equal(scores["laion"][:12], scores["laion"][12:])
    caption = torch.from_numpy(np.array(laion.text_embeddings[7]))
    for q, delta in enumerate(deltas):
        direct = 0.0
        for n in names:
            module = base_model.unet.get_submodule(n[:-len(".weight")])
            with torch.no_grad():
                before = module(caption).double()
                moved = torch.nn.functional.linear(caption, module.weight + delta[n]).double()
            direct += float((moved - before).pow(2).sum())
        assert scores["laion"][7, q] == pytest.approx(direct, rel=1e-5)
        assert np.all(scores["exemplar"][:, q] == scores["exemplar"][0, q])


def test_two_stage_ranks_the_rest_by_the_screen(tiny_abc, cache, tmp_path):
    out = tmp_path / "top4"
    compute_influence.main(paths(tiny_abc, out) + STAGE2 + ["--loss_cache_dir", str(cache / "orig_loss"),
                                                             "--mode", "two-stage", "--rescore_top", "4",
                                                             "--screen_time_samples", "2"])
    r = load(out)
    measured = np.flatnonzero(~np.isnan(r["influence"]))
    assert len(measured) == 4 and sorted(r["rank"].tolist()) == list(range(15))
    top4 = set(np.argsort(-r["screen"], kind="stable")[:4].tolist())
    assert set(measured.tolist()) == top4  # the screen's top 4 were re-measured (no ties in this screen)
    assert set(r["rank"][:4].tolist()) == top4  # and rank first, by their exact influence
    rest = r["rank"][4:]
    assert np.all(np.diff(r["screen"][rest]) <= 0)  # the others follow by the screen
    assert r["forward_equivalents"]["screen"] == 30 * 2 and r["forward_equivalents"]["re-scoring"] == 8 * 5
    after = np.load(out / "influence" / QUERY / "laion_loss.npy")
    assert np.isnan(after).sum() == 24 - 2 * len([i for i in measured if i >= 3])


def test_a_finished_query_of_other_settings_is_not_skipped(tiny_abc, cache, tmp_path):
    out = tmp_path / "r"
    flags = STAGE2 + ["--loss_cache_dir", str(cache / "orig_loss"), "--mode", "two-stage", "--rescore_top", "4"]
    compute_influence.main(paths(tiny_abc, out) + flags)
    compute_influence.main(paths(tiny_abc, out) + flags)  # the same settings: skipped
    with pytest.raises(InputError, match="rescore_top: result has 4, this run uses 5"):
        compute_influence.main(paths(tiny_abc, out) + flags[:-1] + ["5"])
    with pytest.raises(InputError, match="mode: result has 'two-stage', this run uses 'exact'"):
        compute_influence.main(paths(tiny_abc, out) + STAGE2 + ["--loss_cache_dir", str(cache / "orig_loss")])


def test_could_enter_top_calibrates_the_screen_on_the_rescored():
    screen = np.array([5.0, 4.0, 3.0, 2.0])
    influence = 2 * screen + 1  # calibration exact: slope 2, intercept 1, residual sd 0
    following = np.array([2.05, 1.4, 1.0, np.nan])  # calibrated: 5.1, 3.8, 3.0
    assert could_enter_top(following, screen, influence, 3, 0.0).tolist() == [False, False, False, False]  # 3rd: 7
    assert could_enter_top(following, screen, influence, 4, 0.0).tolist() == [True, False, False, False]  # 4th: 5
    assert could_enter_top(following, screen, influence, 5, 0.0).tolist() == [True] * 3 + [False]  # < K re-scored
    noisy = influence + np.array([1.0, -1.0, 1.0, -1.0])  # 12, 8, 8, 4: slope 2.4, intercept -0.4, sd 0.894
    assert could_enter_top(np.array([2.5, 1.0]), screen, noisy, 3, 0.0).tolist() == [False, False]  # 5.6, 2.0 < 8
    assert could_enter_top(np.array([2.5, 1.0]), screen, noisy, 3, 3.0).tolist() == [True, False]  # 8.28, 4.68
    flat = could_enter_top(np.array([9.0, 0.0]), np.ones(4), np.array([1.0, 2.0, 3.0, 4.0]), 2, 0.0)
    assert flat.tolist() == [False, False]  # a screen without spread predicts the mean, 2.5 < 3


def test_keep_top_rescores_until_none_could_enter(tiny_abc, cache, tmp_path):
    exact, wide, tight = tmp_path / "exact", tmp_path / "wide", tmp_path / "tight"
    shared = STAGE2 + ["--loss_cache_dir", str(cache / "orig_loss")]
    two = shared + ["--mode", "two-stage", "--rescore_top", "15", "--keep_top", "4"]
    compute_influence.main(paths(tiny_abc, exact) + shared)
    compute_influence.main(paths(tiny_abc, wide) + two + ["--keep_margin", "1000"])  # every candidate could enter
    compute_influence.main(paths(tiny_abc, tight) + two + ["--keep_margin", "0"])
    for query in (QUERY, "artchive/gpt/tinyartist/samples/00001.png"):
        a, w, t = load(exact, query), load(wide, query), load(tight, query)
        assert w["rescored"] == 15 and np.array_equal(a["rank"], w["rank"])
        np.testing.assert_allclose(w["influence"], a["influence"], rtol=1e-5)  # in chunks: other batch mates
        order = np.argsort(-t["screen"], kind="stable")
        measured = np.flatnonzero(~np.isnan(t["influence"]))
        assert set(measured.tolist()) == set(order[:t["rescored"]].tolist())  # a prefix of the screen's order
        np.testing.assert_allclose(t["influence"][measured], a["influence"][measured], rtol=1e-5)
        done = 4  # replay the rule on the re-scored influences: the top 4, then one at a time (K/10 rounded up to 1)
        while done < 15 and could_enter_top(t["screen"][order[done:done + 1]], t["screen"][order[:done]],
                                            t["influence"][order[:done]], 4, 0.0).any():
            done += 1
        assert t["rescored"] == done and 4 <= done < 15
        assert t["forward_equivalents"]["re-scoring"] == 2 * done * 5


def test_keep_top_is_refused_where_it_cannot_act(tiny_abc, tmp_path):
    base = paths(tiny_abc, tmp_path) + STAGE2 + ["--mode", "two-stage"]
    with pytest.raises(InputError, match="--keep_top 8 keeps more candidates than --rescore_top 5"):
        compute_influence.main(base + ["--rescore_top", "5", "--keep_top", "8"])
    with pytest.raises(InputError, match="--keep_top follows one screen"):
        compute_influence.main(base + ["--screen", "coarse+caption", "--keep_top", "4"])


def test_on_demand_losses_before_need_no_stage_1(tiny_abc, cache, tmp_path):
    """Re-scoring every candidate with the losses before measured on demand is exact AbU (up to the last bits that
    other batch mates move), costs a model's queries together exactly stage 1's pass, and writes no cache."""
    from utils.tasks import load_tasks

    exact, lazy = tmp_path / "exact", tmp_path / "lazy"
    compute_influence.main(paths(tiny_abc, exact) + STAGE2 + ["--loss_cache_dir", str(cache / "orig_loss")])
    compute_influence.main(paths(tiny_abc, lazy) + STAGE2 + ["--mode", "two-stage", "--before_losses", "on-demand",
                                                              "--rescore_top", "15"])
    assert not (lazy / "orig_loss").exists()
    per_model = {}
    for task in load_tasks(tiny_abc["task_json"]):
        query = task.synth_image_path.removeprefix("synth/")
        a, b = load(exact, query), load(lazy, query)
        np.testing.assert_allclose(b["influence"], a["influence"], rtol=1e-5)
        assert np.array_equal(a["rank"], b["rank"]) and a["query_loss"] == b["query_loss"]
        cost = b["forward_equivalents"]["losses before (on demand)"]
        per_model[task.model_path] = per_model.get(task.model_path, []) + [cost]
    for costs in per_model.values():  # the screen's timestep of all 30 rows, shared; then the other 4 of 5, once
        assert len(costs) == 2 and sorted(costs) == [30 / 2, 30 / 2 + 30 * 4]


def test_on_demand_screen_and_stopping_rule_read_the_same_losses_as_stage_1(tiny_abc, cache, tmp_path):
    cached, lazy = tmp_path / "cached", tmp_path / "lazy"
    flags = STAGE2 + ["--mode", "two-stage", "--rescore_top", "3", "--screen_flips", "1", "--stop_rule", "collateral",
                      "--stop_target", "1e9", "--stop_every", "1", "--stop_reference", "4"]
    compute_influence.main(paths(tiny_abc, cached) + flags + ["--loss_cache_dir", str(cache / "orig_loss")])
    compute_influence.main(paths(tiny_abc, lazy) + flags + ["--before_losses", "on-demand"])
    a, b = load(cached), load(lazy)
    np.testing.assert_allclose(b["screen"], a["screen"], rtol=0, atol=1e-6)
    assert np.array_equal(np.isnan(a["influence"]), np.isnan(b["influence"]))  # the same 3 re-scored
    checks = [[c["collateral"] for c in r["stop"]["checks"]] for r in (a, b)]
    assert len(checks[0]) == 2 and np.allclose(checks[1], checks[0], rtol=1e-4)  # after steps 1 and 2 of 3
    # the model's two queries together: 4 reference LAION rows x 5 timesteps, the other 11 unflipped rows (3
    # exemplars, 8 LAION) at the screen's timestep, then the timesteps the rows of each candidate re-scored lacked
    from utils.tasks import load_tasks

    tasks = load_tasks(tiny_abc["task_json"])
    model = next(t.model_path for t in tasks if t.synth_image_path.endswith(QUERY))
    results = [load(lazy, t.synth_image_path.removeprefix("synth/")) for t in tasks if t.model_path == model]
    rescored = set().union(*(np.flatnonzero(~np.isnan(r["influence"])).tolist() for r in results))
    n_ex = results[0]["n_exemplar"]
    lacked = sum(4 + 5 if c < n_ex else (0 if c - n_ex < 4 else 4) + 5 for c in rescored)
    assert len(results) == 2 and n_ex == 3
    assert sum(r["forward_equivalents"]["losses before (on demand)"] for r in results) == 4 * 5 + 11 + lacked


def test_on_demand_is_refused_in_exact_mode(tiny_abc, tmp_path):
    with pytest.raises(InputError, match="--before_losses on-demand is a two-stage option"):
        compute_influence.main(paths(tiny_abc, tmp_path) + STAGE2 + ["--before_losses", "on-demand"])


def test_keep_top_says_when_the_cap_or_the_pool_stops_it(tiny_abc, cache, tmp_path, capsys):
    shared = STAGE2 + ["--loss_cache_dir", str(cache / "orig_loss"), "--mode", "two-stage"]
    compute_influence.main(paths(tiny_abc, tmp_path / "cap") + shared + [
        "--keep_top", "4", "--keep_margin", "1000", "--rescore_top", "6"])  # the rule would re-score every one
    r = load(tmp_path / "cap")
    assert r["rescored"] == 6 and r["rescore_capped"] is True
    assert "re-scored 6 of 15 candidates; the cap --rescore_top 6 stopped --keep_top 4" in capsys.readouterr().out
    compute_influence.main(paths(tiny_abc, tmp_path / "pool") + shared + ["--keep_top", "15", "--rescore_top", "15"])
    out = capsys.readouterr().out
    assert "warning: --keep_top 15 is at least the 15 candidates" in out and "re-scored 15 of 15 candidates\n" in out
    assert load(tmp_path / "pool")["rescore_capped"] is False


def test_without_a_stage_1_cache_two_stage_points_to_on_demand(tiny_abc, tmp_path):
    with pytest.raises(InputError, match="or skip stage 1 with --before_losses on-demand"):
        compute_influence.main(paths(tiny_abc, tmp_path) + STAGE2 + ["--mode", "two-stage"])


def test_the_pool_benchmark_measures_each_size_and_resumes(tiny_abc, tmp_path, monkeypatch, capfd):
    """benchmarks/two_stage_pool.py end to end on the tiny benchmark as a pool of 12: exact and a keep-top setting at
    two sizes, one model at a time, the table with each CLI run's memory and the fitted growth of what was re-scored;
    a rerun reads every finished model's record and runs nothing; a later session (no runs folder) with one record
    missing measures that model alone and writes the same table. (The CLIs run as child processes: capfd reads
    their output.)"""
    import json
    import shutil
    import sys
    from pathlib import Path

    from benchmarks import two_stage_pool

    bench = tmp_path / "bench"
    (bench / "tasks").mkdir(parents=True)
    (bench / "sd-mini").symlink_to(Path(tiny_abc["sd_version"]).resolve())
    (bench / "pool").symlink_to(Path(tiny_abc["dataroot"]).resolve())
    (bench / "tasks" / "test.json").write_text(Path(tiny_abc["task_json"]).read_text())
    argv = ["two_stage_pool", "--bench", str(bench), "--sizes", "6,12", "--settings", "coarse:1:0.5:1:2:2:on-demand",
            "--out", str(tmp_path / "table"), "--results_dir", str(tmp_path / "runs"), "--unlearn_steps", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    two_stage_pool.main()
    text = (tmp_path / "table" / "two_stage_pool_test.md").read_text()
    assert text.startswith("`python -m benchmarks.two_stage_pool --split test --sizes 6,12 --settings "
                           "coarse:1:0.5:1:2:2:on-demand --unlearn_steps 2`")
    lines = [line for line in text.splitlines() if line.startswith("| 6 |") or line.startswith("| 12 |")]
    assert len(lines) == 2 * 2 + 2  # (exact, the setting) at each size, then stage 1 at each size
    exact = [line for line in lines if "| exact |" in line]
    assert all("| exact | 4 | " in line and " | 1.0 | " in line and " | - | " in line and " | +0.0000 | " in line
               for line in exact)  # exact against itself (top-K overlaps are below 1 here: K is above the pool)
    assert [line.split(" | ")[1] for line in lines[-2:]] == ["2", "2"]  # stage 1: two models at each size
    assert "re-scored candidates = " in text and "x fewer than exact AbU with its stage 1" in text
    assert "Still running" not in text
    slugs = ["models__artchive__tinyartist", "models__imagenet__n01440764_0000"]
    records = tmp_path / "table" / "two_stage_pool_test"
    assert sorted(p.stem for p in (records / "n12").glob("*.json")) == slugs
    tasks = json.loads((tmp_path / "runs" / "test_pool" / "n12" / slugs[0] / "tasks.json").read_text())
    assert {t["test_case"] for t in tasks} == {"test_artchive"} and len(tasks) == 2
    memory = json.loads((tmp_path / "runs" / "test_pool" / "n12" / slugs[0] / "abu" / "memory.json").read_text())
    assert memory["peak_anon_MiB"] >= memory["late_mean_anon_MiB"] > 0
    capfd.readouterr()
    two_stage_pool.main()  # every model's record is there: no CLI runs, the same table
    assert "$ compute_" not in capfd.readouterr().out
    assert (tmp_path / "table" / "two_stage_pool_test.md").read_text() == text
    shutil.rmtree(tmp_path / "runs")  # a later session: the records were committed, the runs were not
    (records / "n12" / f"{slugs[1]}.json").unlink()
    two_stage_pool.main()
    rerun = capfd.readouterr().out
    assert "n01440764_0000/samples/00000.png: query loss" in rerun and "tinyartist/samples" not in rerun
    assert not (tmp_path / "runs" / "test_pool" / "n6").exists()
    rows = lambda t: [line for line in t.splitlines() if line.startswith("| ")]  # noqa: E731
    assert len(rows((tmp_path / "table" / "two_stage_pool_test.md").read_text())) == len(rows(text))


def test_the_abc_projection_and_the_growth_fit_on_hand_computed_numbers():
    """x_fewer_at_abc: the recommended setting re-scoring 200 of AbC's 100K candidates costs 48,000 (unlearning)
    + 20 (the query) + 100,000 (one flip screened at one timestep) + 4,000 (re-scoring) + 5,000 + 3,800 (losses before,
    on demand) = 160,820 forward-equivalents, against exact's 2,048,020 + 100,000 (stage 1's share)."""
    from benchmarks.two_stage_common import x_fewer_at_abc
    from benchmarks.two_stage_pool import power_law

    assert x_fewer_at_abc(("coarse", 1, 1, True), 200) == pytest.approx(2_148_020 / 160_820)
    # with stage 1 (M = 5% of 10K candidates, two flips): exact 48,020 + 200,000 + 10,000; the setting 48,020 + 20,000
    # + 2 * 500 * 10 + 10,000
    assert x_fewer_at_abc(("coarse", 1, 2, False), 500, 10_000) == pytest.approx(258_020 / 88_020)
    n = np.array([600.0, 1444.0, 20000.0])
    a, b = power_law(n, 3 * n ** 0.5)
    assert (a, b) == (pytest.approx(3), pytest.approx(0.5))
