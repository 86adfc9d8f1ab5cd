"""Wall, user and system seconds of stage 2 through the CLI under each heap policy (utils/host_memory.py), on two
model sizes, each run a fresh process as a user runs it.

    python -m benchmarks.heap_cli          # about 10 minutes on 2 cores; writes benchmarks/results/heap_cli_cpu.md

Fixtures: `attn16`, a random SD-shaped pipeline with cross-attention at 16 x 16 latents, 12 LAION-like candidates,
3 exemplars and 2 queries (benchmarks/sd_shaped.py --scale attn16), stage 2 at --precision fp32
--loss_batch_size 20 --loss_time_samples 10 --unlearn_steps 10 (the authors' 16 x 10 micro-batches a step);
and `mini-AbC`, run_demo.sh's query at its settings. Stage 1 runs once per fixture; every stage-2 run recomputes
(--overwrite) with ABU_HEAP set to the policy, and its times come from the child's own resource usage.
Policies: `heap+trim` (the scripts' default), `trim` (the default until 2026-11-30: glibc's own thresholds,
trimmed alike), `1MiB` (the one before, a fixed mmap threshold) and `glibc` (nothing set, never trimmed: the
allocator the authors' code runs under). The runs of a fixture alternate
between the policies, `--repeats` times, and the table gives each policy's median. A last run per fixture finds
every query finished (imports and the checks; it ends before loading the model), and the last column is the
system share of what a run spends beyond it. `mini-AbC, 4 queries` (the validation split) shows what grows with
the number of queries.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.runner import REPO, SIZING, TUNED, derive_arrays, python_command

POLICIES = ("heap+trim", "trim", "1MiB", "glibc")


def fixtures(work: Path) -> dict:
    """{name: (stage-1 flags, stage-2 flags)} with the paths filled in; builds attn16 when missing."""
    attn16 = work / "attn16"
    if not (attn16 / "tasks.json").is_file():
        run([str(REPO / "benchmarks" / "sd_shaped.py"), "--out", str(attn16), "--images", "12", "--scale", "attn16"])
    derive_arrays(REPO / "data" / "mini_abc", all_weights_fisher=False)
    mini = REPO / "data" / "mini_abc"
    common_attn16 = ["--sd_version", attn16 / "sd", "--dataroot", attn16 / "abc", "--task_json", attn16 / "tasks.json",
                     "--laion_subset_size", "12", "--precision", "fp32", "--device", "cpu"]
    common_mini = ["--sd_version", mini / "sd-mini", "--dataroot", mini / "abc", "--laion_subset_size",
                   SIZING["laion_subset_size"], "--precision", "fp32", "--device", "cpu"]
    out = {
        "attn16": (common_attn16 + ["--batch_size", "20", "--time_samples", "10"],
                   common_attn16 + ["--loss_batch_size", "20", "--loss_time_samples", "10", "--unlearn_steps", "10"]),
    }
    # mini-AbC with run_demo.sh's one query, and with the validation split's four (two models): what grows with them
    for name, tasks in (("mini-AbC", "demo.json"), ("mini-AbC, 4 queries", "val.json")):
        common = common_mini + ["--task_json", mini / "tasks" / tasks]
        out[name] = (common + ["--batch_size", SIZING["batch_size"], "--time_samples", SIZING["time_samples"]],
                     common + ["--loss_batch_size", SIZING["batch_size"], "--loss_time_samples", SIZING["time_samples"],
                               "--fisher_dataset_size", int(TUNED["fisher_dataset_size"]), "--unlearn_steps",
                               SIZING["unlearn_steps"], "--unlearn_grad_accum_steps", SIZING["unlearn_grad_accum_steps"]])
    return out


def run(cmd, env=None) -> dict:
    """Run a command to its end; {wall, user, sys} seconds of that child alone (os.wait4's resource usage)."""
    t0 = time.time()
    proc = subprocess.Popen(python_command(cmd[0]) + [str(c) for c in cmd[1:]], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{out.decode(errors='replace')[-3000:]}")
    return {"wall": time.time() - t0, "user": usage.ru_utime, "sys": usage.ru_stime}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="results/heap_cli", help="fixtures and results")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--policies", default=",".join(POLICIES), help="subset of " + ",".join(POLICIES))
    p.add_argument("--fixtures", default="attn16,mini-AbC", help="subset of attn16, mini-AbC, 'mini-AbC, 4 queries' "
                                                                 "(separated by ';' when a name holds a comma)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "heap_cli_cpu.md"))
    args = p.parse_args()
    work = (REPO / args.work).resolve()
    policies = args.policies.split(",")
    lines = ["| fixture | heap policy | wall s | user s | sys s | sys / user | sys / user beyond that rerun |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    chosen = args.fixtures.split(";") if ";" in args.fixtures else args.fixtures.split(",")
    for name, (stage1, stage2) in fixtures(work).items():
        if name not in chosen:
            continue
        results = work / name.replace("-", "_").replace(", ", "_").replace(" ", "_")
        run(["compute_training_loss.py", *stage1, "--result_dir", results])
        times = {policy: [] for policy in policies}
        for _ in range(args.repeats):
            for policy in policies:
                times[policy].append(run(["compute_influence.py", *stage2, "--result_dir", results, "--overwrite"],
                                         env={"ABU_HEAP": policy}))
                print(name, policy, {k: round(v, 1) for k, v in times[policy][-1].items()}, flush=True)
        # a run that finds every query finished: imports and the checks (it ends before loading the model)
        fixed = run(["compute_influence.py", *stage2, "--result_dir", results])
        lines.append(f"| {name} | a rerun with every query finished | {fixed['wall']:.1f} | {fixed['user']:.1f} | "
                     f"{fixed['sys']:.1f} | {fixed['sys'] / fixed['user']:.1%} | - |")
        for policy in policies:
            med = {k: statistics.median(t[k] for t in times[policy]) for k in ("wall", "user", "sys")}
            work_share = (med["sys"] - fixed["sys"]) / max(med["user"] - fixed["user"], 1e-9)
            lines.append(f"| {name} | {policy} | {med['wall']:.1f} | {med['user']:.1f} | {med['sys']:.1f} | "
                         f"{med['sys'] / med['user']:.1%} | {work_share:.1%} |")
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.out).write_text(f"`python -m benchmarks.heap_cli --repeats {args.repeats} --policies {args.policies} "
                              f"--fixtures '{args.fixtures}'`, "
                              f"this CPU ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}: median of the runs\n\n"
                              + table)


if __name__ == "__main__":
    main()
