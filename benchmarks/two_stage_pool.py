"""Two-stage against exact AbU as the candidate pool grows, measured (docs/performance.md, "At 20,000 candidates").

    python -m data.build_mini_abc --out data/mini_abc --stage pool          # once: the 28K-picture pool
    python -m benchmarks.two_stage_pool --split test --sizes 600,1444,20000  # hours on 2 CPU cores; resumable

Queries: every query of the first model of each of AbC's four test cases in the split (artchive and duotone
styles, unobserved and observed objects; 2 each on mini-AbC: 8 on test), chosen by their place in the task file,
not by any result. Candidates: the first N rows of the pool (data/mini_abc/pool: mini-AbC's 1,444 pretraining
pictures first, then every other icon), so each size holds the smaller ones. At each size, exact AbU (stage 1 +
stage 2) and each setting run through the CLIs exactly as benchmarks/two_stage.py runs them (the comparison's
sizing: T = 3, 25 unlearning steps of 4 x 16), one model's queries at a time, into
results/mini_abc/<split>_pool/n<N>/<model>/; every run is skipped once finished and resumes where it stopped. A
finished model leaves a record, benchmarks/results/two_stage_pool_<split>/n<N>/<model>.json (committed), and the
table is rebuilt from the records: a rerun, in this session or a later one without the run folders, starts past
every finished model. (Delete a record to measure its model again.)

Per size and setting: forwards per query (counted), wall seconds per query here, re-scored candidates / K, top-10
and top-100 overlap with exact, delta mAP, and the peak and late-mean anonymous memory of each CLI run
(benchmarks.runner.run). Then the re-scored count's growth with N fitted as a power law (least squares in log-log
over the measured sizes) and AbC's "x fewer than exact, stage 1 counted" re-derived at 100K candidates from that
law instead of assuming the count follows K. Writes benchmarks/results/two_stage_pool_<split>.md and .csv.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from benchmarks.runner import BENCH, REPO, derive_arrays, tuned_sizing, write_table
from benchmarks.two_stage_common import ABC, compare, parse_setting, setting_name, x_fewer_at_abc
from utils.data import LaionCandidates
from utils.io import save_json

CASES = ("test_artchive", "test_bamfg", "test_unobserved_imagenet", "test_observed_imagenet")
DEFAULT_SETTINGS = "coarse:1:0.05,coarse:1:0.5:1:100:2:on-demand"  # the previous recommendation, the current one


def first_model_tasks(task_json: Path) -> list:
    """The queries of the first model (in file order) of each AbC test case, grouped by model: [[task entry]]."""
    entries = json.loads(Path(task_json).read_text())
    first = {}
    for e in entries:
        first.setdefault(e["test_case"], e["model_path"])
    models = [first[case] for case in CASES if case in first]
    return [[e for e in entries if e["model_path"] == m] for m in models]


def power_law(n: np.ndarray, y: np.ndarray) -> tuple:
    """(a, b) of y = a * n**b, least squares in log-log; b = 0 when y does not vary."""
    b, log_a = np.polyfit(np.log(n), np.log(y), 1)
    return float(np.exp(log_a)), float(b)


def memory(folder: Path) -> dict:
    path = folder / "memory.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def measure_unit(tasks: list, out: Path, bench: Path, pool: Path, sizing, settings, device: str) -> dict:
    """One model's queries at one pool size: exact AbU and every setting through the CLIs into `out` (resumable),
    returned as a record {queries, stage1_seconds, stage1_rows, stage1 memory, rows (compare's, each with
    its CLI run's memory)}."""
    task_json = out / "tasks.json"
    if not task_json.is_file():
        save_json(task_json, tasks)
    rows, _, n_queries = compare(task_json, out, bench, pool, sizing, settings, device)
    stage1 = memory(out / "orig_loss")
    for r in rows:
        m = memory(Path(r.pop("result_dir")))
        r.update(peak_MiB=m.get("peak_anon_MiB", float("nan")), late_MiB=m.get("late_mean_anon_MiB", float("nan")))
    return {"queries": n_queries, "rows": rows,
            "stage1_seconds": json.loads((out / "orig_loss" / "timing.json").read_text())["seconds"],
            "stage1_rows": 2 * sizing.laion_subset_size, "stage1_peak_MiB": stage1.get("peak_anon_MiB", float("nan")),
            "stage1_late_MiB": stage1.get("late_mean_anon_MiB", float("nan"))}


AVERAGED = ("forward_equivalents", "exact_forward_equivalents", "stage1_per_query", "seconds_per_query", "top10",
            "top100", "d_map", "map", "d_recall10", "rescored_per_k")


def size_rows(records: list, n: int) -> list:
    """A pool size's table rows from its unit records (one per model, or one for all): per setting, each figure
    the mean over queries, memory the peak of peaks and the mean of late means, stage 1's rate its total rows over
    its total seconds, and "x fewer, stage 1 counted" recomputed from the averaged forwards."""
    queries = np.array([r["queries"] for r in records], dtype=float)
    stage1_seconds = sum(r["stage1_seconds"] for r in records)
    out = []
    for i, first in enumerate(records[0]["rows"]):
        rows = [r["rows"][i] for r in records]
        assert all(r["setting"] == first["setting"] for r in rows), "records of one size ran different settings"
        row = {"pool": n, "setting": first["setting"], "queries": int(queries.sum()), "models": sum(
            len(r["model_paths"]) for r in records), "keep_top": first.get("keep_top", 0), "on_demand": first["on_demand"]}
        row.update({k: float(np.average([r[k] for r in rows], weights=queries)) for k in AVERAGED if k in first})
        own = 0.0 if row["on_demand"] else row["stage1_per_query"]
        row["x_fewer_with_stage1"] = (row["exact_forward_equivalents"] + row["stage1_per_query"]) / (
            row["forward_equivalents"] + own)
        row.update(peak_MiB=max(r["peak_MiB"] for r in rows), late_MiB=round(float(np.mean([r["late_MiB"] for r in
                                                                                             rows]))),
                   stage1_seconds=stage1_seconds, stage1_rows_per_s=sum(len(r["model_paths"]) * r["stage1_rows"] for r in
                                                                        records) / stage1_seconds,
                   stage1_peak_MiB=max(r["stage1_peak_MiB"] for r in records),
                   stage1_late_MiB=round(float(np.mean([r["stage1_late_MiB"] for r in records]))))
        out.append(row)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--bench", default=str(BENCH))
    p.add_argument("--sizes", default="600,1444,20000", help="candidate pool sizes N (`all`: the whole pool)")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help="as benchmarks/two_stage.py --settings")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                   help="where the table goes, and the finished units' records (<out>/two_stage_pool_<split>/)")
    p.add_argument("--results_dir", default=str(REPO / "results" / "mini_abc"),
                   help="where the runs go (<results_dir>/<split>_pool/n<N>/<model>/)")
    p.add_argument("--device", default="cpu", help="where the CLIs run (cpu or cuda)")
    p.add_argument("--unlearn_steps", type=int, default=None,
                   help="override the comparison's 25 unlearning steps (a smoke run; not the measurement)")
    args = p.parse_args()
    bench, pool = Path(args.bench), Path(args.bench) / "pool"
    if not (pool / "laion_latents.npy").is_file():
        sys.exit(f"error: {pool} has no encoded candidate pool; build it with `python -m data.build_mini_abc "
                 f"--out {bench} --stage pool` (about 30 minutes on 2 cores)")
    if not (pool / "sd_fisher.pt").exists():  # a fresh clone derives mini-AbC's Fisher, which the pool links to
        derive_arrays(bench, all_weights_fisher=False)
        if not (pool / "sd_fisher.pt").is_symlink():  # a pool built before it linked a Fisher not yet derived
            os.symlink(Path("..") / "abc" / "sd_fisher.pt", pool / "sd_fisher.pt")
    total = LaionCandidates(pool, 1).total
    sizes = sorted({total if x == "all" else int(x) for x in args.sizes.split(",")})
    if sizes[-1] > total:
        sys.exit(f"error: --sizes {sizes[-1]} is more than the {total} pictures of {pool}; use at most {total} "
                 "(or `all`)")
    settings = [parse_setting(s) for s in args.settings.split(",")]
    root = Path(args.results_dir) / f"{args.split}_pool"
    units = first_model_tasks(bench / "tasks" / f"{args.split}.json")
    records_dir = Path(args.out) / f"two_stage_pool_{args.split}"
    names = [setting_name(*s) for s in settings]

    table = []
    for n in sizes:
        sizing = tuned_sizing()
        sizing.laion_subset_size = n
        sizing.unlearn_steps = args.unlearn_steps or sizing.unlearn_steps
        size_dir = records_dir / f"n{n}"
        records = [r for r in (json.loads(f.read_text()) for f in sorted(size_dir.glob("*.json")))
                   if [row["setting"] for row in r["rows"]] == ["exact"] + names]  # finished units at this size
        for tasks in units:  # one model a unit, its record kept beside the table: a later session starts past it
            if any(tasks[0]["model_path"] in r["model_paths"] for r in records):
                continue
            slug = tasks[0]["model_path"].strip("/").replace("/", "__")
            record = measure_unit(tasks, root / f"n{n}" / slug, bench, pool, sizing, settings, args.device)
            record.update(model_paths=[tasks[0]["model_path"]], pool=n)
            save_json(size_dir / f"{slug}.json", record)
            records.append(record)
            # after every unit: a run stopped later (or a GPU's time running out) keeps what it finished
            write(Path(args.out), table + size_rows(records, n), args.split, sizes, settings, args.device,
                  args.unlearn_steps, sum(map(len, units)))
        table += size_rows(records, n)
    write(Path(args.out), table, args.split, sizes, settings, args.device, args.unlearn_steps, sum(map(len, units)))


