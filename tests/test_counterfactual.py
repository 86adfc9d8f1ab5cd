"""Counterfactual ground truth: the scoring functions on hand-computed numbers (utils/counterfactual.py), and the
builder's counterfactual stage on the tiny mini-AbC (data/mini_abc_build/counterfactual.py)."""
import numpy as np
import pytest

from utils import counterfactual as cf


def test_spearman_and_kendall_on_hand_computed_orderings():
    assert cf.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert cf.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2, 3) against (1, 3, 2): 1 - 6 * 2 / (3 * 8) = 0.5
    assert cf.spearman([0.1, 0.2, 0.3], [5, 9, 7]) == pytest.approx(0.5)
    assert cf.ranks(np.array([3.0, 1.0, 3.0])).tolist() == [2.5, 1.0, 2.5]  # ties at their mean rank
    assert np.isnan(cf.spearman([1, 1, 1], [1, 2, 3]))  # a constant side has no ordering
    # pairs (0,1) agree, (0,2) agree, (1,2) disagree: (1 + 1 - 1) / 3
    assert cf.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)


def test_loo_effects_and_their_image_specific_part():
    loss = {"full@0": np.array([1.0, 2.0, 3.0]), "loo0@0": np.array([1.5, 2.0, 3.3]),
            "loo1@0": np.array([1.1, 2.4, 3.0])}
    d = cf.loo_effects(loss, 2)
    np.testing.assert_allclose(d, [[0.5, 0.1], [0.0, 0.4], [0.3, 0.0]], atol=1e-12)
    with pytest.raises(KeyError):
        cf.loo_effects(loss, 2, seed=1)
    # queries 0 and 1 share a prompt, query 2 has none: its image-specific part is undefined
    x = cf.image_specific(d, [0, 0, 1])
    assert x[0].tolist() == pytest.approx([0.5, -0.3]) and x[1].tolist() == pytest.approx([-0.5, 0.3])
    assert np.isnan(x[2]).all()
    # explicit peers (the prompt's unselected samples) replace the prompt's others
    assert cf.image_specific(d, [0, 0, 0], peers=[[2], [], [0, 1]])[0].tolist() == pytest.approx([0.2, 0.1])


def test_the_truth_and_its_ceiling_average_the_even_and_the_odd_training_seeds():
    """One query, two exemplars; seed k's effects are (k, 10 k) plus nothing else, so each half's mean is readable."""
    loss = {}
    for k in range(5):  # seeds 0-4 whole; seed 5 has its full run only
        loss[f"full@{k}"] = np.array([1.0])
        loss[f"loo0@{k}"], loss[f"loo1@{k}"] = np.array([1.0 + k]), np.array([1.0 + 10 * k])
    loss["full@5"] = np.array([1.0])
    assert cf.measured_seeds(loss, 2) == [0, 1, 2, 3, 4]
    truth, ceiling, half = cf.split_seed_effects(loss, 2)
    assert half == 2  # seeds 0, 2 against 1, 3 (4 waits for its odd partner)
    np.testing.assert_allclose(truth, [[1.0, 10.0]])  # mean of seeds 0 and 2
    np.testing.assert_allclose(ceiling, [[2.0, 20.0]])  # mean of seeds 1 and 3
    only_two = {k: v for k, v in loss.items() if k.endswith(("@0", "@1"))}
    truth, ceiling, half = cf.split_seed_effects(only_two, 2)  # the tier-0 truth: seed 0 against seed 1
    assert half == 1 and truth.tolist() == [[0.0, 0.0]] and ceiling.tolist() == [[1.0, 10.0]]
    truth, ceiling, half = cf.split_seed_effects({k: v for k, v in loss.items() if k.endswith("@0")}, 2)
    assert ceiling is None and half == 1 and truth.tolist() == [[0.0, 0.0]]
    assert cf.split_seed_effects({"full@1": np.array([1.0])}, 0)[0] is None  # no seed 0: no truth


