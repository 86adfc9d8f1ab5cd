"""The counterfactual table's scoring, shared by its scripts (benchmarks/counterfactual.py, the table;
benchmarks/counterfactual_ideas.py, the ideas probe): the rows it scores and where their runs live, one customized
model's truth and queries (`Base`), a ranking's scores of a model's exemplars from its runs, and every per-query
metric of docs/counterfactual.md against the truth and its seed ceiling."""
from pathlib import Path

import numpy as np

from benchmarks.runner import TUNED
from data.mini_abc_build.counterfactual import load_truth, look_sets
from data.mini_abc_build.image_level import ImageLevelConfig
from utils import counterfactual as cf
from utils.evaluation import load_result
from utils.layout import ResultsLayout
from utils.metrics import mean_and_stderr, rank_candidates
from utils.ranking import RANKINGS as RANKINGS_BY_NAME, compose, query_parts

STOP = ["--stop_rule", TUNED["stop_rule"], "--stop_target", str(TUNED["stop_target"]), "--stop_every",
        str(TUNED["stop_every"])]
UNLEARNING = {"AbU": ("abu", []), "AbU, stop rule": ("abu_stop_rule", STOP)}  # name: (folder, flags)
CONTROL = {"AbU": "abu_noise_image_control", "AbU, stop rule": "abu_stop_rule_noise_image_control"}
BASELINES = {"random": "random", "pixel cosine": "pixel", "VAE-latent cosine": "vae",
             "gradient similarity (Fisher-whitened, K/V)": "gradient"}
RANKINGS = [("influence (the paper)", "influence"), ("control-corrected", "control-corrected"),
            ("model-contrast", "model-contrast"), ("combined", "combined"), ("blended", "blended")]
KINDS = ("two-look style", "two-look object", "AbC style", "AbC object")
METRICS = [("LOO", "LOO Spearman"), ("LOO, image-specific", "LOO Spearman, image-specific"),
           ("LDS", "LDS"), ("LDS, image-specific", "LDS, image-specific"),
           ("across samples", "across a prompt's samples")]
SEED_ALONE = "LOO at training seed "  # per_query metric names of the per-seed table, the seed appended
N_LAION = ImageLevelConfig().pretraining_candidates  # the image-level comparison's candidates


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


# ------------------------------------------------------------------ the runs
def first_samples(queries: list, per_prompt: int = 0) -> list:
    """The plan's queries of one model, only the first `per_prompt` of each prompt (in seed order, so chosen without
    any label; 0: all): a smaller run that every ranking and the truth share."""
    seen = {}
    keep = []
    for q in queries:
        seen[q["prompt_index"]] = seen.get(q["prompt_index"], 0) + 1
        if not per_prompt or seen[q["prompt_index"]] <= per_prompt:
            keep.append(q)
    return keep


def representatives(tasks) -> dict:
    """{(model, prompt): the query whose noise-image control stands for the prompt's} (a labelled one if any: the
    image-level comparison runs those)."""
    out = {}
    for t in tasks:
        out.setdefault((t.model_path, t.prompt), t)
    return out


# ------------------------------------------------------------------ the truth of a base, and its queries
class Base:
    """One customized model with a counterfactual truth: its queries (in the truth's order), their prompts, labels
    and peers, and the truth's arrays."""

    def __init__(self, spec: dict, tasks_by_path: dict, bench: Path, per_prompt: int = 0):
        queries = first_samples(spec["queries"], per_prompt)
        spec = {**spec, "queries": queries}
        self.spec, self.name, self.kind, self.split = spec, spec["name"], spec["kind"], spec["split"]
        self.bench = bench
        self.truth = load_truth(bench, self.name)
        if self.truth["queries"] is not None:  # the truth's rows of the kept queries
            row = {path: i for i, path in enumerate(self.truth["queries"])}
            keep = np.array([row[q["path"]] for q in queries])
            for key in ("loss", "bands"):
                self.truth[key] = {name: values[keep] for name, values in self.truth[key].items()}
        self.tasks = [tasks_by_path[q["path"]] for q in queries]
        self.prompt_of = [q["prompt_index"] for q in queries]
        self.labelled = [q["label"] is not None for q in queries]
        self.n_exemplar = len(spec["exemplars"])
        # peers of a ranking: the prompt's samples no label chose; of the truth's image-specific part: every other
        self.unselected_peers = [[j for j, q in enumerate(queries) if q["prompt_index"] == queries[i]["prompt_index"]
                                  and j != i and q["label"] is None] for i in range(len(queries))]
        loss = self.truth["loss"]
        self.has = lambda *names: all(n in loss for n in names)  # noqa: E731
        # the truth (even training seeds) and its ceiling's copy (as many odd ones): seed 0 and seed 1 until more
        # seeds are built (tier 3)
        self.effects, self.effects_1, self.seeds_per_half = cf.split_seed_effects(loss, self.n_exemplar)
        self.halves = sorted(n for n in loss if n.startswith("half"))
        # the look-level truth (even seeds) and its ceiling's copy (as many odd ones), like the LOO truth's; None
        # until both looks alone are measured at seed 0
        alone = look_sets(spec)
        self.looks_truth, self.looks_ceiling, self.look_seeds_per_half = (
            (None, None, 0) if alone is None else cf.split_look_dependence(loss, alone))

    def image_specific(self, values):
        return cf.image_specific(values, self.prompt_of)


