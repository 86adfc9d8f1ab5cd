"""Scoring an attribution against counterfactual ground truth: what retraining a customization without an exemplar
does to a query's loss (docs/counterfactual.md; the truth itself is built by data/mini_abc_build/counterfactual.py).

Notation, per customized model (a *base*): queries q (its synthesized images), exemplars e, L_S(q) the query's
loss under the customization retrained on the exemplar set S (mean over both flips and T shared (t, noise) draws).

  LOO effect        d(q, e) = L_{all but e}(q) - L_all(q): how much the query needed e (positive: removing e makes
                    the query less likely)
  image-specific    x(q) - mean over q's peers q' of x(q'), peers the other samples of q's prompt: what differs
                    between two images of one prompt of one model
  LOO Spearman      per query, Spearman over e between a ranking's scores s(q, e) and d(q, e)
  LDS               per query, Spearman over the random halves S_m between sum_{e in S_m} s(q, e) and -L_{S_m}(q)
                    (the linear datamodeling score of TRAK / D-TRAK; the minus sign because an exemplar that helps
                    lowers the loss)
  look dependence   two-look models: L_{look B alone}(q) - L_{look A alone}(q), how much more q needs look A

A ranking's scores are higher for a candidate it holds more influential (AbU: the loss rise after unlearning q).
Every function takes plain arrays: [n_queries, n_exemplars] scores and effects, [n_sets, n_queries] losses.
"""
from typing import Dict, List, Sequence

import numpy as np


