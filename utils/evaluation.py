"""Scoring rankings with AbC's metrics (docs/method.md, section 6): the one scorer of evaluate.py and the benchmarks.

A query's result is its influence.pkl; its ranking is recomputed here from the influence with
`utils.metrics.rank_candidates` (ties against the exemplars), so results written before that rule, or by
another tool, are scored by the same rule as everything else.
"""
import csv
import io
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .errors import InputError
from .io import load_pickle
from .layout import ResultsLayout
from .data import laion_image_paths
from .metrics import auc, average_precision_of, mean_and_stderr, query_metrics, rank_candidates
from .tasks import FAMILIES, TEST_CASES, Task, exemplar_paths, image_ground_truth

def load_result(layout: ResultsLayout, task: Task) -> dict:
    """A query's influence.pkl, with `rank` recomputed from its influence (ties against the exemplars; a two-stage
    result's candidates that were not re-scored are ordered by its screen)."""
    path = layout.influence_file(task)
    result = load_pickle(path, "result", remedy="rerun compute_influence.py for this query with --overwrite")
    if not isinstance(result, dict) or "n_exemplar" not in result or "influence" not in result:
        raise InputError(f"{path} has no 'influence' or 'n_exemplar' (written by another tool?); "
                         f"rerun compute_influence.py for this query")
    result["rank"] = rank_candidates(result["influence"], result["n_exemplar"], result.get("screen"))
    return result


def load_results(layout: ResultsLayout, tasks: Sequence[Task]) -> Tuple[List[Tuple[Task, dict]], List[Task]]:
    """(task, result) for each query with a finished result, and the tasks without one."""
    found, missing = [], []
    for t in tasks:
        if layout.influence_file(t).is_file():
            found.append((t, load_result(layout, t)))
        else:
            missing.append(t)
    return found, missing


def score_queries(found: Sequence[Tuple[Task, dict]], ks: Sequence[int] = (5, 10, 100), dataroot=None) -> List[Dict]:
    """One row per query: its identity, family and Recall@K / AP; with `dataroot`, also the image-level metrics of
    the queries that have image-level ground truth (`image_level_metrics`; NaN in the other rows)."""
    rows, laion = [], None
    for task, result in found:
        row = {"query": task.synth_image_path, "test_case": task.test_case, "family": task.family,
               "model": task.model_path, "n_exemplar": result["n_exemplar"]}
        row.update(query_metrics(result["rank"], result["n_exemplar"], ks))
        if dataroot is not None:
            laion = laion_image_paths(dataroot) if laion is None else laion
            row.update(image_level_metrics(task, result, Path(dataroot), laion))
        rows.append(row)
    extra = list(dict.fromkeys(m for r in rows for m in r if m.startswith(IMAGE_METRICS)))
    for r in rows:
        r.update({m: r.get(m, float("nan")) for m in extra})
    return rows


IMAGE_METRICS = ("auc", "image_ap")  # column names of the image-level metrics (others: "auc (<reading>)")


def image_level_metrics(task: Task, result: dict, dataroot: Path, laion: Sequence[Path]) -> Dict[str, float]:
    """A query's image-level metrics ({} for a query without image-level ground truth, e.g. AbC's): per reading,
    the AUC of its matching candidates against its non-matching ones (utils.metrics.auc), named "auc" for the first
    reading and "auc (<name>)" for the others; and "image_ap", the AP with the first reading's matching set as the
    ground truth over all candidates. Candidates outside the attributed subset are left out of the sets; raises
    InputError when a set has none left."""
    readings = image_ground_truth(dataroot, task)
    if readings is None:
        return {}
    n_ex, rank = int(result["n_exemplar"]), result["rank"]
    index = {p.relative_to(dataroot).as_posix(): i for i, p in enumerate(exemplar_paths(dataroot, task))}
    index.update({p.relative_to(dataroot).as_posix(): n_ex + i for i, p in enumerate(laion[:len(rank) - n_ex])})
    out = {}
    for j, reading in enumerate(readings):
        sets = [[index[p] for p in paths if p in index] for paths in (reading.matching, reading.non_matching)]
        if not all(sets):
            raise InputError(f"query {task.synth_image_path}: none of the {'non-' * (not sets[1])}matching candidates "
                             f"of its reading {reading.name!r} is among the {len(rank)} candidates attributed; "
                             f"attribute it with a larger --laion_subset_size")
        out["auc" if j == 0 else f"auc ({reading.name})"] = auc(rank, *sets)
        if j == 0:
            out["image_ap"] = average_precision_of(rank, sets[0])
    return out


def metric_columns(rows: Sequence[Dict], ks: Sequence[int]) -> List[str]:
    """Recall@K and AP, then the image-level metrics the rows hold."""
    present = list(dict.fromkeys(m for r in rows for m in r if m.startswith(IMAGE_METRICS)))
    return [f"recall@{k}" for k in ks] + ["ap"] + present


def groups_of(rows: Sequence[Dict]) -> List[Tuple[str, List[Dict]]]:
    """(name, rows) for each test case present (AbC's four first), each family present, and all queries."""
    present = list(dict.fromkeys(r["test_case"] for r in rows))
    cases = [tc for tc in TEST_CASES if tc in present] + [tc for tc in present if tc not in TEST_CASES]
    families = list(dict.fromkeys(["object", "style"] + list(FAMILIES.values()) + [r["family"] for r in rows]))
    out = [(tc, [r for r in rows if r["test_case"] == tc]) for tc in cases]
    out += [(f"family: {fam}", [r for r in rows if r["family"] == fam]) for fam in families]
    out.append(("all", list(rows)))
    return [(name, members) for name, members in out if members]


def summarize(rows: Sequence[Dict], metric_names: Sequence[str]) -> List[Dict]:
    """Mean and standard error of each metric per group of `groups_of`."""
    out = []
    for name, members in groups_of(rows):
        entry = {"group": name, "n": len(members)}
        for m in metric_names:  # over the members that have the metric (image-level ones: only some queries)
            entry[m], entry[f"{m}_se"] = mean_and_stderr([r[m] for r in members if not np.isnan(r[m])])
        out.append(entry)
    return out


def to_csv(rows: Sequence[Dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(summary: Sequence[Dict], metric_names: Sequence[str]) -> str:
    header = "| group | n | " + " | ".join(metric_label(m) for m in metric_names) + " |"
    lines = [header, "|" + "---|" * (2 + len(metric_names))]
    for s in summary:
        cells = ["–" if np.isnan(s[m]) else f"{s[m]:.3f} ± {s[m + '_se']:.3f}" for m in metric_names]
        lines.append(f"| {s['group']} | {s['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def metric_label(metric: str) -> str:
    """A metric's name in summary tables: mAP, image mAP, AUC (AUC (<reading>)); recall@K as it is."""
    return {"ap": "mAP", "image_ap": "image mAP"}.get(metric, metric.replace("auc", "AUC", 1))


def mean_metric(rows: Sequence[Dict], metric: str) -> Tuple[float, float]:
    """Mean and standard error of one metric over the rows that have it (nan, nan when none has: an image-level
    metric of AbC's queries, a reading that no query of a split holds)."""
    values = [r[metric] for r in rows if not np.isnan(r.get(metric, np.nan))]
    return mean_and_stderr(values) if values else (float("nan"), float("nan"))


def overlap(rank_a: np.ndarray, rank_b: np.ndarray, k: int) -> float:
    """Fraction of the top-k candidates two rankings share."""
    return len(set(np.asarray(rank_a[:k]).tolist()) & set(np.asarray(rank_b[:k]).tolist())) / k