def write(out: Path, table, split: str, sizes, settings, device: str, unlearn_steps, n_queries: int) -> None:
    """The measured table (a size still running shows the queries it has so far), the fitted growth of what
    --keep_top re-scores over the finished sizes, and AbC's projection from it."""
    command = (f"python -m benchmarks.two_stage_pool --split {split} --sizes {','.join(map(str, sizes))} "
               f"--settings {','.join(settings_spec(s) for s in settings)}" + (f" --device {device}" if device != "cpu"
                                                                               else "")
               + (f" --unlearn_steps {unlearn_steps}" if unlearn_steps else ""))
    lines = [f"`{command}`", "",
             f"mini-AbC {split}, {n_queries} queries (the first model of each AbC test case), candidates the first N "
             f"rows of the pool; every setting against exact AbU at the same N. Measured on {device} "
             f"({os.cpu_count()} CPU cores), one model's queries at a time; memory is each CLI run's anonymous "
             "resident memory (peak; mean of its second half).", "",
             "| N | setting | queries | fwd-equiv / query | x fewer, stage 1 counted | s / query | fwd-equiv / s | "
             "re-scored / K | top-10 | top-100 | delta mAP | peak MiB | late mean MiB |", "|" + "---|" * 13]
    for r in table:
        rescored = f"{r['rescored_per_k']:.2f}" if r.get("keep_top") else "-"
        lines.append(f"| {r['pool']:,} | {r['setting']} | {r['queries']} | {r['forward_equivalents']:,.0f} | "
                     f"{r['x_fewer_with_stage1']:.1f} | {r['seconds_per_query']:.1f} | "
                     f"{r['forward_equivalents'] / r['seconds_per_query']:.0f} | {rescored} | {r['top10']:.3f} | "
                     f"{r['top100']:.3f} | {r['d_map']:+.4f} | {r['peak_MiB']} | {r['late_MiB']} |")
    partial = sorted({r["pool"] for r in table if r["queries"] < n_queries})
    if partial:
        lines += ["", "Still running: " + ", ".join(f"N = {x:,}" for x in partial) + f" (fewer than {n_queries} "
                  "queries so far; the same command continues it)."]
    lines += ["", "Stage 1 (the exact row's and M = 5%'s loss cache, one pass per model):", "",
              "| N | models | seconds | rows / s (models x candidates x 2 flips) | peak MiB | late mean MiB |",
              "|---|---|---|---|---|---|"]
    for r in (r for r in table if r["setting"] == "exact"):
        lines.append(f"| {r['pool']:,} | {r['models']} | {r['stage1_seconds']:.0f} | {r['stage1_rows_per_s']:.1f} | "
                     f"{r['stage1_peak_MiB']} | {r['stage1_late_MiB']} |")
    finished = [r for r in table if r["queries"] == n_queries]  # the fit reads finished sizes only
    keep = [s for s in settings if s[4]]
    for spec in keep:
        rows = [r for r in finished if r.get("keep_top") == spec[4][0] and r["setting"] == setting_name(*spec)]
        if len(rows) < 2:
            continue
        n = np.array([r["pool"] for r in rows], dtype=float)
        rescored = np.array([r["rescored_per_k"] * r["keep_top"] for r in rows])
        a, b = power_law(n, rescored)
        # the range: the steepest growth between two neighbouring sizes, as a law through those two points
        j = int(np.argmax(np.diff(np.log(rescored)) / np.diff(np.log(n))))
        a_hi, b_hi = power_law(n[j:j + 2], rescored[j:j + 2])
        setting = (spec[0], spec[1], spec[3], spec[5])
        at = {c: (min(a * c ** b, c), min(a_hi * c ** b_hi, c)) for c in (10_000, ABC["candidates"], 1_000_000)}
        lines += ["", f"**{rows[0]['setting']}**: re-scored candidates = {a:.3g} x N^{b:.3f} (least squares in log-log "
                  f"on N = {', '.join(f'{int(x):,}' for x in n)}; measured {', '.join(f'{x:.0f}' for x in rescored)}); "
                  f"its steepest stretch, N = {int(n[j]):,} to {int(n[j + 1]):,}, grows as N^{b_hi:.3f}. Projected "
                  "from each law at AbC's sizes (T = 10, 100 x 10 x 16 unlearning, 20 queries a model, "
                  "forward-equivalents against exact AbU with its stage 1's share):", "",
                  "| candidates | re-scored (fitted) | x fewer than exact AbU with its stage 1 | re-scored (steepest "
                  "stretch) | x fewer (steepest stretch) |", "|---|---|---|---|---|"]
        lines += [f"| {c:,} | {r:,.0f} ({r / spec[4][0]:.1f} K) | {x_fewer_at_abc(setting, r, c):.1f} | "
                  f"{r_hi:,.0f} ({r_hi / spec[4][0]:.1f} K) | {x_fewer_at_abc(setting, r_hi, c):.1f} |"
                  for c, (r, r_hi) in at.items()]
        lines += ["", f"Under the fitted law {ten_x_range(setting, a, b)}; under the steepest stretch's, "
                  f"{ten_x_range(setting, a_hi, b_hi)}. The fit extrapolates {ABC['candidates'] / n.max():.1f}x beyond "
                  "the largest pool measured to reach AbC's 100K."]
    text = "\n".join(lines) + "\n"
    write_table(out, f"two_stage_pool_{split}", text, table)
    print(text)


def ten_x_range(setting: tuple, a: float, b: float) -> str:
    """Where AbC's projected saving is 10x or more when a * N**b candidates are re-scored, as words: small pools fall
    short (the fixed unlearning dominates), and large ones do if what is re-scored grows fast enough."""
    grid = np.geomspace(1e3, 1e8, 500)
    ten = [c for c in grid if x_fewer_at_abc(setting, min(a * c ** b, c), int(c)) >= 10]
    if not ten:
        return "the saving reaches 10x at no pool size from 1,000 to 100M candidates"
    return (f"the saving is 10x or more from about {ten[0]:,.0f} candidates" +
            (f" up to about {ten[-1]:,.0f}" if ten[-1] < grid[-1] else " up to 100M (as far as computed)"))


def settings_spec(s) -> str:
    screen, t, m, flips, keep, on_demand = s
    return ":".join([screen, str(t), f"{m:g}", str(flips)] + ([str(keep[0]), f"{keep[1]:g}"] if keep else [])
                    + (["on-demand"] if on_demand else []))


if __name__ == "__main__":
    main()