def test_the_look_truth_averages_the_even_seeds_and_its_ceiling_the_odd_ones():
    """Two queries; at seed k look A alone costs query 0 k more than look B alone, query 1 nothing."""
    loss = {}
    for k in range(4):
        loss[f"lookA@{k}"], loss[f"lookB@{k}"] = np.array([1.0, 2.0]), np.array([1.0 + k, 2.0])
    loss["lookA@4"] = np.array([0.0, 0.0])  # look B at seed 4 not measured: seed 4 is not used
    assert cf.look_seeds(loss) == [0, 1, 2, 3]
    truth, ceiling, half = cf.split_look_dependence(loss)
    assert half == 2 and truth.tolist() == [1.0, 0.0] and ceiling.tolist() == [2.0, 0.0]  # seeds 0, 2 / 1, 3
    # a two-look object model's looks alone are its LOO sets: look A alone is 'all but exemplar 1'
    renamed = {n.replace("lookA", "loo1").replace("lookB", "loo0"): v for n, v in loss.items()}
    assert cf.split_look_dependence(renamed, ("loo1", "loo0"))[0].tolist() == [1.0, 0.0]
    assert cf.split_look_dependence({k: v for k, v in loss.items() if k.endswith("@0")})[1] is None
    assert cf.split_look_dependence({"lookA@1": np.zeros(2), "lookB@1": np.zeros(2)})[0] is None


def test_the_seed_averaged_truth_agreement_against_spearman_brown():
    """Four seeds, three exemplars: seeds 0 and 1 order them (0, 1, 2), seeds 2 and 3 (0, 2, 1). A second query of
    the same prompt has no effect at all, so the image-specific parts are +-(the first query's) and agree alike."""
    order = {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 2, 1], 3: [0, 2, 1]}
    loss = {}
    for k, d in order.items():
        loss[f"full@{k}"] = np.zeros(2)
        for e in range(3):
            loss[f"loo{e}@{k}"] = np.array([d[e], 0.0])
    # k = 1: pairs (0,1) and (2,3) agree at 1; the other four at 1 - 6 * 2 / 24 = 0.5: mean 2/3
    # k = 2: {0,1} vs {2,3} at 0.5; {0,2} vs {1,3} and {0,3} vs {1,2} both average to (0, 1.5, 1.5): 1
    for prompt_of in (None, [0, 0]):
        whole = lambda k, **kw: cf.seed_average_agreement(  # noqa: E731
            {n: v[:1] for n, v in loss.items()} if prompt_of is None else loss, 3, k, prompt_of, **kw)
        assert whole(1) == pytest.approx(2 / 3) and whole(2) == pytest.approx(5 / 6)
        assert np.isnan(whole(3))  # six seeds needed
        assert whole(2, splits=2) in (pytest.approx(0.75), pytest.approx(1.0))  # two of the three pairs
    assert cf.spearman_brown(2 / 3, 2) == pytest.approx(0.8)  # predicted; 5/6 measured
    assert cf.spearman_brown(0.3, 1) == pytest.approx(0.3)


def test_the_plan_holds_the_further_training_seeds_in_tier_3_seed_by_seed():
    from data.mini_abc_build.counterfactual import CounterfactualConfig, retrained_sets

    base = {"exemplars": ["a", "b", "c"], "seed": 7, "kind": "two-look object", "looks": None}
    sets = retrained_sets(base, CounterfactualConfig(half_subsets=0, null_runs=0, training_seeds=4))
    tier3 = [s for s in sets if s["tier"] == 3]
    assert [s["name"] for s in tier3] == ["full@2", "loo0@2", "loo1@2", "loo2@2", "full@3", "loo0@3", "loo1@3",
                                          "loo2@3"]
    assert [s["seed"] for s in tier3] == [7 + 2 * 5000] * 4 + [7 + 3 * 5000] * 4  # seed k: s0 + k x the offset
    assert tier3[1]["members"] == [1, 2] and next(s for s in sets if s["name"] == "full@1")["seed"] == 7 + 5000
    assert not [s for s in retrained_sets(base, CounterfactualConfig(training_seeds=2)) if s["tier"] == 3]
    # a two-look style model's looks alone at every training seed: seed 0 in tier 0, the others in tier 2
    style = {"exemplars": list("abcd"), "seed": 7, "kind": "two-look style", "looks": [0, 1, 0, 1]}
    looks = [s for s in retrained_sets(style, CounterfactualConfig(half_subsets=0, training_seeds=3))
             if s["name"].startswith("look")]
    assert [(s["name"], s["members"], s["seed"], s["tier"]) for s in looks] == [
        ("lookA@0", [0, 2], 7, 0), ("lookB@0", [1, 3], 7, 0), ("lookA@1", [0, 2], 5007, 2),
        ("lookB@1", [1, 3], 5007, 2), ("lookA@2", [0, 2], 10007, 2), ("lookB@2", [1, 3], 10007, 2)]


