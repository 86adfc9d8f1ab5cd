"""Two-stage AbU against exact AbU, the parts both two-stage benchmarks share (benchmarks/two_stage.py at mini-AbC's
sizes, benchmarks/two_stage_pool.py at growing pool sizes): run exact AbU and each setting through the CLIs, compare
them query by query, and project a query's cost to AbC's sizes.

A setting is (screen, T', M, flips, (K, margin) or (), on_demand): the screen, its timesteps, M (the candidates
re-scored, as a fraction; with K the cap), the flips screened, --keep_top K and --keep_margin, and --before_losses
on-demand (no stage 1). Forward-equivalents are the counts compute_influence.py records (backward = 2 forwards).
"""
import sys
from pathlib import Path

import numpy as np

from benchmarks.runner import abu_flags, run, stage1, timed
from utils.evaluation import load_result, overlap
from utils.layout import ResultsLayout
from utils.metrics import query_metrics
from utils.tasks import load_tasks

SCREEN_PASSES = {"coarse": 1, "first-order": 3 / 20, "caption": 0, "coarse+caption": 1}  # per query at AbC (20 a model)
ABC = {"candidates": 100_000, "time_samples": 10, "unlearning": 3 * 100 * 10 * 16, "queries_per_model": 20}
H100_FORWARDS_PER_S = 442.1  # bf16 + torch.compile, SD v1.4, docs/performance.md (measured before the flags)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else float("nan")


def agreement(exact: dict, two: dict) -> dict:
    """One query's two-stage result against its exact result."""
    n_ex = exact["n_exemplar"]
    me, mt = query_metrics(exact["rank"], n_ex), query_metrics(two["rank"], n_ex)
    top_m = set(np.flatnonzero(~np.isnan(two["influence"])).tolist())
    k = min(100, len(exact["rank"]))
    screen = two.get("screen", exact["influence"])  # exact's own row: the exact influence is its "screen"
    return {"d_recall10": mt["recall@10"] - me["recall@10"], "d_map": mt["ap"] - me["ap"], "map": mt["ap"],
            "top10": overlap(exact["rank"], two["rank"], 10), "top100": overlap(exact["rank"], two["rank"], 100),
            "screen_spearman": spearman(exact["influence"], screen),
            "screen_recall100": len(top_m & set(exact["rank"][:k].tolist())) / k if top_m else 1.0}


def projected_abc(screen: str, t_screen: int, flips: int, rescored_fraction: float, on_demand: bool = False,
                  candidates: int = ABC["candidates"]) -> float:
    """Forward-equivalents of one AbC query in this setting (the same formulas compute_influence.py counts), the
    re-scored candidates the same fraction of AbC's as measured here (a union re-scores between M and 2M). With
    `on_demand` (no stage 1), also the losses before: the coarse screen's timesteps of every candidate, shared by a
    model's 20 queries, and the other timesteps of each re-scored candidate, as if no other query had measured it.
    `candidates`: AbC's sizes but this many candidates."""
    screen_cost = flips * candidates * t_screen * SCREEN_PASSES[screen]
    rescored = round(rescored_fraction * candidates)
    rescore = 2 * rescored * ABC["time_samples"]
    before = 0.0
    if on_demand:
        coarse = screen in ("coarse", "coarse+caption")
        before = flips * candidates * t_screen / ABC["queries_per_model"] * coarse + rescored * (
            2 * ABC["time_samples"] - flips * t_screen * coarse)
    return ABC["unlearning"] + 2 * ABC["time_samples"] + screen_cost + rescore + before


STAGE1_ABC = 2 * ABC["candidates"] * ABC["time_samples"] / ABC["queries_per_model"]  # stage 1's share of a query


def x_fewer_at_abc(setting: tuple, rescored: float, candidates: int = ABC["candidates"]) -> float:
    """How many times fewer UNet forward-equivalents a query of `setting` (screen, T', flips, on_demand) costs than
    exact AbU with its stage 1's share, at AbC's sizes with `candidates` candidates, re-scoring `rescored` of them."""
    screen, t_screen, flips, on_demand = setting
    exact = ABC["unlearning"] + 2 * ABC["time_samples"] + 2 * candidates * ABC["time_samples"]
    stage1 = 2 * candidates * ABC["time_samples"] / ABC["queries_per_model"]
    cost = projected_abc(screen, t_screen, flips, min(rescored, candidates) / candidates, on_demand, candidates)
    return (exact + stage1) / (cost + (0 if on_demand else stage1))


def parse_setting(spec: str) -> tuple:
    """'screen:T':M[:flips[:K[:margin]]][:on-demand]' -> (screen, T', M, flips, (K, margin) or (), on_demand)."""
    x = spec.split(":")
    on_demand = x[-1] == "on-demand"
    x = x[:-1] if on_demand else x
    keep = (int(x[4]), float(x[5]) if len(x) > 5 else 2.0) if len(x) > 4 else ()
    return x[0], int(x[1]), float(x[2]), int(x[3]) if len(x) > 3 else 2, keep, on_demand


