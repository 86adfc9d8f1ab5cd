"""Time the CLIs themselves (both stages, exact and two-stage, at each precision) on an SD-shaped benchmark.

    python -m benchmarks.sd_shaped --out /tmp/sd --images 200 && python -m benchmarks.cli_timing --bench /tmp/sd

Every run is a fresh process of compute_training_loss.py or compute_influence.py, as a user runs them. A run
that finds every output finished measures the fixed cost (imports, loading the model, checks), which is
subtracted: stage 1's rate is its forwards (rows x T) per second of the rest; stage 2's unlearning seconds per
step are what remains of a query after its loss tracking (at stage 1's rate of the same setting). The per-query
figures for AbC (100K candidates, T = 10, 100 unlearning steps) are projections from these rates and say so.
Each run also records its loss batches' timestamps (utils/batch_clock.py), and the table gives the rate after the
first --warmup batches, measured inside the run: a steady-state rate that needs no run long enough to repay
--compile's compilation. Writes cli_timing.md beside the runs.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.runner import python_command
from utils.batch_clock import ENV, steady_rate

REPO = Path(__file__).resolve().parent.parent
ABC_ROWS, ABC_T, ABC_STEPS = 200_000, 10, 100
SETTINGS = {"fp32": ["--precision", "fp32"], "bf16": ["--precision", "bf16"],
            "bf16 + compile": ["--precision", "bf16", "--compile"]}


def timed_run(script: str, args, batch_times: Path = None) -> float:
    """Wall seconds of one fresh process; with `batch_times`, its loss batches' timestamps go there (emptied
    first; utils/batch_clock.py)."""
    env = dict(os.environ)
    if batch_times is not None:
        batch_times.parent.mkdir(parents=True, exist_ok=True)
        batch_times.unlink(missing_ok=True)
        env[ENV] = str(batch_times)
    t0 = time.time()
    proc = subprocess.run(python_command(script) + [str(a) for a in args], cwd=REPO,
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{script} {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0


def steady(batch_times: Path, warmup: int) -> str:
    """The steady-state cell: forwards/s after the warm-up batches, read inside the run (utils/batch_clock.py)."""
    rate, batches = steady_rate(batch_times, warmup)
    return f"{rate:.1f} forwards/s over {batches} batches" if batches else "too few batches"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, help="made by benchmarks/sd_shaped.py")
    p.add_argument("--out", default=None, help="default <bench>/timing (emptied first)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--unlearn_steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5, help="loss batches left out of the steady-state rate")
    p.add_argument("--rescore_top", type=int, default=20, help="two-stage runs: candidates re-scored per query (the "
                                                                   "recommended setting: the K of --keep_top)")
    p.add_argument("--runs", default="1:fp32,1:bf16,2:bf16:exact,2:bf16:coarse,2:bf16:first-order,1:bf16 + compile",
                   help="in order: 1:<setting> times stage 1, 2:<setting>:<exact|coarse|first-order|recommended> "
                        "stage 2 (after stage 1 of that setting; recommended: --before_losses on-demand "
                        "--screen_flips 1 --keep_top, which reads no stage 1)")
    args = p.parse_args()
    bench, out = Path(args.bench), Path(args.out or Path(args.bench) / "timing")
    shutil.rmtree(out, ignore_errors=True)
    common = ["--sd_version", bench / "sd", "--dataroot", bench / "abc", "--task_json", bench / "tasks.json",
              "--laion_subset_size", args.images, "--device", args.device]
    stage1 = common + ["--batch_size", 200, "--time_samples", 10]
    stage2 = common + ["--loss_batch_size", 200, "--loss_time_samples", 10, "--unlearn_steps", args.unlearn_steps]
    forwards = 2 * (args.images + 3) * 10  # every row (3 exemplars and the images, each flipped) at T = 10
    table = Table(out / "cli_timing.md")
    rates, steps, fixed = {}, {}, None
    for run in args.runs.split(","):
        stage, name, *mode = run.split(":")
        result = out / slug(name)
        times = out / f"{slug(run)}.batches"
        if stage == "1":
            wall = timed_run("compute_training_loss.py", stage1 + SETTINGS[name] + ["--result_dir", result], times)
            if fixed is None:  # a rerun that finds every cache finished: imports, loading the model, the checks
                fixed = timed_run("compute_training_loss.py", stage1 + SETTINGS[name] + ["--result_dir", result])
                table.add(f"| fixed cost of a run (rerun, all done) | {fixed:.1f} | - | - | - | - |")
            rates[name] = forwards / max(wall - fixed, 1e-9)
            table.add(f"| stage 1, {name} | {wall:.1f} | {forwards:,} forwards | {rates[name]:.1f} forwards/s | "
                      f"{steady(times, args.warmup)} | {ABC_ROWS * ABC_T / rates[name] / 3600:.2f} h of loss tracking |")
            continue
        mode = mode[0]
        if mode == "recommended":  # docs/performance.md: no stage 1, one flip screened, keep the top K, cap 4 K
            flags = ["--mode", "two-stage", "--before_losses", "on-demand", "--screen_flips", 1, "--keep_top",
                     args.rescore_top, "--rescore_top", 4 * args.rescore_top]
        else:
            flags = ["--mode", "exact"] if mode == "exact" else ["--mode", "two-stage", "--screen", mode,
                                                                 "--rescore_top", args.rescore_top]
        wall = timed_run("compute_influence.py", stage2 + SETTINGS[name] + flags + [
            "--result_dir", result / slug(mode), "--loss_cache_dir", result / "orig_loss"], times)
        per_query = (wall - fixed) / 2
        if mode == "exact":  # what is left of a query after its loss tracking is its unlearning
            steps[name] = max(per_query - forwards / rates[name], 0) / args.unlearn_steps
            table.add(f"| stage 2, {name}, exact | {wall:.1f} | {per_query:.1f} s a query | "
                      f"{steps[name]:.2f} s / unlearning step | {steady(times, args.warmup)} | "
                      f"{ABC_STEPS * steps[name] / 3600:.2f} h of unlearning |")
        else:  # the screen and the re-scoring, beyond the same unlearning
            extra = max(per_query - args.unlearn_steps * steps.get(name, 0.0), 0)
            what = f"keep top {args.rescore_top}, no stage 1" if mode == "recommended" else f"top {args.rescore_top}"
            table.add(f"| stage 2, {name}, two-stage {mode} ({what}) | {wall:.1f} | "
                      f"{per_query:.1f} s a query | {extra:.1f} s screen + re-scoring"
                      f"{' + losses before' if mode == 'recommended' else ''} | {steady(times, args.warmup)} | - |")
    print(table.text())


def slug(name: str) -> str:
    return name.replace(" + ", "_").replace(" ", "_")


class Table:
    """The markdown table, rewritten after every row so that a run cut short keeps what it measured."""

    def __init__(self, path: Path):
        self.path, self.rows = path, []

    def add(self, row: str) -> None:
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text())
        print(row, flush=True)

    def text(self) -> str:
        return ("| run | wall s | work | rate | steady state, inside the run (after the warm-up batches) | per AbC query "
                "(projection) |\n|---|---|---|---|---|---|\n"
                + "\n".join(self.rows) + "\n")


if __name__ == "__main__":
    main()