def test_the_build_order_chooses_bases_tiers_and_set_patterns():
    from data.mini_abc_build.counterfactual import CounterfactualConfig, build_order, retrained_sets
    from utils.errors import InputError

    style = {"name": "s", "split": "test", "exemplars": list("abcd"), "seed": 7, "kind": "two-look style",
             "looks": [0, 1, 0, 1]}
    obj = {"name": "o", "split": "val", "exemplars": ["a", "b"], "seed": 3, "kind": "two-look object", "looks": None}
    config = CounterfactualConfig(half_subsets=0, null_runs=0, training_seeds=4)
    plan = {"bases": [{**b, "sets": retrained_sets(b, config)} for b in (style, obj)]}
    names = lambda order: [(b["name"], s["name"]) for b, s in order]  # noqa: E731
    # committed first, then tier by tier, validation before test
    assert names(build_order(plan, max_tier=0))[:5] == [("s", "committed"), ("o", "committed"), ("o", "full@0"),
                                                        ("o", "full@1"), ("o", "loo0@0")]
    assert names(build_order(plan, ["s"], 2, ["look*@[0-2]"])) == [
        ("s", "committed"), ("s", "lookA@0"), ("s", "lookB@0"), ("s", "lookA@1"), ("s", "lookB@1"), ("s", "lookA@2"),
        ("s", "lookB@2")]
    assert names(build_order(plan, ["o"], 3, ["full@3", "loo1@3"])) == [("o", "committed"), ("o", "full@3"),
                                                                        ("o", "loo1@3")]
    with pytest.raises(InputError, match="--bases nope: not in the counterfactual plan; its bases are s, o"):
        build_order(plan, ["s", "nope"])
    with pytest.raises(InputError, match=r"--sets look\*@4: matches no set .* up to --max_tier 2"):
        build_order(plan, ["s"], 2, ["look*@4"])  # 4 training seeds: 0-3
    with pytest.raises(InputError, match=r"--sets full@3: .*--max_tier 0"):
        build_order(plan, None, 0, ["full@3"])  # tier 3


def test_lds_sums_the_scores_of_each_subset_against_minus_its_loss():
    scores = np.array([[3.0, 2.0, 1.0, 0.0]])
    subsets = [[0, 1], [0, 2], [1, 3], [2, 3]]  # summed scores 5, 4, 2, 1
    exact = np.array([[0.1], [0.2], [0.3], [0.4]])  # the more the subset holds what helps, the lower the loss
    assert cf.lds(scores, subsets, exact)[0] == pytest.approx(1.0)
    assert cf.lds(scores, subsets, exact[::-1])[0] == pytest.approx(-1.0)
    assert cf.lds(scores, subsets, np.array([[0.1], [0.3], [0.2], [0.4]]))[0] == pytest.approx(0.8)


def test_per_query_and_across_samples():
    scores = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    truth = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    assert cf.per_query(scores, truth).tolist() == pytest.approx([1.0, -1.0, 1.0])
    # one prompt; per exemplar, across the 3 samples: e0 scores (1, 3, 1) vs truth (1, 1, 1): constant truth -> NaN;
    # with a truth that varies, the scores' order across samples is what counts
    truth = np.array([[0.1, 0.0, 0.0], [0.3, 0.0, 0.0], [0.2, 0.0, 0.0]])
    got = cf.across_samples(scores, truth, [7, 7, 7])
    assert got.tolist() == pytest.approx([cf.spearman([1, 3, 1], [0.1, 0.3, 0.2])] * 3)


