"""Do the fast precisions give the same attributions as fp32? AbU on mini-AbC at each --precision.

    python -m benchmarks.precision_agreement --split val                     # fp32, bf16, fp16
    python -m benchmarks.precision_agreement --split test --precisions bf16

Runs stage 1 and stage 2 (the comparison's sizing and tuned settings) once per precision into
results/mini_abc/<split>/precision/<p>/ (fp32: the comparison's own AbU row and cache, reused when
benchmarks/mini_abc_comparison.py has run), then compares each with fp32 query by query: Spearman
correlation of the influence scores, overlap of the top-10 and top-100 candidates, and the change in
Recall@10 and mAP. A precision passes the gate when |delta mAP| <= 0.01 and the mean top-10 overlap
>= 0.9 (the condition for becoming a default). Writes agreement.md beside the runs; prints it.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.runner import BENCH, REPO, abu_flags, common_flags, run, stage1, timed, tuned_sizing
from utils.evaluation import load_result, overlap
from utils.io import atomic_write
from utils.layout import ResultsLayout
from utils.metrics import query_metrics
from utils.tasks import load_tasks

GATE_MAP, GATE_TOP10 = 0.01, 0.9


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(reference: Path, other: Path, tasks):
    rows = []
    for t in tasks:
        a, b = load_result(ResultsLayout(reference), t), load_result(ResultsLayout(other), t)
        ma, mb = query_metrics(a["rank"], a["n_exemplar"]), query_metrics(b["rank"], b["n_exemplar"])
        rows.append({"spearman": spearman(a["influence"], b["influence"]),
                     "top10": overlap(a["rank"], b["rank"], 10), "top100": overlap(a["rank"], b["rank"], 100),
                     "d_recall10": mb["recall@10"] - ma["recall@10"], "d_map": mb["ap"] - ma["ap"],
                     "map": mb["ap"]})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--precisions", default="bf16,fp16", help="compared with fp32 (always run)")
    p.add_argument("--bench", default=str(BENCH))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    bench = Path(args.bench)
    task_json = bench / "tasks" / f"{args.split}.json"
    tasks = load_tasks(task_json)
    out = REPO / "results" / "mini_abc" / args.split / "precision"
    sizing = tuned_sizing()
    flags = common_flags(bench, sizing.laion_subset_size) + ["--device", args.device]
    seconds, stage2_dirs = {}, {}
    for precision in ["fp32"] + [x for x in args.precisions.split(",") if x != "fp32"]:
        # fp32 is exactly the comparison's AbU row (same flags, same folders); the others get their own
        root = out.parent if precision == "fp32" else out / precision
        stage2_dirs[precision] = root / "abu" if precision == "fp32" else root
        cache = root / "orig_loss"
        ok1, s1 = stage1(task_json, root, sizing, ["--precision", precision] + flags)
        ok2, s2 = timed(stage2_dirs[precision], "influence.pkl", lambda: ok1 and run(
            ["compute_influence.py", "--task_json", task_json, "--result_dir", stage2_dirs[precision],
             "--loss_cache_dir", cache, "--precision", precision] + abu_flags(sizing) + flags))
        if not (ok1 and ok2):
            sys.exit(f"the {precision} run failed; see the error above")
        seconds[precision] = (s1, s2)
    lines = [f"AbU on mini-AbC {args.split} ({len(tasks)} queries), each precision against fp32, device {args.device}. "
             f"Gate: |delta mAP| <= {GATE_MAP} and top-10 overlap >= {GATE_TOP10}.", "",
             "| precision | stage 1 (s) | stage 2 (s) | mAP | Spearman | top-10 overlap | top-100 overlap | "
             "delta Recall@10 | delta mAP | gate |", "|" + "---|" * 10]
    for precision, (s1, s2) in seconds.items():
        c = compare(stage2_dirs["fp32"], stage2_dirs[precision], tasks)
        passed = abs(c["d_map"]) <= GATE_MAP and c["top10"] >= GATE_TOP10
        lines.append(f"| {precision} | {s1:.0f} | {s2:.0f} | {c['map']:.3f} | {c['spearman']:.4f} | {c['top10']:.3f} | "
                     f"{c['top100']:.3f} | {c['d_recall10']:+.3f} | {c['d_map']:+.4f} | "
                     f"{'reference' if precision == 'fp32' else 'pass' if passed else 'fail'} |")
    text = "\n".join(lines) + "\n"
    atomic_write(out / "agreement.md", lambda fh: fh.write(text), binary=False)
    print(text)


if __name__ == "__main__":
    main()
