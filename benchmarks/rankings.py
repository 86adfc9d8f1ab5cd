"""The rankings of --ranking (utils/ranking.py) on mini-AbC: AbC's four test cases and the image-level ones, one split.

    python -m benchmarks.rankings --split val     # choose (validation only)
    python -m benchmarks.rankings --split test    # report: benchmarks/results/mini_abc/rankings_test.{md,csv}

Runs (or reuses) the comparison's unlearning rows that the rankings are made of: AbU, its noise-image control, and
the same two under the stopping rule, on both kinds of test case (benchmarks/mini_abc_comparison.py --cases abc and
--cases image). Each ranking is then composed per query from those runs with utils.ranking.compose, exactly as
compute_influence.py --ranking composes it from the same measurements (tests/test_ranking.py checks the CLI against
separate runs bit for bit). Each ranking is also applied to the noise-image control's own runs (the image replaced
by noise): what the variant retrieves from the prompt alone, so its margin over that is the image's.

Cost: UNet forward-equivalents per query, from the runs' records; control-corrected adds one noise-control per
distinct prompt of a model (a pair of one prompt shares it); model-contrast and combined add nothing.
"""
import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.runner import REPO, labelled_task_file, python_command, write_table
from utils.evaluation import load_result, score_queries
from utils.metrics import mean_and_stderr, rank_candidates
from utils.ranking import RANKINGS, compose, peers_of, query_parts
from utils.layout import ResultsLayout
from utils.tasks import load_tasks

BENCH = REPO / "data" / "mini_abc"
BASES = {"AbU": ("abu", "abu_noise_image_control"),
         "AbU, stop rule": ("abu_stop_rule", "abu_stop_rule_noise_image_control")}
RUNS = ["AbU", "AbU, noise-image control", "AbU, stop rule", "AbU, stop rule, noise-image control"]
VARIANTS = [("influence (the paper)", "influence", "model"), ("control-corrected", "control-corrected", "model"),
            ("model-contrast, model's queries", "model-contrast", "model"),
            ("model-contrast, prompt's samples", "model-contrast", "prompt"),
            ("combined, model's queries", "combined", "model"), ("combined, prompt's samples", "combined", "prompt")]
COLUMNS = [("style mAP", "abc", "style", "ap"), ("object mAP", "abc", "object", "ap"), ("AbC mAP", "abc", None, "ap"),
           ("AUC, customization style", "image", "looks_style", "auc"),
           ("AUC, customization object", "image", "looks_object", "auc"),
           ("AUC, pretraining style", "image", "pretraining_style", "auc"),
           ("AUC, pretraining (that style)", "image", "pretraining_style", "auc (that style)")]


def ensure_runs(split: str) -> None:
    """The four unlearning rows on both kinds of test case (finished queries are reused)."""
    for cases in ("abc", "image"):
        cmd = python_command("benchmarks/mini_abc_comparison.py") + ["--split", split, "--cases", cases,
                                                                     "--methods", *RUNS]
        if subprocess.run(cmd, cwd=REPO).returncode:
            sys.exit(f"{' '.join(cmd)} failed")


def ranked(root: Path, tasks, run: str, control: str, ranking: str, contrast_with: str):
    """(task, {"n_exemplar", "rank"}) per query: `ranking` composed from the runs `run` (the query) and `control`
    (its noise-image control) as compute_influence.py composes it; and the query's cost in forward-equivalents."""
    layout = lambda name: ResultsLayout(root / name, root / "orig_loss")
    results = {t.synth_image_path: load_result(layout(run), t) for t in tasks}
    influences = {p: r["influence"] for p, r in results.items()}
    controls = {t.synth_image_path: load_result(layout(control), t) for t in tasks} \
        if ranking == "control-corrected" else {}
    peers = peers_of(tasks, contrast_with) if RANKINGS[ranking].needs_peers else {}
    found, costs = [], []
    for t in tasks:
        p, n = t.synth_image_path, results[t.synth_image_path]["n_exemplar"]
        parts = query_parts(influences[p], controls[p]["influence"] if controls else None,
                            {o.synth_image_path: influences[o.synth_image_path] for o in peers[p]} if peers else None)
        cost = sum(results[p]["forward_equivalents"].values())
        if controls:  # one control per distinct prompt of a model, shared by its queries
            sharing = sum(o.model_path == t.model_path and o.prompt == t.prompt for o in tasks)
            cost += sum(controls[p]["forward_equivalents"].values()) / sharing
        found.append((t, {"n_exemplar": n, "rank": rank_candidates(compose(parts, ranking, n), n)}))
        costs.append(cost)
    return found, float(np.mean(costs))