def test_look_pairs_and_pair_auc():
    looks = [0, 0, 1, 1]
    dependence = np.array([0.5, -0.2, 0.1, 0.0])  # prompt 0: samples 0, 1; prompt 1: samples 2, 3
    pairs = cf.look_pairs(dependence, [0, 0, 1, 1])
    assert pairs == [(0, 1), (2, 3)]
    scores = np.array([[2, 2, 1, 1], [1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 2, 2]], dtype=float)
    # pair 1 right both ways (AUC 1); pair 2 the same scores for both queries: 0.5 whatever they are
    assert cf.look_pair_auc(scores, looks, pairs).tolist() == pytest.approx([1.0, 0.5])
    assert cf.within_query_auc([1, 1, 1, 1], [0, 1], [2, 3]) == 0.5
    # a ranking's preference for look A: the AUC with looks of several exemplars, the score difference with one each
    assert cf.look_preference(scores, looks).tolist() == [1.0, 0.0, 0.0, 0.0]
    two = np.array([[0.3, 0.1], [0.2, 0.5], [0.9, 0.4]])
    assert cf.look_preference(two, [0, 1]).tolist() == pytest.approx([0.2, -0.3, 0.5])  # the AUC: only 1, 0, 1


def test_between_samples_agreement_and_signal_to_noise():
    rng = np.random.default_rng(0)
    prompt_of = [0] * 6 + [1] * 6
    shared = rng.standard_normal((2, 5)).repeat(6, axis=0)  # each prompt one ordering of 5 exemplars
    noise = lambda: 0.01 * rng.standard_normal((12, 5))  # noqa: E731
    e0, e1 = shared + noise(), shared + noise()
    assert np.nanmean(cf.agreement_between_samples(e0, prompt_of)) > 0.9  # samples of a prompt agree
    assert cf.signal_to_noise(e0, e1, prompt_of) == pytest.approx(1.0, abs=0.6)  # they differ by noise only
    specific = shared + rng.standard_normal((12, 5))  # samples differ far beyond the seed noise
    assert cf.signal_to_noise(specific + noise(), specific + noise(), prompt_of) > 100


def test_a_base_is_scored_once_its_loo_or_its_looks_alone_are_measured(tmp_path):
    from benchmarks.counterfactual import measured_bases

    plan = {"bases": [{"name": "style", "kind": "two-look style", "exemplars": list("abcd")},
                      {"name": "abc", "kind": "AbC style", "exemplars": list("ab")}]}
    folder = tmp_path / "counterfactual" / "losses"
    touch = lambda base, *names: [(folder / base).mkdir(parents=True, exist_ok=True)] + [  # noqa: E731
        (folder / base / f"{n}.npz").write_bytes(b"") for n in names]
    touch("style", "committed", "lookA@0")
    touch("abc", "full@0", "loo0@0")
    assert measured_bases(tmp_path, plan) == set()  # one look alone, one leave-one-out set: not yet
    touch("style", "lookB@0")  # the look level first (--sets 'look*@...')
    touch("abc", "loo1@0")
    assert measured_bases(tmp_path, plan) == {"style", "abc"}
    touch("abc", "lookA@0", "lookB@0")  # an AbC model has no looks alone: only its LOO counts
    (folder / "abc" / "loo1@0.npz").unlink()
    assert measured_bases(tmp_path, plan) == {"style"}


def test_the_noise_benchmark_finds_each_models_looks_alone():
    from data.mini_abc_build.counterfactual import CounterfactualConfig, look_sets, retrained_sets

    config = CounterfactualConfig(half_subsets=0, null_runs=0, training_seeds=2)
    style = {"exemplars": list("abcd"), "seed": 7, "kind": "two-look style", "looks": [0, 1, 0, 1]}
    obj = {"exemplars": ["a", "b"], "seed": 3, "kind": "two-look object", "looks": [0, 1]}
    abc = {"exemplars": list("abc"), "seed": 3, "kind": "AbC style", "looks": None}
    assert look_sets({**style, "sets": retrained_sets(style, config)}) == ["lookA", "lookB"]
    assert look_sets({**obj, "sets": retrained_sets(obj, config)}) == ["loo1", "loo0"]  # look A alone: B left out
    assert look_sets({**abc, "sets": retrained_sets(abc, config)}) is None
    loss = {"loo1@0": np.array([1.0, 2.0]), "loo0@0": np.array([1.5, 1.0]), "loo1@1": np.array([0.0, 0.0])}
    assert cf.look_dependence(loss, look_sets({**obj, "sets": retrained_sets(obj, config)})) == {
        0: pytest.approx([0.5, -1.0])}  # L(look B alone) - L(look A alone), at the seeds both are measured


