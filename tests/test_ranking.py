"""Rankings that read the image (--ranking, utils/ranking.py): each changes the ranking as documented, the recorded
parts recompose it exactly, and a query that is its own control ranks flat."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compute_influence
from helpers import paths, stage1_cache, stage2_flags
from utils.errors import InputError
from utils.metrics import query_metrics, rank_candidates
from utils.ranking import blended_order, compose, peers_of, standardize, within_blocks
from utils.tasks import Task

REPO = Path(__file__).resolve().parent.parent
STAGE2 = stage2_flags(steps=4, accum=1, batch=4, n=300)
QUERIES = ["imagenet/gpt/n01440764_0000/samples/00000.png", "imagenet/gpt/n01440764_0000/samples/00001.png"]


# ---- the formulas ----

def task(path, model="models/m", prompt="a <new1> fish"):
    return Task(path, prompt, "test_x", 0, model, "<new1> fish")


def test_peers_are_the_models_other_queries_or_the_other_samples_of_the_prompt():
    tasks = [task("a"), task("b"), task("c", prompt="another <new1> fish"), task("d", model="models/n"),
             task("e", model="models/n", prompt="x <new1>")]
    by_model, by_prompt = peers_of(tasks, "model"), peers_of(tasks, "prompt")
    names = lambda peers: {k: [t.synth_image_path for t in v] for k, v in peers.items()}
    assert names(by_model) == {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"], "d": ["e"], "e": ["d"]}
    # the other samples of a's prompt; c and the model n's queries have none, so their model's other queries
    assert names(by_prompt) == {"a": ["b"], "b": ["a"], "c": ["a", "b"], "d": ["e"], "e": ["d"]}
    with pytest.raises(InputError, match="the only query of model models/m"):
        peers_of([task("a"), task("d", model="models/n"), task("e", model="models/n")], "model")


def test_each_ranking_is_its_formula():
    rng = np.random.default_rng(0)
    influence, control, peer = rng.normal(size=(3, 12))
    parts = {"influence": influence, "control": control, "peers_z": standardize(peer)}
    z = lambda x: (x - x.mean()) / x.std()
    assert np.array_equal(compose(parts, "influence", 3), influence)
    assert np.allclose(compose(parts, "control-corrected", 3), z(influence) - z(control))
    assert np.allclose(compose(parts, "model-contrast", 3), z(influence) - z(peer))
    same = {"influence": influence, "control": influence.copy()}
    assert not compose(same, "control-corrected", 3).any()  # a query that is its own control: flat, exactly 0
    assert standardize(np.full(5, 2.0)).tolist() == [0.0] * 5


def test_combined_keeps_the_influences_places_and_orders_each_block_by_the_image():
    influence = np.array([5.0, 1.0, 3.0, 0.5, 4.0, 2.0, -1.0])  # 3 exemplars, 4 pretraining candidates
    image_part = np.array([0.0, 2.0, 1.0, 9.0, -3.0, 0.0, 1.0])
    score = within_blocks(influence, image_part, 3)
    # the exemplars keep the influence's values {5, 3, 1}, now in the image part's order: 1 > 2 > 0
    assert score[:3].tolist() == [1.0, 5.0, 3.0] and score[3:].tolist() == [4.0, -1.0, 0.5, 2.0]
    before, after = rank_candidates(influence, 3), rank_candidates(score, 3)
    assert query_metrics(before, 3) == query_metrics(after, 3)  # AbC's Recall@K and AP: the same places
    assert not np.array_equal(before, after)


def test_blended_keeps_the_influences_places_and_orders_each_block_by_both_parts():
    # 3 exemplars: influence 3, 2, 1; image part (z(influence) - peers_z) -1, 0, 1 within the block
    influence = np.array([3.0, 2.0, 1.0, 0.0, 1.0, 2.0])
    peers_z = standardize(influence) - np.array([-1.0, 0.0, 1.0, 5.0, 6.0, 4.0])
    parts = {"influence": influence, "peers_z": peers_z}
    order = blended_order(parts, 3)
    # z over the block: influence (+1.22, 0, -1.22), image part (-1.22, 0, +1.22): a tie at 0, broken by the influence
    assert np.allclose(order[:3], [1.224745e-6, 0.0, -1.224745e-6], atol=1e-9)
    assert np.allclose(order[3:], [-1.224745, 1.224745, 0.0], atol=1e-5)  # z(0, 1, 2) + z(5, 6, 4)
    score = compose(parts, "blended", 3)
    assert score[:3].tolist() == [3.0, 2.0, 1.0]  # the tie goes to the influence's own order
    assert score[3:].tolist() == [0.0, 2.0, 1.0]  # candidate 4 first (+1.22), then 5 (0), then 3
    image_weight_two = blended_order(parts, 3, image_weight=2.0)
    assert np.argsort(-image_weight_two[:3]).tolist() == [2, 1, 0]  # more weight on the image: its order


# ---- through compute_influence.py on the tiny benchmark ----

@pytest.fixture(scope="module")
def cache(tiny_abc, tmp_path_factory):
    return stage1_cache(tiny_abc, tmp_path_factory.mktemp("ranking"))


def run(bench, cache, out, *flags):
    compute_influence.main(paths(bench, out) + STAGE2 + ["--loss_cache_dir", cache] + list(flags))
    return {q: pickle.loads((out / "influence" / q / "influence.pkl").read_bytes()) for q in QUERIES}


@pytest.fixture(scope="module")
def separate(tiny_abc, cache, tmp_path_factory):
    """The paper's ranking and the noise-image control, each run on its own."""
    root = tmp_path_factory.mktemp("separate")
    return run(tiny_abc, cache, root / "abu"), run(tiny_abc, cache, root / "noise", "--noise_image")


