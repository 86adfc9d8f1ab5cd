"""From losses to a ranking, and the AbC benchmark's Recall@K and average precision (docs/method.md, section 6)."""
from typing import Dict, Iterable, Optional, Tuple

import numpy as np


def fold_flips(row_influence: np.ndarray) -> np.ndarray:
    """[2n] rows (unflipped block, then flipped block) -> [n]: each candidate's larger influence."""
    row_influence = np.asarray(row_influence)
    if len(row_influence) % 2:
        raise ValueError(f"expected an even number of rows (unflipped then flipped), got {len(row_influence)}")
    n = len(row_influence) // 2
    return np.maximum(row_influence[:n], row_influence[n:])


def rank_candidates(influence: np.ndarray, n_exemplar: int, screen: Optional[np.ndarray] = None) -> np.ndarray:
    """Candidate indices (exemplars 0..n_exemplar-1, then LAION) by descending influence.

    Ties go against the ground truth, as in AbC's evaluation, which lists LAION before the exemplars: a
    LAION candidate tied with an exemplar ranks above it, so a run that changes nothing (all influences
    equal) puts every exemplar last instead of first. NaN ranks below everything; with a `screen` (the
    two-stage mode's estimate for every candidate), the NaN block (not re-scored) is ordered by it.
    Otherwise ties keep candidate order, so the ranking is reproducible.
    """
    influence = np.asarray(influence, dtype=np.float64)
    is_exemplar = np.arange(len(influence)) < n_exemplar
    missing = np.isnan(influence)
    key = np.where(missing, 0.0, -influence)
    below = np.zeros(len(influence)) if screen is None else np.where(missing, -np.asarray(screen, np.float64), 0.0)
    below = np.where(np.isnan(below), np.inf, below)
    # np.lexsort sorts by the last key first: measured before not, then influence, then screen, then AbC's order
    return np.lexsort((np.arange(len(influence)), is_exemplar, below, key, missing))


def influence_and_rank(exemplar_before, exemplar_after, laion_before, laion_after,
                       screen: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Influence = loss increase, flips folded, exemplars first then LAION; rank from `rank_candidates`.
    Rows without an after-loss (NaN) have no influence; `screen` orders them."""
    exemplar = fold_flips(np.asarray(exemplar_after, np.float64) - np.asarray(exemplar_before, np.float64))
    laion = fold_flips(np.asarray(laion_after, np.float64) - np.asarray(laion_before, np.float64))
    influence = np.concatenate([exemplar, laion])
    return influence, rank_candidates(influence, len(exemplar), screen)


def recall_at_k(rank: np.ndarray, n_exemplar: int, k: int) -> float:
    """Fraction of the ground-truth candidates (indices 0..n_exemplar-1) among the top k."""
    return float(np.sum(np.asarray(rank[:k]) < n_exemplar)) / n_exemplar


def average_precision(rank: np.ndarray, n_exemplar: int) -> float:
    """AbC's AP: the ground truth is the exemplars (indices 0..n_exemplar-1); `average_precision_of` them."""
    return average_precision_of(rank, np.arange(n_exemplar))


def average_precision_of(rank: np.ndarray, relevant) -> float:
    """Mean over the relevant candidates (indices) of (# relevant ranked at or above it) / (its 1-based rank).
    Raises ValueError when the ranking lacks one of them."""
    relevant = np.unique(np.asarray(relevant, dtype=np.int64))
    positions = np.flatnonzero(np.isin(np.asarray(rank), relevant)) + 1  # 1-based ranks, ascending
    if len(positions) != len(relevant):
        raise ValueError(f"ranking holds {len(positions)} of the {len(relevant)} ground-truth candidates")
    return float(np.mean(np.arange(1, len(relevant) + 1) / positions))


def auc(rank: np.ndarray, matching, non_matching) -> float:
    """The chance that a matching candidate is ranked above a non-matching one (the image-level test cases' metric,
    docs/method.md, section 6): the fraction of (matching, non-matching) pairs in that order, from the ranking's
    positions (which break ties as `rank_candidates` does). Two queries whose matching and non-matching sets are
    swapped, ranked the same way, score AUCs that sum to exactly 1. Raises ValueError for an empty set or a
    candidate the ranking lacks."""
    rank = np.asarray(rank)
    position = np.empty(len(rank), dtype=np.int64)
    position[rank] = np.arange(len(rank))
    matching, non_matching = np.asarray(matching, np.int64), np.asarray(non_matching, np.int64)
    if len(matching) == 0 or len(non_matching) == 0:
        raise ValueError(f"AUC needs both sets non-empty, got {len(matching)} matching, {len(non_matching)} not")
    if max(matching.max(), non_matching.max()) >= len(rank) or min(matching.min(), non_matching.min()) < 0:
        raise ValueError(f"a candidate index is outside the ranking of {len(rank)}")
    return float(np.mean(position[matching][:, None] < position[non_matching][None, :]))


def query_metrics(rank: np.ndarray, n_exemplar: int, ks: Iterable[int] = (5, 10, 100)) -> Dict[str, float]:
    out = {f"recall@{k}": recall_at_k(rank, n_exemplar, k) for k in ks}
    out["ap"] = average_precision(rank, n_exemplar)
    return out


def mean_and_stderr(values) -> Tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    stderr = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(stderr)