def test_the_ideas_probe_contrasts_with_unselected_peers_and_blends_per_exemplar():
    from types import SimpleNamespace

    from benchmarks.counterfactual_ideas import peer_contrast, z_exemplars

    scores = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [2.0, 2.0, 5.0]])
    base = SimpleNamespace(unselected_peers=[[1, 2], [2], []])  # query 2 has no unselected peer: kept as it is
    assert peer_contrast(base, scores).tolist() == [[-1.5, 0.0, 0.0], [1.0, 0.0, -4.0], [2.0, 2.0, 5.0]]
    z = z_exemplars(np.array([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]]))
    assert z[0] == pytest.approx([-1.2247449, 0.0, 1.2247449])  # (x - 2) / sqrt(2/3)
    assert z[1].tolist() == [0.0, 0.0, 0.0]  # a constant row has no ordering: zeros, not NaN


def test_the_probes_trak_kernel_is_the_damped_inverse_of_the_exemplars_gram_in_the_sketch():
    import torch

    from benchmarks.counterfactual_ideas import GradientIdeas

    ideas = object.__new__(GradientIdeas)  # the formula only: no model loaded
    ideas.PROJECTION, ideas.inv_fisher = 16, torch.full((40,), 4.0)  # whitening: g / sqrt(F) = g * 2
    gen = torch.Generator().manual_seed(0)
    q, ex = torch.randn(3, 40, generator=gen), torch.randn(5, 40, generator=gen)
    got = ideas.kernel_scores(q, ex)
    phi_q, phi = ideas.sketch(q * 2), ideas.sketch(ex * 2)  # the same seeded sketch at every call
    gram = phi.T @ phi  # [k, k], the TRAK form: phi_q^T (Phi^T Phi + lambda I)^-1 phi_j
    damping = GradientIdeas.DAMPING * (phi @ phi.T).diagonal().mean()
    direct = phi_q @ torch.linalg.inv(gram + damping * torch.eye(16, dtype=gram.dtype)) @ phi.T
    assert got.shape == (3, 5) and np.allclose(got, direct.numpy(), rtol=1e-8, atol=1e-10)
    assert np.allclose(ideas.sketch(q).numpy(), phi_q.numpy() / 2)  # linear, seeded: whitening is outside it


def test_the_probes_ekfac_score_solves_each_weight_of_the_flat_gradient():
    import torch

    from benchmarks.counterfactual_ideas import GradientIdeas
    from utils.kfac import KroneckerEigenFisher

    ideas = object.__new__(GradientIdeas)  # the layout only: no model loaded
    gen = torch.Generator().manual_seed(0)
    orthogonal = lambda n: torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]  # noqa: E731
    ideas.names = ["a", "b"]
    ideas.ekfac = {"a": KroneckerEigenFisher(orthogonal(3), orthogonal(2), torch.rand(2, 3, generator=gen,
                                                                                       dtype=torch.float64) + 0.5),
                   "b": KroneckerEigenFisher(torch.eye(2, dtype=torch.float64), torch.eye(1, dtype=torch.float64),
                                             torch.tensor([[2.0, 4.0]], dtype=torch.float64))}
    g = torch.randn(3, 8, generator=gen, dtype=torch.float64)  # [n, 2*3 + 1*2]: weight a row-major, then b
    got = ideas.ekfac_solve(g)
    assert got.shape == (3, 8)
    for i in range(3):
        assert torch.allclose(got[i, :6].reshape(2, 3), ideas.ekfac["a"].solve(g[i, :6].reshape(2, 3)))
    assert torch.allclose(got[:, 6:], g[:, 6:] / torch.tensor([2.0, 4.0], dtype=torch.float64))  # identity basis