def ranks(values: np.ndarray) -> np.ndarray:
    """[n] -> [n] float64 ranks from 1, ties given their mean rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    r = np.empty(len(values), dtype=np.float64)
    r[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values[np.isfinite(values)]):
        tied = values == v
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties at their mean rank); NaN when either side is constant or has fewer than 2
    finite pairs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        return float("nan")
    ra, rb = ranks(a[keep]), ranks(b[keep])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-a over the pairs of positions (ties count 0); NaN for fewer than 2 positions."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return float("nan")
    i, j = np.triu_indices(len(a), 1)
    return float(np.mean(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])))


def loo_effects(loss: Dict[str, np.ndarray], n_exemplar: int, seed: int = 0, kind: str = "loo") -> np.ndarray:
    """[n_queries, n_exemplars] d(q, e) = L_{loo e}(q) - L_full(q) from the losses of the sets `loo<e>@<seed>` and
    `full@<seed>` ({set name: [n_queries]}); `kind="placebo"` reads `placebo<e>@<seed>` instead (the same training
    perturbed as leaving e out, e kept: what d owes to the perturbation alone). Values may be [n_queries, bands].
    Raises KeyError naming a set not measured."""
    full = loss[f"full@{seed}"]
    return np.stack([loss[f"{kind}{e}@{seed}"] - full for e in range(n_exemplar)], axis=1)


def measured_seeds(loss: Dict[str, np.ndarray], n_exemplar: int) -> List[int]:
    """The training seeds k (0, 1, 2, ...) whose `full@k` and every `loo<e>@k` are measured, ascending."""
    seeds = sorted({int(name.split("@")[1]) for name in loss if name.startswith("full@")})
    return [k for k in seeds if all(f"loo{e}@{k}" in loss for e in range(n_exemplar))]


def split_seed_effects(loss: Dict[str, np.ndarray], n_exemplar: int) -> tuple:
    """The LOO truth and its independent copy, each averaged over half the measured training seeds: (truth, ceiling,
    seeds per half). truth is the mean of d(q, e) over the even seeds (0, 2, 4, ...), ceiling over as many odd seeds
    (1, 3, ...), [n_queries, n_exemplars] each; a ranking's agreement with the truth is read against the ceiling's,
    an equally noisy copy (with seeds 0 and 1 only: seed 0 against seed 1). Averaging k seeds multiplies the seed
    agreement r of one training to k r / (1 + (k - 1) r) (Spearman-Brown; docs/counterfactual.md). (None, None, 0)
    without seed 0; ceiling None without seed 1."""
    seeds = measured_seeds(loss, n_exemplar)
    if 0 not in seeds:  # before any effect is taken: a truth without seed 0 (or without exemplars) has none
        return None, None, 0
    return split_seeds({k: loo_effects(loss, n_exemplar, k) for k in seeds})


def split_seeds(values: Dict[int, np.ndarray]) -> tuple:
    """{training seed: array} -> (mean over the even seeds, mean over as many odd ones, seeds per half): the truth
    and its independent copy. (None, None, 0) without seed 0; the copy None without an odd seed."""
    if 0 not in values:
        return None, None, 0
    even, odd = [k for k in sorted(values) if k % 2 == 0], [k for k in sorted(values) if k % 2 == 1]
    half = min(len(even), len(odd)) or 1
    mean = lambda ks: np.mean([values[k] for k in ks], axis=0)  # noqa: E731
    return mean(even[:half]), mean(odd[:half]) if odd else None, half


def look_seeds(loss: Dict[str, np.ndarray], alone: Sequence[str] = ("lookA", "lookB")) -> List[int]:
    """The training seeds k at which both looks alone are measured (sets `<alone[0]>@k` and `<alone[1]>@k`; a
    two-look object model's looks alone are its LOO sets), ascending."""
    seeds = sorted({int(name.split("@")[1]) for name in loss if name.startswith(f"{alone[0]}@")})
    return [k for k in seeds if f"{alone[1]}@{k}" in loss]


def split_look_dependence(loss: Dict[str, np.ndarray], alone: Sequence[str] = ("lookA", "lookB")) -> tuple:
    """The look-level truth and its independent copy, as `split_seed_effects` does for the LOO truth: (truth,
    ceiling, seeds per half), truth the mean over the even seeds of L_{look B alone}(q) - L_{look A alone}(q) (how
    much more q needs look A; `alone` names the two sets), ceiling over as many odd seeds, [n_queries] each.
    (None, None, 0) without seed 0; ceiling None without an odd seed."""
    return split_seeds(look_dependence(loss, alone))


def look_dependence(loss: Dict[str, np.ndarray], alone: Sequence[str] = ("lookA", "lookB")) -> Dict[int, np.ndarray]:
    """{training seed k: [n_queries] L_{look B alone}(q) - L_{look A alone}(q)} over `look_seeds`."""
    return {k: loss[f"{alone[1]}@{k}"] - loss[f"{alone[0]}@{k}"] for k in look_seeds(loss, alone)}


def per_prompt_spearman(x: np.ndarray, y: np.ndarray, prompt_of: Sequence) -> List[float]:
    """Per prompt (in sorted order), the Spearman across its samples between x and y ([n_queries] each)."""
    prompt_of = np.asarray(list(prompt_of))
    return [spearman(x[prompt_of == p], y[prompt_of == p]) for p in np.unique(prompt_of)]


def seed_average_agreement(loss: Dict[str, np.ndarray], n_exemplar: int, k: int, prompt_of: Sequence = None,
                           splits: int = 64, seed: int = 0) -> float:
    """How well the LOO truth averaged over k training seeds reproduces: the mean over up to `splits` random pairs of
    disjoint k-seed groups (of the measured seeds, `measured_seeds`) of the per-query Spearman over exemplars between
    the two groups' mean effects, averaged over queries. With `prompt_of` [n_queries], both sides are first reduced
    to their image-specific part (`image_specific`). Every pair of groups is used when there are at most `splits`.
    This is the measured counterpart of the Spearman-Brown step k r1 / (1 + (k - 1) r1) (`spearman_brown`); NaN
    when fewer than 2k seeds are measured."""
    def agree(x, y):
        if prompt_of is not None:
            x, y = image_specific(x, prompt_of), image_specific(y, prompt_of)
        return float(np.nanmean(per_query(x, y)))

    effects = {s: loo_effects(loss, n_exemplar, s) for s in measured_seeds(loss, n_exemplar)}
    return group_agreement(effects, k, agree, splits, seed)


def look_average_agreement(loss: Dict[str, np.ndarray], k: int, prompt_of: Sequence, splits: int = 64,
                           seed: int = 0, alone: Sequence[str] = ("lookA", "lookB")) -> float:
    """The same for the look-level truth (`split_look_dependence`; `alone` names the two looks' sets): two disjoint
    k-seed averages of a query's look dependence, per prompt the Spearman across its samples, averaged over prompts
    (NaN with fewer than 2k seeds)."""
    def agree(x, y):
        return float(np.nanmean(per_prompt_spearman(x, y, prompt_of)))

    return group_agreement(look_dependence(loss, alone), k, agree, splits, seed)


def group_agreement(values: Dict[int, np.ndarray], k: int, agree, splits: int = 64, seed: int = 0) -> float:
    """Mean of agree(mean of group a, mean of group b) over up to `splits` random pairs (every pair when fewer) of
    disjoint k-seed groups of `values` ({training seed: array}); NaN when fewer than 2k seeds."""
    from itertools import combinations

    seeds = sorted(values)
    if k < 1 or len(seeds) < 2 * k:
        return float("nan")
    pairs = [(a, b) for a in combinations(seeds, k) for b in combinations(seeds, k) if a < b and not set(a) & set(b)]
    if len(pairs) > splits:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), splits, replace=False))]
    return float(np.mean([agree(*(np.mean([values[s] for s in group], axis=0) for group in pair))
                          for pair in pairs]))


