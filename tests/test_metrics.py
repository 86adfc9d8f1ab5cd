import numpy as np
import pytest

from utils.metrics import (auc, average_precision, average_precision_of, fold_flips, influence_and_rank,
                           mean_and_stderr, query_metrics, rank_candidates, recall_at_k)


def test_fold_flips_takes_the_larger_of_each_pair():
    rows = np.array([0.1, 0.5, -0.2, 0.3, 0.2, -0.1])  # candidates 0..2 unflipped, then flipped
    np.testing.assert_allclose(fold_flips(rows), [0.3, 0.5, -0.1])
    with pytest.raises(ValueError):
        fold_flips(np.zeros(3))


def test_influence_is_loss_increase_exemplars_first():
    ex_before, ex_after = np.array([1.0, 1.0, 1.0, 1.0]), np.array([1.5, 1.1, 1.2, 1.0])
    la_before, la_after = np.array([2.0, 2.0, 2.0, 2.0]), np.array([2.3, 1.9, 2.0, 2.05])
    influence, rank = influence_and_rank(ex_before, ex_after, la_before, la_after)
    np.testing.assert_allclose(influence, [0.5, 0.1, 0.3, 0.05])
    assert rank.tolist() == [0, 2, 1, 3]


def test_recall_and_ap_hand_computed():
    # 3 exemplars (0, 1, 2) ranked 1st, 4th and 6th among 8 candidates
    rank = np.array([0, 5, 7, 1, 3, 2, 4, 6])
    assert recall_at_k(rank, 3, 1) == pytest.approx(1 / 3)
    assert recall_at_k(rank, 3, 5) == pytest.approx(2 / 3)
    assert recall_at_k(rank, 3, 100) == 1.0
    # AP = (1/1 + 2/4 + 3/6) / 3
    assert average_precision(rank, 3) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert average_precision(np.array([0, 1, 2, 3]), 3) == 1.0
    assert average_precision(np.array([3, 4, 0]), 1) == pytest.approx(1 / 3)
    m = query_metrics(rank, 3, ks=(5, 10))
    assert m == {"recall@5": pytest.approx(2 / 3), "recall@10": 1.0, "ap": pytest.approx(2 / 3)}


def test_an_all_zero_influence_scores_at_the_bottom():
    """A run that changes nothing must not look perfect: ties go against the exemplars (AbC's order)."""
    influence, rank = influence_and_rank(np.ones(4), np.ones(4), np.ones(6), np.ones(6))
    assert rank.tolist() == [2, 3, 4, 0, 1]  # LAION first, each group in candidate order
    m = query_metrics(rank, 2, ks=(1, 3))
    assert m["recall@1"] == 0 and m["recall@3"] == 0
    assert m["ap"] == pytest.approx((1 / 4 + 2 / 5) / 2)  # the lowest AP two of five candidates can have


def test_ties_break_against_exemplars_and_nan_ranks_last():
    # candidates 0, 1 are exemplars; 0 ties with LAION 3, and 1 is NaN
    assert rank_candidates(np.array([1.0, np.nan, 0.5, 1.0, 2.0]), 2).tolist() == [4, 3, 0, 2, 1]
    assert rank_candidates(np.array([0.2, 0.1, 0.3]), 1).tolist() == [2, 0, 1]  # no ties: plain descending order


def test_mean_and_stderr():
    mean, se = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert mean_and_stderr([0.7]) == (0.7, 0.0)


def test_auc_hand_computed_and_perfect_ranking_scores_one():
    rank = np.array([3, 0, 4, 1, 2])  # positions: 3->0, 0->1, 4->2, 1->3, 2->4
    assert auc(rank, [3, 0], [1, 2]) == 1.0  # every matching candidate above every non-matching one
    assert auc(rank, [1, 2], [3, 0]) == 0.0
    assert auc(rank, [0, 2], [4, 1]) == pytest.approx(2 / 4)  # 0 beats 4 and 1; 2 beats neither
    with pytest.raises(ValueError):
        auc(rank, [], [1])
    with pytest.raises(ValueError):
        auc(rank, [0], [7])


def test_a_ranking_that_ignores_the_image_scores_half_on_a_balanced_pair():
    # a pair: query A's matching set is query B's non-matching set and the reverse; a prompt-only method ranks
    # both queries' candidates identically, whatever that ranking is
    rng = np.random.default_rng(0)
    a_set, b_set = [0, 1, 2, 3], [4, 5, 6, 7]
    for _ in range(20):
        rank = rank_candidates(rng.standard_normal(40), n_exemplar=8)
        assert (auc(rank, a_set, b_set) + auc(rank, b_set, a_set)) / 2 == 0.5
    # a ranking that reads the image puts each query's matching set first: pair mean 1
    rank_a = rank_candidates(np.r_[np.ones(4), np.zeros(36)], 8)
    rank_b = rank_candidates(np.r_[np.zeros(4), np.ones(4), np.zeros(32)], 8)
    assert (auc(rank_a, a_set, b_set) + auc(rank_b, b_set, a_set)) / 2 == 1.0


def test_average_precision_of_a_set_equals_abc_ap_for_the_exemplars():
    rng = np.random.default_rng(1)
    rank = rank_candidates(rng.standard_normal(30), n_exemplar=5)
    assert average_precision_of(rank, range(5)) == average_precision(rank, 5)
    assert average_precision_of(np.array([9, 2, 4, 0]), [2, 0]) == pytest.approx((1 / 2 + 2 / 4) / 2)