def exemplar_scores(base: Base, root: Path, folder: str, ranking: str, control_folder=None, reps=None) -> tuple:
    """([n_queries, n_exemplars] the ranking's scores of the base's exemplars, [n_queries] its full ranks, cost per
    query): `ranking` composed from the runs in `folder` with peers the prompt's unselected samples (and the
    noise-image control of the prompt's representative, for control-corrected)."""
    layout = lambda f: ResultsLayout(root / f, root / "orig_loss")  # noqa: E731
    results = [load_result(layout(folder), t) for t in base.tasks]
    influences = [r["influence"] for r in results]
    scores, ranked, costs = [], [], []
    for i, (t, r) in enumerate(zip(base.tasks, results)):
        control, cost = None, sum(r.get("forward_equivalents", {}).values())
        if ranking == "control-corrected":
            c = load_result(layout(control_folder), reps[(t.model_path, t.prompt)])
            control = c["influence"]
            sharing = sum(1 for o in base.tasks if o.prompt == t.prompt)
            cost += sum(c.get("forward_equivalents", {}).values()) / sharing
        peers = base.unselected_peers[i] if RANKINGS_BY_NAME[ranking].needs_peers else None
        parts = query_parts(influences[i], control,
                            None if peers is None else {base.tasks[j].synth_image_path: influences[j] for j in peers})
        score = compose(parts, ranking, r["n_exemplar"])
        scores.append(score[:base.n_exemplar])
        ranked.append({"n_exemplar": r["n_exemplar"], "rank": rank_candidates(score, r["n_exemplar"])})
        costs.append(cost)
    return np.array(scores), ranked, float(np.mean(costs))


# ------------------------------------------------------------------ scoring
def score_rows(base: Base, scores: np.ndarray) -> dict:
    """Per-query metrics of one ranking on one base: {metric: [n_queries]} (NaN where the truth lacks what it needs)."""
    n = len(base.tasks)
    nan = np.full(n, np.nan)
    out = {k: nan.copy() for k, _ in METRICS}
    if base.effects is not None:
        out["LOO"] = cf.per_query(scores, base.effects)
        out["LOO, image-specific"] = cf.per_query(scores, base.image_specific(base.effects))
        out["across samples"] = cf.across_samples(scores, base.effects, base.prompt_of)
        for seed in cf.measured_seeds(base.truth["loss"], base.n_exemplar):  # each seed's truth alone: seed 0
            out[f"{SEED_ALONE}{seed}"] = cf.per_query(  # trained the queries' own model
                scores, cf.loo_effects(base.truth["loss"], base.n_exemplar, seed))
    if len(base.halves) >= 2:
        subsets = [base.truth["sets"][h]["members"] for h in base.halves]
        losses = np.stack([base.truth["loss"][h] for h in base.halves])
        out["LDS"] = cf.lds(scores, subsets, losses)
        out["LDS, image-specific"] = cf.lds(scores, subsets, base.image_specific(losses.T).T)
    return out


def ceiling_rows(base: Base) -> dict:
    """The truth's own noise: the LOO effects of the second training seed as scores (the image-specific part of
    them for the image-specific metrics), scored like a ranking."""
    if base.effects is None or base.effects_1 is None:
        return None
    whole, specific = score_rows(base, base.effects_1), score_rows(base, base.image_specific(base.effects_1))
    return {"LOO": whole["LOO"], "LOO, image-specific": specific["LOO, image-specific"], "LDS": whole["LDS"],
            "LDS, image-specific": specific["LDS, image-specific"], "across samples": whole["across samples"]}


def look_ceiling(base: Base):
    """The look-level truth's own noise: per prompt, Spearman across its samples between the look dependence
    averaged over the even training seeds (the truth) and over as many odd ones (None until the looks alone are
    measured at seed 1 too)."""
    if base.looks_truth is None or base.looks_ceiling is None:
        return None
    return cf.per_prompt_spearman(base.looks_truth, base.looks_ceiling, base.prompt_of)


def look_rows(base: Base, scores: np.ndarray) -> dict:
    """Two-look models: per prompt, Spearman across samples between the ranking's preference for look A
    (utils.counterfactual.look_preference) and the look dependence; per prompt's most-apart pair, the pair AUC."""
    dependence = base.looks_truth
    if dependence is None:
        return {}
    looks = base.spec["looks"]
    return {"look Spearman": cf.per_prompt_spearman(cf.look_preference(scores, looks), dependence, base.prompt_of),
            "look pair AUC": cf.look_pair_auc(scores, looks, cf.look_pairs(dependence, base.prompt_of)).tolist()}


def fmt(values) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    m, se = mean_and_stderr(values)
    return f"{m:+.2f} ± {se:.2f}"