def test_control_corrected_is_the_influence_minus_a_separate_control_run(tiny_abc, cache, separate, tmp_path):
    abu, noise = separate
    out = run(tiny_abc, cache, tmp_path, "--ranking", "control-corrected")
    for q in QUERIES:
        parts = out[q]["parts"]
        assert np.array_equal(parts["influence"], abu[q]["influence"])  # same noise, same schedule: bit for bit
        assert np.array_equal(parts["control"], noise[q]["influence"])
        assert np.array_equal(out[q]["influence"], compose(parts, "control-corrected", out[q]["n_exemplar"]))
        assert out[q]["ranking"] == "control-corrected" and out[q]["settings"]["ranking"] == "control-corrected"
        assert out[q]["forward_equivalents"]["noise control"] > 0  # the two queries' prompts differ: one each
        assert not np.array_equal(out[q]["rank"], abu[q]["rank"])


def test_a_query_that_is_its_own_control_ranks_flat(tiny_abc, cache, tmp_path):
    out = run(tiny_abc, cache, tmp_path, "--noise_image", "--ranking", "control-corrected")
    for q in QUERIES:  # the query is the seeded noise image, so is its control
        assert not out[q]["influence"].any()
        n = out[q]["n_exemplar"]
        assert sorted(out[q]["rank"][-n:].tolist()) == list(range(n))  # ties go against the exemplars


def test_model_contrast_combined_and_blended_recompose_from_their_parts(tiny_abc, cache, separate, tmp_path):
    abu, _ = separate
    contrast = run(tiny_abc, cache, tmp_path / "contrast", "--ranking", "model-contrast")
    combined = run(tiny_abc, cache, tmp_path / "combined", "--ranking", "combined")
    blended = run(tiny_abc, cache, tmp_path / "blended", "--ranking", "blended")
    for q, other in (QUERIES, QUERIES[::-1]):
        n = abu[q]["n_exemplar"]
        parts = contrast[q]["parts"]
        assert parts["peers"] == ["synth/" + other]  # the other query of the model (prompts differ)
        assert np.array_equal(parts["peers_z"], standardize(abu[other]["influence"]))
        assert np.array_equal(contrast[q]["influence"], compose(parts, "model-contrast", n))
        assert np.allclose(contrast[q]["influence"], standardize(abu[q]["influence"]) - standardize(abu[other]["influence"]))
        assert np.array_equal(combined[q]["influence"], compose(combined[q]["parts"], "combined", n))
        # combined: the paper's places for the exemplars, the contrast's order among them
        assert query_metrics(combined[q]["rank"], n) == query_metrics(abu[q]["rank"], n)
        order = lambda r: [int(i) for i in r if i < n]
        assert order(combined[q]["rank"]) == order(rank_candidates(contrast[q]["influence"], n))
        # blended: the same places, the exemplars in the order of z(influence) + z(contrast) over them
        assert np.array_equal(blended[q]["parts"]["peers_z"], parts["peers_z"])
        assert np.array_equal(blended[q]["influence"], compose(blended[q]["parts"], "blended", n))
        assert query_metrics(blended[q]["rank"], n) == query_metrics(abu[q]["rank"], n)
        assert order(blended[q]["rank"]) == order(rank_candidates(blended_order(blended[q]["parts"], n), n))


def cli(args, env=None):
    return subprocess.run([sys.executable, str(REPO / "compute_influence.py")] + [str(a) for a in args],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})


