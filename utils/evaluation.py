"""Scoring rankings with AbC's metrics (docs/method.md, section 6): the one scorer of evaluate.py and the benchmarks.

A query's result is its influence.pkl; its ranking is recomputed here from the influence with
`utils.metrics.rank_candidates` (ties against the exemplars), so results written before that rule, or by
another tool, are scored by the same rule as everything else.
"""
import csv
import io
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .errors import InputError
from .io import load_pickle
from .layout import ResultsLayout
from .metrics import mean_and_stderr, query_metrics, rank_candidates
from .tasks import FAMILIES, TEST_CASES, Task

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


def score_queries(found: Sequence[Tuple[Task, dict]], ks: Sequence[int] = (5, 10, 100)) -> List[Dict]:
    """One row per query: its identity, family and Recall@K / AP."""
    rows = []
    for task, result in found:
        row = {"query": task.synth_image_path, "test_case": task.test_case, "family": task.family,
               "model": task.model_path, "n_exemplar": result["n_exemplar"]}
        row.update(query_metrics(result["rank"], result["n_exemplar"], ks))
        rows.append(row)
    return rows


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
        for m in metric_names:
            entry[m], entry[f"{m}_se"] = mean_and_stderr([r[m] for r in members])
        out.append(entry)
    return out


def to_csv(rows: Sequence[Dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(summary: Sequence[Dict], metric_names: Sequence[str]) -> str:
    header = "| group | n | " + " | ".join("mAP" if m == "ap" else m for m in metric_names) + " |"
    lines = [header, "|" + "---|" * (2 + len(metric_names))]
    for s in summary:
        cells = [f"{s[m]:.3f} ± {s[m + '_se']:.3f}" for m in metric_names]
        lines.append(f"| {s['group']} | {s['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_metric(rows: Sequence[Dict], metric: str) -> Tuple[float, float]:
    """Mean and standard error of one metric over rows (nan, nan when there are none)."""
    return mean_and_stderr([r[metric] for r in rows]) if rows else (float("nan"), float("nan"))


def overlap(rank_a: np.ndarray, rank_b: np.ndarray, k: int) -> float:
    """Fraction of the top-k candidates two rankings share."""
    return len(set(np.asarray(rank_a[:k]).tolist()) & set(np.asarray(rank_b[:k]).tolist())) / k
