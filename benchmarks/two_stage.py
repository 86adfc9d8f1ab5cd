"""Two-stage AbU against exact AbU on mini-AbC: cost (forward-equivalents, wall time) and agreement, side by side.

    python -m benchmarks.two_stage --split val     # choose the screen and M (validation only)
    python -m benchmarks.two_stage --split test    # the table in docs/performance.md
    python -m benchmarks.two_stage --split val --settings coarse:1:0.5:1:100:2:on-demand --laion_subset_size 1444

A setting is screen:T':M[:flips[:K[:margin]]][:on-demand]: the screen, its timesteps, M (the candidates re-scored,
as a fraction; with K the cap), the flips screened, --keep_top K and --keep_margin, and --before_losses on-demand
(no stage 1: its share is then not added to the row's cost).

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
from pathlib import Path

from benchmarks.runner import BENCH, REPO, derive_arrays, tuned_sizing, write_table
from benchmarks.two_stage_common import H100_FORWARDS_PER_S, compare, parse_setting

SETTINGS = [(screen, t, m, 2, (), False) for screen, t, m in [
    ("coarse", 1, 0.05), ("coarse", 1, 0.1), ("coarse", 2, 0.05), ("first-order", 1, 0.05), ("first-order", 1, 0.1),
    ("first-order", 2, 0.1), ("caption", 1, 0.05), ("caption", 1, 0.1), ("coarse+caption", 1, 0.05)]] + [
    ("coarse", 1, 0.05, 1, (), False), ("coarse", 1, 0.1, 1, (), False)]
# (screen, screen timesteps, M as a fraction, flips screened, (--keep_top, --keep_margin) or (), no stage 1)
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--bench", default=str(BENCH))
    p.add_argument("--settings", default=None, help="subset, screen:T':M[:flips[:K[:margin]]], e.g. "
                                                    "'coarse:1:0.05,coarse:1:0.05:1,first-order:1:0.1'; with K, "
                                                    "--keep_top K (and --keep_margin), M the cap")
    p.add_argument("--laion_subset_size", type=int, default=None,
                   help="LAION candidates per query (default: the comparison's 600); another size runs into "
                        "results/mini_abc/<split>_laion<N>/")
    args = p.parse_args()
    bench = Path(args.bench)
    sizing = tuned_sizing()
    root = REPO / "results" / "mini_abc" / args.split
    if args.laion_subset_size and args.laion_subset_size != sizing.laion_subset_size:
        sizing.laion_subset_size = args.laion_subset_size
        root = root.with_name(f"{args.split}_laion{args.laion_subset_size}")
    derive_arrays(bench, all_weights_fisher=False)
    settings = SETTINGS if not args.settings else [parse_setting(spec) for spec in args.settings.split(",")]
    rows, n_candidates, n_queries = compare(bench / "tasks" / f"{args.split}.json", root, bench, bench / "abc",
                                            sizing, settings)
    write(root / "two_stage", rows, args.split, n_queries, n_candidates)


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
    keep = [r for r in rows if r.get("keep_top")]
    if keep:
        lines += ["", "With --keep_top K the number re-scored follows the query. Projected instead as the same multiple "
                  "of the same K at AbC (K = 100: the top 100 a user reads):", "",
                  "| setting | re-scored / K (here) | AbC re-scored (proj.) | AbC fwd-equiv (proj.) | AbC x fewer | "
                  "AbC x fewer, stage 1 counted | H100 min / query (proj.) |", "|" + "---|" * 7]
        lines += [f"| {r['setting']} | {r['rescored_per_k']:.2f} | {r['rescored_per_k'] * r['keep_top']:,.0f} | "
                  f"{r['abc_keep_forward_equivalents']:,} | {r['abc_keep_x_fewer']:.1f} | "
                  f"{r['abc_keep_x_fewer_with_stage1']:.1f} | "
                  f"{r['abc_keep_forward_equivalents'] / H100_FORWARDS_PER_S / 60:.1f} |" for r in keep]
    text = "\n".join(lines) + "\n"
    write_table(out, "two_stage", text, rows)
    print(text)


if __name__ == "__main__":
    main()
