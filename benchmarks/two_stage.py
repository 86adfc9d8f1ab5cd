"""Two-stage AbU against exact AbU on mini-AbC: cost (forward-equivalents, wall time) and agreement, side by side.

    python benchmarks/two_stage.py --split val     # choose the screen and M (validation only)
    python benchmarks/two_stage.py --split test    # the table in docs/performance.md

Runs exact AbU (the comparison's AbU row and stage-1 cache, reused when benchmarks/mini_abc_comparison.py has
run) and each two-stage setting (screen x screen timesteps x M) into results/mini_abc/<split>/two_stage/, then
compares each with exact, query by query: Recall@10 and mAP deltas, top-10 / top-100 overlap, the screen's
Spearman correlation with exact influence over all candidates, and the screen's recall of exact AbU's top 100
(how many of them it sent to re-scoring). Cost per query: UNet forward-equivalents (counted by
compute_influence.py, backward = 2) and wall time here. A projection to AbC's sizes (100K LAION, T = 10, 100 x 10 x 16 unlearning, 20 queries a
model, M scaled with the candidate count) and to H100 time, from the forwards/s of the bf16 + compile row of
docs/performance.md, is printed beside it and labelled as such. Writes two_stage.md and two_stage.csv.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.runner import (BENCH, REPO, abu_flags, common_flags, derive_arrays, run, stage1, timed,
                               tuned_sizing, write_table)
from utils.evaluation import load_result, overlap
from utils.layout import ResultsLayout
from utils.metrics import query_metrics
from utils.tasks import load_tasks

SETTINGS = [(screen, t, m, 2) for screen, t, m in [
    ("coarse", 1, 0.05), ("coarse", 1, 0.1), ("coarse", 2, 0.05), ("first-order", 1, 0.05), ("first-order", 1, 0.1),
    ("first-order", 2, 0.1), ("caption", 1, 0.05), ("caption", 1, 0.1), ("coarse+caption", 1, 0.05)]] + [
    ("coarse", 1, 0.05, 1), ("coarse", 1, 0.1, 1)]  # (screen, screen timesteps, M as a fraction, flips screened)
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


def projected_abc(screen: str, t_screen: int, flips: int, rescored_fraction: float) -> float:
    """Forward-equivalents of one AbC query in this setting (the same formulas compute_influence.py counts), the
    re-scored candidates the same fraction of AbC's as measured here (a union re-scores between M and 2M)."""
    screen_cost = flips * ABC["candidates"] * t_screen * SCREEN_PASSES[screen]
    rescore = 2 * round(rescored_fraction * ABC["candidates"]) * ABC["time_samples"]
    return ABC["unlearning"] + 2 * ABC["time_samples"] + screen_cost + rescore


STAGE1_ABC = 2 * ABC["candidates"] * ABC["time_samples"] / ABC["queries_per_model"]  # stage 1's share of a query


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--bench", default=str(BENCH))
    p.add_argument("--settings", default=None, help="subset, screen:T':M[:flips], e.g. "
                                                    "'coarse:1:0.05,coarse:1:0.05:1,first-order:1:0.1'")
    args = p.parse_args()
    bench = Path(args.bench)
    task_json = bench / "tasks" / f"{args.split}.json"
    tasks = load_tasks(task_json)
    sizing = tuned_sizing()
    flags = common_flags(bench, sizing.laion_subset_size) + ["--device", "cpu"]
    root = REPO / "results" / "mini_abc" / args.split
    cache = root / "orig_loss"
    derive_arrays(bench, all_weights_fisher=False)
    ok1, _ = stage1(task_json, root, sizing, flags)
    exact_dir = root / "abu"
    base = ["compute_influence.py", "--task_json", task_json, "--loss_cache_dir", cache] + abu_flags(sizing) + flags
    ok2, exact_seconds = timed(exact_dir, "influence.pkl", lambda: ok1 and run(base + ["--result_dir", exact_dir]))
    if not (ok1 and ok2):
        sys.exit("exact AbU failed; see the error above")
    settings = SETTINGS if not args.settings else [
        (x[0], int(x[1]), float(x[2]), int(x[3]) if len(x) > 3 else 2)
        for x in (spec.split(":") for spec in args.settings.split(","))]
    exact = [load_result(ResultsLayout(exact_dir), t) for t in tasks]
    n_candidates = len(exact[0]["influence"]) - exact[0]["n_exemplar"]
    rows = [summary_row("exact", exact, exact, exact_seconds, len(tasks), None, n_candidates)]
    for screen, t_screen, fraction, flips in settings:
        name = f"{screen}, T'={t_screen}, M={fraction:.0%}" + (", one flip" if flips == 1 else "")
        out = root / "two_stage" / (f"{screen}_t{t_screen}_m{round(fraction * 1000)}" + ("_f1" if flips == 1 else ""))
        m = max(1, round(fraction * n_candidates))
        ok, seconds = timed(out, "influence.pkl", lambda: run(base + [
            "--result_dir", out, "--mode", "two-stage", "--screen", screen, "--screen_time_samples", str(t_screen),
            "--rescore_top", str(m), "--screen_flips", str(flips)]))
        if not ok:
            sys.exit(f"{name} failed; see the error above")
        two = [load_result(ResultsLayout(out), t) for t in tasks]
        rows.append(summary_row(name, exact, two, seconds, len(tasks), (screen, t_screen, flips), n_candidates))
    write(root / "two_stage", rows, args.split, len(tasks), n_candidates)


