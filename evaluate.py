"""Score the rankings of a task file with the AbC metrics: Recall@K and average precision.

Reads results/influence/<query>/influence.pkl for every query of --task_json, and writes, under
--out_dir (default results/eval/<task file name>): per_query.csv, summary.csv and summary.md with the
mean and standard error per test case, per family (object: *_imagenet, style: artchive and bamfg) and overall.
"""
import argparse
import csv
import io
import pickle
from pathlib import Path

from utils.cli import run
from utils.io import InputError, atomic_write
from utils.metrics import mean_and_stderr, query_metrics
from utils.tasks import TEST_CASES, load_tasks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task_json", required=True, help="the task file whose queries were attributed")
    p.add_argument("--result_dir", default="results", help="folder holding influence/")
    p.add_argument("--out_dir", default=None, help="where to write the tables (default: <result_dir>/eval/<task name>)")
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 100], help="K values of Recall@K")
    return p.parse_args(argv)


def load_query_results(result_dir, tasks):
    """(task, result dict) for each query with a finished influence.pkl, and the tasks without one."""
    found, missing = [], []
    for t in tasks:
        path = Path(result_dir) / "influence" / t.query_key / "influence.pkl"
        if not path.is_file():
            missing.append(t)
            continue
        with open(path, "rb") as f:
            result = pickle.load(f)
        if "n_exemplar" not in result:
            raise InputError(f"{path} has no 'n_exemplar' (written by another tool?); rerun compute_influence.py")
        found.append((t, result))
    return found, missing


def summarize(rows, metric_names):
    """Rows of (group, n, mean and stderr per metric) for each test case, each family and all queries."""
    groups = [(tc, [r for r in rows if r["test_case"] == tc]) for tc in TEST_CASES]
    groups += [(f"family: {fam}", [r for r in rows if r["family"] == fam]) for fam in ("object", "style")]
    groups.append(("all", rows))
    out = []
    for name, members in groups:
        if not members:
            continue
        entry = {"group": name, "n": len(members)}
        for m in metric_names:
            entry[m], entry[f"{m}_se"] = mean_and_stderr([r[m] for r in members])
        out.append(entry)
    return out


def to_csv(rows, columns) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(summary, metric_names) -> str:
    header = "| group | n | " + " | ".join(metric_names) + " |"
    lines = [header, "|" + "---|" * (2 + len(metric_names))]
    for s in summary:
        cells = [f"{s[m]:.3f} ± {s[m + '_se']:.3f}" for m in metric_names]
        lines.append(f"| {s['group']} | {s['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    tasks = load_tasks(args.task_json)
    found, missing = load_query_results(args.result_dir, tasks)
    if not found:
        raise InputError(f"none of the {len(tasks)} queries of {args.task_json} has results under "
                         f"{args.result_dir}/influence; run compute_influence.py first")
    if missing:
        print(f"warning: {len(missing)} of {len(tasks)} queries have no results yet (e.g. "
              f"{missing[0].synth_image_path}); scoring the {len(found)} that do")
    metric_names = [f"recall@{k}" for k in args.ks] + ["ap"]
    rows = []
    for task, result in found:
        row = {"query": task.synth_image_path, "test_case": task.test_case, "family": task.family,
               "n_exemplar": result["n_exemplar"]}
        row.update(query_metrics(result["rank"], result["n_exemplar"], args.ks))
        rows.append(row)
    summary = summarize(rows, metric_names)
    out_dir = Path(args.out_dir or Path(args.result_dir) / "eval" / Path(args.task_json).stem)
    per_query_columns = ["query", "test_case", "family", "n_exemplar"] + metric_names
    atomic_write(out_dir / "per_query.csv", lambda f: f.write(to_csv(rows, per_query_columns)), binary=False)
    summary_columns = ["group", "n"] + [c for m in metric_names for c in (m, f"{m}_se")]
    atomic_write(out_dir / "summary.csv", lambda f: f.write(to_csv(summary, summary_columns)), binary=False)
    table = to_markdown(summary, metric_names).replace("| ap |", "| mAP |")
    atomic_write(out_dir / "summary.md", lambda f: f.write(table), binary=False)
    print(table)
    print(f"tables written to {out_dir}/ (per_query.csv, summary.csv, summary.md)")


if __name__ == "__main__":
    run(main)