def compare(task_json: Path, root: Path, bench: Path, dataroot: Path, sizing, settings, device: str = "cpu") -> tuple:
    """Exact AbU (stage 1 + stage 2) and each two-stage setting on the tasks of `task_json` with candidates from
    `dataroot`, into `root` (each run skipped when finished, resumed when stopped), compared query by query.
    Returns (table rows, each with its `result_dir`; LAION candidates per query; queries). Exits when a run fails."""
    tasks = load_tasks(task_json)
    flags = ["--sd_version", str(bench / "sd-mini"), "--dataroot", str(dataroot), "--laion_subset_size",
             str(sizing.laion_subset_size), "--device", device]
    cache = root / "orig_loss"
    ok1, _ = stage1(task_json, root, sizing, flags)
    exact_dir = root / "abu"
    base = ["compute_influence.py", "--task_json", task_json, "--loss_cache_dir", cache] + abu_flags(sizing) + flags
    ok2, exact_seconds = timed(exact_dir, "influence.pkl",
                               lambda: ok1 and run(base + ["--result_dir", exact_dir], exact_dir / "memory.json"))
    if not (ok1 and ok2):
        sys.exit("exact AbU failed; see the error above")
    exact = [load_result(ResultsLayout(exact_dir), t) for t in tasks]
    n_candidates = len(exact[0]["influence"]) - exact[0]["n_exemplar"]
    rows = [dict(summary_row("exact", exact, exact, exact_seconds, len(tasks), None, n_candidates),
                 result_dir=str(exact_dir))]
    for screen, t_screen, fraction, flips, keep, on_demand in settings:
        name = setting_name(screen, t_screen, fraction, flips, keep, on_demand)
        out = root / "two_stage" / (f"{screen}_t{t_screen}_m{round(fraction * 1000)}" + ("_f1" if flips == 1 else "")
                                    + (f"_k{keep[0]}_z{keep[1]:g}" if keep else "") + ("_od" if on_demand else ""))
        m = max(1, round(fraction * n_candidates))
        extra = (["--keep_top", str(keep[0]), "--keep_margin", str(keep[1])] if keep else []) + (
            ["--before_losses", "on-demand"] if on_demand else [])
        ok, seconds = timed(out, "influence.pkl", lambda: run(base + [
            "--result_dir", out, "--mode", "two-stage", "--screen", screen, "--screen_time_samples", str(t_screen),
            "--rescore_top", str(m), "--screen_flips", str(flips)] + extra, out / "memory.json"))
        if not ok:
            sys.exit(f"{name} failed; see the error above")
        two = [load_result(ResultsLayout(out), t) for t in tasks]
        rows.append(dict(summary_row(name, exact, two, seconds, len(tasks), (screen, t_screen, flips), n_candidates,
                                     keep[0] if keep else 0, on_demand), result_dir=str(out)))
    return rows, n_candidates, len(tasks)


def setting_name(screen, t_screen, fraction, flips, keep, on_demand) -> str:
    return (f"{screen}, T'={t_screen}, M={fraction:.0%}" + (", one flip" if flips == 1 else "") +
            (f", keep top {keep[0]} (margin {keep[1]:g})" if keep else "") + (", no stage 1" if on_demand else ""))


def summary_row(name, exact, two, seconds, n_queries, setting, n_candidates, keep_top=0, on_demand=False) -> dict:
    """One table row: cost per query here and projected to AbC, both with and without stage 1's share of a query
    (its loss pass over a model's candidates, shared by the model's queries: 2 here, 20 in AbC; none `on_demand`,
    whose cost counts the losses before it measured). With `keep_top`, also the projection that re-scores the same
    multiple of K at AbC (the same K) instead of the same fraction."""
    agree = [agreement(e, t) for e, t in zip(exact, two)]
    cost = float(np.mean([sum(t["forward_equivalents"].values()) for t in two]))
    exact_cost = float(np.mean([sum(e["forward_equivalents"].values()) for e in exact]))
    stage1 = exact[0]["forward_equivalents"]["loss tracking"] * len({t["task"]["model_path"] for t in two}) / n_queries
    rescored = float(np.mean([t.get("rescored", n_candidates + t["n_exemplar"]) for t in two])) / n_candidates
    abc = projected_abc(*setting, rescored, on_demand) if setting else ABC["unlearning"] + 2 * ABC["time_samples"] + \
        2 * ABC["candidates"] * ABC["time_samples"]
    abc_exact = ABC["unlearning"] + 2 * ABC["time_samples"] + 2 * ABC["candidates"] * ABC["time_samples"]
    own_stage1, own_stage1_abc = (0, 0) if on_demand else (stage1, STAGE1_ABC)
    row = {"setting": name, "forward_equivalents": round(cost), "x_fewer": exact_cost / cost,
           "exact_forward_equivalents": exact_cost, "stage1_per_query": stage1, "on_demand": on_demand,
           "x_fewer_with_stage1": (exact_cost + stage1) / (cost + own_stage1),
           "seconds_per_query": seconds / n_queries, "abc_forward_equivalents": round(abc),
           "abc_x_fewer": abc_exact / abc,
           "abc_x_fewer_with_stage1": (abc_exact + STAGE1_ABC) / (abc + own_stage1_abc),
           "h100_minutes": abc / H100_FORWARDS_PER_S / 60}
    row.update({k: float(np.nanmean([a[k] for a in agree])) for k in agree[0]})
    if keep_top:
        multiple = rescored * n_candidates / keep_top
        abc_k = projected_abc(*setting, multiple * keep_top / ABC["candidates"], on_demand)
        row.update({"keep_top": keep_top, "rescored_per_k": multiple, "abc_keep_forward_equivalents": round(abc_k),
                    "abc_keep_x_fewer": abc_exact / abc_k,
                    "abc_keep_x_fewer_with_stage1": (abc_exact + STAGE1_ABC) / (abc_k + own_stage1_abc)})
    return row