def test_a_model_with_one_query_is_refused_before_any_work(tiny_copy, cache, tmp_path):
    tasks = json.loads(Path(tiny_copy["task_json"]).read_text())
    Path(tiny_copy["task_json"]).write_text(json.dumps([tasks[0], tasks[2], tasks[3]]))  # the fish model once
    r = cli(paths(tiny_copy, tmp_path) + STAGE2 + ["--loss_cache_dir", cache, "--ranking", "model-contrast"])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "the only query of model" in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "influence").exists()


def test_a_killed_run_resumes_from_the_measured_queries(tiny_abc, cache, tmp_path):
    flags = paths(tiny_abc, tmp_path / "killed") + STAGE2 + ["--loss_cache_dir", cache, "--ranking", "combined"]
    killed = cli(flags, env={"ABU_KILL_AT": "wrote:measured.pkl:2"})  # the fish model's two queries measured
    assert killed.returncode == -9
    assert (tmp_path / "killed" / "influence" / QUERIES[0] / "measured.pkl").is_file()
    resumed = cli(flags)
    assert resumed.returncode == 0 and resumed.stdout.count("measured by an earlier run") == 2, resumed.stderr[-2000:]
    whole = cli(paths(tiny_abc, tmp_path / "whole") + STAGE2 + ["--loss_cache_dir", cache, "--ranking", "combined"])
    assert whole.returncode == 0
    for q in QUERIES:
        a, b = (pickle.loads((tmp_path / d / "influence" / q / "influence.pkl").read_bytes()) for d in ("killed", "whole"))
        assert np.array_equal(a["influence"], b["influence"]) and not (tmp_path / "killed" / "influence" / q /
                                                                       "measured.pkl").exists()


def retrain(dataroot) -> None:
    """The fish model trained again (its K weights scaled by 1.01): same settings, another model."""
    import torch

    f = Path(dataroot) / "models" / "imagenet" / "n01440764_0000" / "pytorch_custom_diffusion_weights.pt"
    state = torch.load(f)
    for k in state:
        if "to_k" in k:
            state[k] = state[k] * 1.01
    torch.save(state, f)


def test_checkpoints_and_results_of_another_model_are_not_reused(tiny_copy, tmp_path):
    """After the model is trained again and stage 1 redone: a checkpoint (measured.pkl) made from the old model is
    measured again, saying so, and the result equals a fresh run's; a finished result from the old model is refused,
    naming the customized model and the cache; a checkpoint left beside a finished result goes."""
    import compute_training_loss
    from helpers import STAGE1

    results = tmp_path / "results"
    flags = paths(tiny_copy, results) + STAGE2 + ["--ranking", "combined"]
    compute_training_loss.main(paths(tiny_copy, results) + STAGE1)
    killed = cli(flags, env={"ABU_KILL_AT": "wrote:measured.pkl:2"})  # both fish queries measured, none written
    assert killed.returncode == -9 and (results / "influence" / QUERIES[0] / "measured.pkl").is_file()
    retrain(tiny_copy["dataroot"])
    compute_training_loss.main(paths(tiny_copy, results) + STAGE1 + ["--overwrite"])
    resumed = cli(flags)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "measured by an earlier run" not in resumed.stdout
    assert resumed.stdout.count("was measured from other inputs") == 2 and "customized_model" in resumed.stdout
    fresh = tmp_path / "fresh"
    compute_training_loss.main(paths(tiny_copy, fresh) + STAGE1)
    assert cli(paths(tiny_copy, fresh) + STAGE2 + ["--ranking", "combined"]).returncode == 0
    for q in QUERIES:
        a, b = (pickle.loads((d / "influence" / q / "influence.pkl").read_bytes()) for d in (results, fresh))
        assert np.array_equal(a["influence"], b["influence"])
        assert a["provenance"] == b["provenance"] and set(a["provenance"]) == {
            "base_model", "customized_model", "laion_arrays", "fisher", "loss_cache"}

    # the finished results now belong to the retrained model: train it again, and they are refused
    leftover = results / "influence" / QUERIES[0] / "measured.pkl"
    leftover.write_bytes(b"left by a kill after influence.pkl")
    unchanged = cli(flags)
    assert unchanged.returncode == 0 and not leftover.exists()  # finished: the leftover checkpoint goes
    retrain(tiny_copy["dataroot"])
    compute_training_loss.main(paths(tiny_copy, results) + STAGE1 + ["--overwrite"])
    before = {q: (results / "influence" / q / "influence.pkl").read_bytes() for q in QUERIES}
    refused = cli(flags)
    assert refused.returncode == 2 and "made from other inputs" in refused.stderr
    assert "customized_model" in refused.stderr and "loss_cache" in refused.stderr
    assert all((results / "influence" / q / "influence.pkl").read_bytes() == b for q, b in before.items())