def summary_row(name, exact, two, seconds, n_queries, setting, n_candidates) -> dict:
    """One table row: cost per query here and projected to AbC, both with and without stage 1's share of a query
    (its loss pass over a model's candidates, shared by the model's queries: 2 here, 20 in AbC)."""
    agree = [agreement(e, t) for e, t in zip(exact, two)]
    cost = float(np.mean([sum(t["forward_equivalents"].values()) for t in two]))
    exact_cost = float(np.mean([sum(e["forward_equivalents"].values()) for e in exact]))
    stage1 = exact[0]["forward_equivalents"]["loss tracking"] * len({t["task"]["model_path"] for t in two}) / n_queries
    rescored = float(np.mean([t.get("rescored", n_candidates + t["n_exemplar"]) for t in two])) / n_candidates
    abc = projected_abc(*setting, rescored) if setting else ABC["unlearning"] + 2 * ABC["time_samples"] + \
        2 * ABC["candidates"] * ABC["time_samples"]
    abc_exact = ABC["unlearning"] + 2 * ABC["time_samples"] + 2 * ABC["candidates"] * ABC["time_samples"]
    row = {"setting": name, "forward_equivalents": round(cost), "x_fewer": exact_cost / cost,
           "x_fewer_with_stage1": (exact_cost + stage1) / (cost + stage1),
           "seconds_per_query": seconds / n_queries, "abc_forward_equivalents": round(abc),
           "abc_x_fewer": abc_exact / abc, "abc_x_fewer_with_stage1": (abc_exact + STAGE1_ABC) / (abc + STAGE1_ABC),
           "h100_minutes": abc / H100_FORWARDS_PER_S / 60}
    row.update({k: float(np.nanmean([a[k] for a in agree])) for k in agree[0]})
    return row


def write(out: Path, rows, split: str, n_queries: int, n_candidates: int) -> None:
    head = ("| setting | fwd-equiv / query | x fewer | x fewer, stage 1 counted | s / query (CPU) | mAP | delta mAP | "
            "delta R@10 | top-10 | top-100 | screen Spearman | screen recall of top 100 | AbC fwd-equiv (proj.) | "
            "AbC x fewer | AbC x fewer, stage 1 counted | H100 min / query (proj.) |")
    lines = [f"mini-AbC {split}: {n_queries} queries, {n_candidates} candidates each; every setting against exact AbU.",
             "", head, "|" + "---|" * 16]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['forward_equivalents']:,} | {r['x_fewer']:.1f} | "
                     f"{r['x_fewer_with_stage1']:.1f} | "
                     f"{r['seconds_per_query']:.1f} | {r['map']:.3f} | {r['d_map']:+.4f} | {r['d_recall10']:+.3f} | "
                     f"{r['top10']:.3f} | {r['top100']:.3f} | {r['screen_spearman']:.3f} | {r['screen_recall100']:.3f} | "
                     f"{r['abc_forward_equivalents']:,} | {r['abc_x_fewer']:.1f} | {r['abc_x_fewer_with_stage1']:.1f} | "
                     f"{r['h100_minutes']:.1f} |")
    lines += ["", "The AbC columns are a projection: the same counts at AbC's sizes (M as the same fraction of the "
              "candidates), and H100 minutes at the bf16 + compile forwards/s of docs/performance.md, backward = 2 "
              "forwards; not a measurement."]
    text = "\n".join(lines) + "\n"
    write_table(out, "two_stage", text, rows)
    print(text)


if __name__ == "__main__":
    main()