def spearman_brown(r1: float, k: float) -> float:
    """The agreement of two k-fold averages predicted from the agreement r1 of single measurements:
    k r1 / (1 + (k - 1) r1) (Spearman 1910, Brown 1910; exact for Pearson reliabilities of parallel measures)."""
    return k * r1 / (1 + (k - 1) * r1)


def image_specific(values: np.ndarray, prompt_of: Sequence, peers: Sequence[Sequence[int]] = None) -> np.ndarray:
    """values [n_queries, ...] minus, for each query, the mean of its peers' values; peers default to the other
    queries with the same prompt (`prompt_of` [n_queries]). A query without peers gets NaN."""
    values = np.asarray(values, dtype=np.float64)
    prompt_of = list(prompt_of)
    if peers is None:
        peers = [[j for j, p in enumerate(prompt_of) if p == prompt_of[i] and j != i] for i in range(len(values))]
    out = np.full_like(values, np.nan)
    for i, group in enumerate(peers):
        if len(group):
            out[i] = values[i] - values[list(group)].mean(axis=0)
    return out


def per_query(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[n_queries] Spearman over exemplars between each query's scores and truth (both [n_queries, n_exemplars])."""
    return np.array([spearman(s, t) for s, t in zip(scores, truth)])


def lds(scores: np.ndarray, subsets: Sequence[Sequence[int]], subset_loss: np.ndarray) -> np.ndarray:
    """[n_queries] linear datamodeling score: per query, Spearman over the M subsets between the summed scores of
    each subset's exemplars and minus the query's loss under the model trained on it. scores [n_queries,
    n_exemplars], subset_loss [M, n_queries]."""
    member = np.zeros((len(subsets), scores.shape[1]))
    for m, s in enumerate(subsets):
        member[m, list(s)] = 1.0
    predicted = member @ np.asarray(scores, dtype=np.float64).T  # [M, n_queries]
    return np.array([spearman(predicted[:, q], -np.asarray(subset_loss)[:, q]) for q in range(scores.shape[0])])


def across_samples(scores: np.ndarray, truth: np.ndarray, prompt_of: Sequence) -> np.ndarray:
    """Per query, the Spearman over its prompt's samples (itself and its peers) between a ranking's score for an
    exemplar and that exemplar's truth, averaged over the exemplars: does the ranking give an exemplar more weight in
    the samples that need it more? (Defined for one exemplar too.) The same value for every sample of a prompt."""
    prompt_of = np.asarray(list(prompt_of))
    out = np.full(len(scores), np.nan)
    for p in np.unique(prompt_of):
        group = np.flatnonzero(prompt_of == p)
        values = [spearman(scores[group, e], truth[group, e]) for e in range(scores.shape[1])]
        if np.isfinite(values).any():
            out[group] = np.nanmean(values)
    return out


def within_query_auc(scores: np.ndarray, matching: Sequence[int], non_matching: Sequence[int]) -> float:
    """The chance that one query's score of a matching exemplar exceeds that of a non-matching one (ties half)."""
    a = np.asarray(scores, dtype=np.float64)[list(matching)][:, None]
    b = np.asarray(scores, dtype=np.float64)[list(non_matching)][None, :]
    return float(np.mean((a > b) + 0.5 * (a == b)))


def look_preference(scores: np.ndarray, looks: Sequence[int]) -> np.ndarray:
    """[n_queries] how much a ranking favours look A's exemplars over look B's in each query (`scores`
    [n_queries, n_exemplars], `looks` [n_exemplars] 0 for A, 1 for B): the within-query AUC of A above B, scale-free
    across queries. Where each look is one exemplar (a two-look object model) that AUC is only the sign of
    s_A - s_B, so a prompt whose samples all put the same exemplar first would have no order at all; there it is the
    difference s_A - s_B itself, in the ranking's units (one model's queries share them)."""
    a = [e for e, look in enumerate(looks) if look == 0]
    b = [e for e, look in enumerate(looks) if look == 1]
    scores = np.asarray(scores, dtype=np.float64)
    if len(a) == 1 and len(b) == 1:
        return scores[:, a[0]] - scores[:, b[0]]
    return np.array([within_query_auc(s, a, b) for s in scores])


def look_pairs(dependence: np.ndarray, prompt_of: Sequence) -> List[tuple]:
    """Per prompt, (the sample that needs look A most, the one that needs it least) by the look dependence."""
    prompt_of = np.asarray(list(prompt_of))
    out = []
    for p in dict.fromkeys(prompt_of.tolist()):
        group = np.flatnonzero(prompt_of == p)
        if len(group) >= 2:
            out.append((int(group[np.argmax(dependence[group])]), int(group[np.argmin(dependence[group])])))
    return out


def look_pair_auc(scores: np.ndarray, looks: Sequence[int], pairs: Sequence[tuple]) -> np.ndarray:
    """[n_pairs] for each (A-needing, B-needing) pair of queries: the mean of the first's within-query AUC of look A's
    exemplars above B's and the second's of B's above A's (0.5 for a ranking that ignores the image)."""
    a = [e for e, look in enumerate(looks) if look == 0]
    b = [e for e, look in enumerate(looks) if look == 1]
    return np.array([0.5 * (within_query_auc(scores[i], a, b) + within_query_auc(scores[j], b, a)) for i, j in pairs])


def agreement_between_samples(effects: np.ndarray, prompt_of: Sequence) -> np.ndarray:
    """[n_queries] mean Kendall tau between a query's LOO ordering and each peer's (same prompt): how alike the
    truth is for two images of one prompt."""
    prompt_of = list(prompt_of)
    out = np.full(len(effects), np.nan)
    for i in range(len(effects)):
        taus = [kendall_tau(effects[i], effects[j]) for j, p in enumerate(prompt_of) if p == prompt_of[i] and j != i]
        if taus:
            out[i] = float(np.mean(taus))
    return out


def signal_to_noise(effects_0: np.ndarray, effects_1: np.ndarray, prompt_of: Sequence) -> float:
    """How far the truth's differences between samples of one prompt stand above its training-seed noise: the mean
    over prompts and exemplars of the variance of d(q, e) across the prompt's samples (seed 0), divided by the seed
    noise variance var(d_0 - d_1) / 2 pooled over queries. About 1 when the samples differ only by noise."""
    prompt_of = np.asarray(list(prompt_of))
    noise = np.var(effects_0 - effects_1, axis=0, ddof=1).mean() / 2
    between = [np.var(effects_0[prompt_of == p], axis=0, ddof=1).mean() for p in np.unique(prompt_of)
               if (prompt_of == p).sum() > 1]
    return float(np.mean(between) / noise) if noise > 0 and between else float("nan")