def cell(rows, column) -> tuple:
    _, kind, group, metric = column
    values = [r[metric] for r in rows if group is None or r["family"] == group or r["test_case"] == f"test_{group}"]
    values = [v for v in values if not np.isnan(v)]
    return mean_and_stderr(values) if values else (float("nan"), float("nan"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--no_runs", action="store_true", help="only compose from runs already finished")
    args = p.parse_args()
    if not args.no_runs:
        ensure_runs(args.split)
    roots = {"abc": REPO / "results" / "mini_abc" / args.split, "image": REPO / "results" / "mini_abc" /
             f"image_{args.split}"}
    # the image-level cases' labelled pairs, each the other's only peer of its prompt (what this table was made with;
    # benchmarks/counterfactual.py composes the same rankings with the prompt's unselected samples as peers)
    task_files = {"abc": BENCH / "tasks" / f"{args.split}.json",
                  "image": labelled_task_file(BENCH / "tasks" / f"image_{args.split}.json", BENCH / "abc", roots["image"])}
    tasks = {kind: load_tasks(path) for kind, path in task_files.items()}
    table, per_query = [], {}
    for base, (run, control) in BASES.items():
        for source, (query_run, control_run) in ((base, (run, control)),
                                                 (f"{base}, noise-image control", (control, control))):
            for name, ranking, contrast_with in VARIANTS:
                row = {"method": f"{source}: {name}"}
                for kind in ("abc", "image"):
                    found, cost = ranked(roots[kind], tasks[kind], query_run, control_run, ranking, contrast_with)
                    rows = score_queries(found, dataroot=BENCH / "abc")
                    for column in COLUMNS:
                        if column[1] == kind:
                            row[column[0]], row[column[0] + " se"] = cell(rows, column)
                    row[f"cost ({kind})"] = cost
                    per_query[(source, name, kind)] = rows
                table.append(row)
    md = markdown(table, args.split) + margins(per_query)
    out = REPO / "benchmarks" / "results" / "mini_abc"
    write_table(out, f"rankings_{args.split}", md, table)
    print(md)


def margins(per_query) -> str:
    """Each ranking of each base minus the same ranking on the base's noise-image control, AUC paired by query."""
    image_columns = [c for c in COLUMNS if c[1] == "image" and c[3] == "auc"]
    lines = ["", "Each ranking minus the same ranking of its noise-image control (the image replaced by noise), AUC "
             "paired by query (mean ± standard error of the difference):", "",
             "| ranking | " + " | ".join(c[0] for c in image_columns) + " |", "|---|" + "---|" * len(image_columns)]
    for base in BASES:
        for name, _, _ in VARIANTS:
            own, noise = per_query[(base, name, "image")], per_query[(f"{base}, noise-image control", name, "image")]
            cells = []
            for column in image_columns:
                pick = lambda rows: [r["auc"] for r in rows if r["test_case"] == f"test_{column[2]}"]
                m, se = mean_and_stderr(np.subtract(pick(own), pick(noise)))
                cells.append(f"{m:+.3f} ± {se:.3f}")
            lines.append(f"| {base}: {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(table, split: str) -> str:
    head = [c[0] for c in COLUMNS]
    lines = [f"Rankings on mini-AbC's {split} split (mean ± standard error over queries; AbC: 'AbC mAP' over its four "
             "test cases; AUC 0.5 = the ranking ignores the image). Cost: UNet forward-equivalents per query "
             "(AbC / image-level test cases).", "",
             "| ranking | " + " | ".join(head) + " | cost |", "|---|" + "---|" * (len(head) + 1)]
    for r in table:
        cells = ["–" if np.isnan(r[h]) else f"{r[h]:.3f} ± {r[h + ' se']:.3f}" for h in head]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r['cost (abc)']:,.0f} / {r['cost (image)']:,.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
