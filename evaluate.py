"""Score the rankings of a task file with the AbC metrics: Recall@K and average precision.

    python evaluate.py --task_json tasks/demo_task.json

Reads <result_dir>/influence/<query>/influence.pkl for every query of --task_json (ranking recomputed from
the influence, ties against the exemplars) and writes, under --out_dir (default
<result_dir>/eval/<task file name>): per_query.csv, summary.csv and summary.md with the mean and standard
error per test case, per family (object: *_imagenet; style: artchive, bamfg; any other test case is its
own family) and overall. Queries with image-level ground truth (mini-AbC's test_looks_* and
test_pretraining_style, docs/mini_abc.md) also get AUC (a matching candidate above a non-matching one) and
image mAP, read from --dataroot's json files. The scorer is utils/evaluation.py. Beside them, index.html (utils/report.py): each query
with its top --top_k candidates, sortable by AP; open the file in a browser (it needs --dataroot's images).
"""
import argparse
from pathlib import Path

from utils.cli import run
from utils.evaluation import load_results, metric_columns, score_queries, summarize, to_csv, to_markdown
from utils.errors import InputError
from utils.io import atomic_write
from utils.layout import ResultsLayout
from utils.report import PAGE_NAME, write_report
from utils.tasks import load_tasks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_json", required=True, help="the task file whose queries were attributed")
    p.add_argument("--result_dir", default="results", help="folder holding influence/")
    p.add_argument("--out_dir", default=None, help="where to write the tables (default: <result_dir>/eval/<task name>)")
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 100], help="K values of Recall@K")
    p.add_argument("--dataroot", default="data/abc", help="AbC data folder (layout in README); the page's images")
    p.add_argument("--top_k", type=int, default=10, help="candidates shown per query in index.html")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error(f"--top_k must be at least 1, got {args.top_k}")
    return args


def main(argv=None):
    args = parse_args(argv)
    tasks = load_tasks(args.task_json)
    layout = ResultsLayout(args.result_dir)
    found, missing = load_results(layout, tasks)
    if not found:
        raise InputError(f"none of the {len(tasks)} queries of {args.task_json} has results under "
                         f"{args.result_dir}/influence; run compute_influence.py first")
    if missing:
        print(f"warning: {len(missing)} of {len(tasks)} queries have no results yet (e.g. "
              f"{missing[0].synth_image_path}); scoring the {len(found)} that do")
    has_data = Path(args.dataroot).is_dir()
    rows = score_queries(found, args.ks, dataroot=args.dataroot if has_data else None)
    metric_names = metric_columns(rows, args.ks)
    summary = summarize(rows, metric_names)
    out_dir = Path(args.out_dir or layout.eval_dir(args.task_json))
    per_query_columns = ["query", "test_case", "family", "n_exemplar"] + metric_names
    atomic_write(out_dir / "per_query.csv", lambda f: f.write(to_csv(rows, per_query_columns)), binary=False)
    summary_columns = ["group", "n"] + [c for m in metric_names for c in (m, f"{m}_se")]
    atomic_write(out_dir / "summary.csv", lambda f: f.write(to_csv(summary, summary_columns)), binary=False)
    table = to_markdown(summary, metric_names)
    atomic_write(out_dir / "summary.md", lambda f: f.write(table), binary=False)
    print(table)
    print(f"tables written to {out_dir}/ (per_query.csv, summary.csv, summary.md)")
    if not has_data:
        print(f"warning: dataroot {args.dataroot} not found: tables written without image-level metrics, {PAGE_NAME} "
              f"skipped (pass --dataroot)")
        return
    page = write_report(out_dir / PAGE_NAME, found, rows, summary, metric_names, args.dataroot, args.top_k,
                        Path(args.task_json).stem, len(tasks))
    print(f"page written to {page} (open it in a browser)")


if __name__ == "__main__":
    run(main)
