"""A digest of every output the pipeline writes, to check that a change of the code leaves them byte for byte.

    python -m benchmarks.output_digest --out results/digest/after.json
    python -m benchmarks.output_digest --compare results/digest/before.json results/digest/after.json

Runs, from the repository root and with relative paths (so two checkouts write the same recorded paths):
on the tiny benchmark (data/tiny_abc, built when missing) stage 1; stage 2 exact, with the noise-image control
and the rise stopping rule, two-stage with each screen; the four baselines; evaluate.py. On mini-AbC, the demo
query (run_demo.sh's settings). Then writes {relative path: sha256} of every file under results/digest/runs.
About 4 minutes on 2 CPU cores. `--compare` names every file whose bytes differ, and exits 1 when any do.
"""
import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.runner import REPO, python_command
RUNS = Path("results/digest/runs")
TINY = Path("data/tiny_abc")
MINI = Path("data/mini_abc")
SKIP = {"timing.json"}  # wall time, not an output of the method


def sh(*cmd) -> None:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run(python_command(cmd[0]) + [str(c) for c in cmd[1:]], cwd=REPO, check=True)


def tiny_runs() -> None:
    if not (REPO / TINY / "abc" / "sd_fisher.pt").is_file():
        sh("data/build_tiny_abc.py", "--out", TINY)
    common = ["--sd_version", TINY / "sd-tiny", "--dataroot", TINY / "abc", "--task_json", TINY / "tasks.json",
              "--laion_subset_size", "12"]
    cache = RUNS / "tiny" / "orig_loss"
    sh("compute_training_loss.py", *common, "--result_dir", RUNS / "tiny", "--batch_size", "20", "--time_samples", "5")
    stage2 = ["compute_influence.py", *common, "--loss_batch_size", "20", "--loss_time_samples", "5",
              "--fisher_dataset_size", "1000", "--unlearn_steps", "6", "--unlearn_grad_accum_steps", "2",
              "--unlearn_batch_size", "4", "--loss_cache_dir", cache]
    variants = {"exact": [], "noise_stop": ["--noise_image", "--stop_rule", "rise", "--stop_target", "1.01",
                                            "--stop_every", "2"],
                "collateral": ["--stop_rule", "collateral", "--stop_target", "0.5", "--stop_every", "3",
                               "--stop_reference", "4"],
                "two_stage_coarse": ["--mode", "two-stage", "--rescore_top", "5"],
                "two_stage_first_order": ["--mode", "two-stage", "--screen", "first-order", "--rescore_top", "5"],
                "no_fisher_no_token": ["--preconditioner", "none", "--drop_concept_token", "--unlearn_lr", "0.01"]}
    for name, flags in variants.items():
        sh(*stage2, "--result_dir", RUNS / "tiny" / name, *flags)
        sh("evaluate.py", "--task_json", TINY / "tasks.json", "--result_dir", RUNS / "tiny" / name)
    for method in ("random", "pixel", "vae", "gradient"):
        sh("compute_baselines.py", "--method", method, *common, "--result_dir", RUNS / "tiny" / method,
           "--loss_cache_dir", cache)


def mini_runs() -> None:
    sh("data/build_mini_abc.py", "--out", MINI, "--stage", "derive", "--no_all_weights_fisher")
    tasks = MINI / "tasks" / "demo.json"
    common = ["--sd_version", MINI / "sd-mini", "--dataroot", MINI / "abc", "--task_json", tasks,
              "--laion_subset_size", "600", "--result_dir", RUNS / "mini"]
    sh("compute_training_loss.py", *common, "--batch_size", "240", "--time_samples", "3")
    sh("compute_influence.py", *common, "--loss_batch_size", "240", "--loss_time_samples", "3",
       "--fisher_dataset_size", "100000", "--unlearn_steps", "25", "--unlearn_grad_accum_steps", "4")
    sh("evaluate.py", "--task_json", tasks, "--result_dir", RUNS / "mini")


def digest() -> dict:
    root = REPO / RUNS
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in SKIP}


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    only = sorted(a.keys() ^ b.keys())
    for k in differ:
        print(f"differs: {k}")
    for k in only:
        print(f"only in {'before' if k in a else 'after'}: {k}")
    print(f"{len(a.keys() & b.keys()) - len(differ)} of {len(a.keys() | b.keys())} files byte-identical")
    return 1 if differ or only else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="where the digest JSON is written")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--skip_mini", action="store_true", help="the tiny benchmark only")
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    shutil.rmtree(REPO / RUNS, ignore_errors=True)
    tiny_runs()
    if not args.skip_mini:
        mini_runs()
    out = args.out or REPO / "results/digest/digest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(digest(), indent=1, sort_keys=True))
    print(f"{len(digest())} files -> {out}")


if __name__ == "__main__":
    main()
