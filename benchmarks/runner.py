"""What the mini-AbC benchmark scripts share: the benchmark's place, its CPU sizing and validation-tuned values,
the flags every run of the CLIs gets, and running a CLI with its time recorded beside its results."""
import argparse
import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import numpy as np

from utils.io import atomic_write, save_json

BENCH = REPO / "data" / "mini_abc"
# Hyperparameters that do not transfer from SD scale, chosen on the validation split (docs/mini_abc.md).
TUNED = {"fisher_dataset_size": 1e5, "unlearn_lr": 0.1, "sgd_lr": 1.0, "all_weights_n": 1e8,
         "stop_rule": "rise", "stop_target": 1.5, "stop_every": 5}
# Sizing for 2 CPU cores (docs/mini_abc.md): the first 600 pretraining images (1,200 rows with flips) as
# candidates, T = 3 timesteps (B = 240), 25 unlearning steps of 4 micro-batches; about 16 s a query, so that the test
# table takes about an hour.
SIZING = {"laion_subset_size": 600, "time_samples": 3, "batch_size": 240, "unlearn_steps": 25,
          "unlearn_grad_accum_steps": 4}


def tuned_sizing() -> argparse.Namespace:
    """SIZING with the validation-tuned N and step size: everything abu_flags reads."""
    return argparse.Namespace(**SIZING, fisher_dataset_size=TUNED["fisher_dataset_size"], unlearn_lr=TUNED["unlearn_lr"])


def common_flags(bench: Path, n_laion: int):
    """Flags every script of the comparison takes (compute_baselines.py has no --device: it runs on the CPU)."""
    return ["--sd_version", str(bench / "sd-mini"), "--dataroot", str(bench / "abc"),
            "--laion_subset_size", str(n_laion)]


def abu_flags(args):
    """compute_influence.py's sizing and tuned flags shared by every AbU row."""
    return ["--loss_batch_size", str(args.batch_size), "--loss_time_samples", str(args.time_samples),
            "--fisher_dataset_size", str(int(args.fisher_dataset_size)), "--unlearn_lr", str(args.unlearn_lr),
            "--unlearn_steps", str(args.unlearn_steps), "--unlearn_grad_accum_steps", str(args.unlearn_grad_accum_steps)]


def labelled_task_file(task_json: Path, dataroot: Path, out: Path) -> Path:
    """The queries of an image-level task file that carry image-level ground truth (the labelled pairs), written to
    <out>/labelled_tasks.json: the task files also hold every other sample of those prompts (the peers a contrast
    reads, and the counterfactual truth's queries), which the comparison and the rankings' table do not score."""
    from utils.tasks import image_ground_truth, load_tasks

    entries = json.loads(Path(task_json).read_text())
    keep = {t.synth_image_path for t in load_tasks(task_json) if image_ground_truth(dataroot, t) is not None}
    path = Path(out) / "labelled_tasks.json"
    save_json(path, [e for e in entries if e["synth_image_path"] in keep])
    return path


def python_command(script, repo: Path = REPO) -> list:
    """The command that runs one of the repo's scripts with this Python, from the repo root (the cwd it needs): a
    top-level script by its path, one in a folder as a module (`data/x.py` -> `-m data.x`), because the repo is
    not installed and `data` or `benchmarks` resolve only from the root (README, "Install")."""
    path = Path(script)
    relative = path.relative_to(repo) if path.is_absolute() else path
    if len(relative.parts) == 1:
        return [sys.executable, str(repo / relative)]
    return [sys.executable, "-m", ".".join(relative.with_suffix("").parts)]


def run(cmd, memory_file: Path = None) -> bool:
    """Run one of the repo's scripts (`cmd[0]`, a path) with this Python from the repo root; True when it exits 0.
    With `memory_file` (Linux), the child's anonymous resident memory (RssAnon: its own footprint, not the page
    cache of memory-mapped arrays) is read every 0.1 s and {"peak_anon_MiB", "late_mean_anon_MiB" (the mean of the
    second half of the samples: whether memory still grows late in the run), "samples"} saved there, merged with a
    previous run's (the larger of each)."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    proc = subprocess.Popen(python_command(cmd[0]) + [str(c) for c in cmd[1:]], cwd=REPO)
    samples = []
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            samples += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("RssAnon:")]
        except OSError:
            pass
        time.sleep(0.1)
    if memory_file is not None and samples:
        late = samples[len(samples) // 2:]
        figures = {"peak_anon_MiB": round(max(samples)), "late_mean_anon_MiB": round(sum(late) / len(late)),
                   "samples": len(samples)}
        if Path(memory_file).is_file():
            old = json.loads(Path(memory_file).read_text())
            figures = {k: max(v, old.get(k, 0)) for k, v in figures.items()}
        save_json(memory_file, figures)
    return proc.returncode == 0


def derive_arrays(bench: Path, all_weights_fisher: bool = True) -> None:
    """The mini-AbC arrays a fresh clone lacks (LAION-like latents, caption embeddings, the Fisher, and for the
    all-weights ablation its own Fisher); kept when present. Exits when the builder fails."""
    cmd = ["data/build_mini_abc.py", "--out", bench, "--stage", "derive"]
    if not run(cmd + ([] if all_weights_fisher else ["--no_all_weights_fisher"])):
        sys.exit("deriving the mini-AbC arrays failed; see the error above")


def stage1(task_json: Path, result_dir: Path, sizing, flags) -> tuple:
    """compute_training_loss.py at the sizing's B and T into result_dir/orig_loss: (ok, seconds), timed (and its
    memory in orig_loss/memory.json, see `run`) and skipped when finished."""
    out = Path(result_dir) / "orig_loss"
    return timed(out, "settings.json", lambda: run(
        ["compute_training_loss.py", "--task_json", task_json, "--result_dir", result_dir, "--batch_size",
         str(sizing.batch_size), "--time_samples", str(sizing.time_samples)] + list(flags), out / "memory.json"))


def timed(result_dir: Path, marker: str, fn):
    """(fn()'s result, the method's compute seconds). The seconds live in result_dir/timing.json, summed over
    the runs that finished something (files named `marker`), so a rerun that only re-scores, or resumes
    after a crash, still reports the time the results took."""
    count = lambda: len(list(result_dir.rglob(marker))) if result_dir.is_dir() else 0  # noqa: E731
    before, t0 = count(), time.time()
    ok = fn()
    path = result_dir / "timing.json"
    seconds = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    if count() > before or not path.is_file():
        seconds = round(seconds + time.time() - t0, 1)
        save_json(path, {"seconds": seconds})
    return ok, seconds


def write_table(out: Path, stem: str, markdown: str, rows) -> None:
    """<out>/<stem>.md (the text) and <out>/<stem>.csv (the rows, one dict each), both atomically."""
    atomic_write(out / f"{stem}.md", lambda f: f.write(markdown), binary=False)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))  # rows may differ
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / f"{stem}.csv", lambda f: f.write(buf.getvalue()), binary=False)


def write_random_candidates(root: Path, n: int, latent_size: int, width: int, rng: np.random.Generator,
                            chunk: int = 256) -> None:
    """Random `laion_latents.npy` [2n, 4, latent_size, latent_size] (the flipped half a copy of the unflipped)
    and `laion_text_embeddings.npy` [n, 77, width], written in chunks, never whole in memory."""
    lat = np.lib.format.open_memmap(root / "laion_latents.npy", mode="w+", dtype=np.float32,
                                    shape=(2 * n, 4, latent_size, latent_size))
    txt = np.lib.format.open_memmap(root / "laion_text_embeddings.npy", mode="w+", dtype=np.float32,
                                    shape=(n, 77, width))
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        lat[s:e] = lat[n + s:n + e] = rng.standard_normal((e - s, 4, latent_size, latent_size), dtype=np.float32)
        txt[s:e] = rng.standard_normal((e - s, 77, width), dtype=np.float32)
    lat.flush()
    txt.flush()
    del lat, txt


# 16 colours no two of which are alike (from Kelly's list of maximally distinct colours): one a row
COLOURS = [(34, 34, 34), (0, 103, 165), (243, 132, 0), (0, 136, 86), (190, 0, 50), (135, 86, 146), (161, 202, 241),
           (243, 195, 0), (230, 143, 172), (132, 132, 130), (136, 45, 23), (194, 178, 128), (141, 182, 0),
           (96, 78, 151), (249, 150, 121), (43, 61, 38)]


def canvas(w: int, h: int):
    """A white picture of w x h pixels, its drawing context and the font every benchmark figure uses."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (w, h), "white")
    return img, ImageDraw.Draw(img), ImageFont.load_default(size=13)


def check_all_timestep_losses(layout, task) -> None:
    """Exit naming the result when its after-losses are means over fewer than T timesteps (compute_influence.py
    --influence_timesteps_below): the benchmarks' collateral, exemplar rise and relative rise subtract the stage-1
    cache's all-T means from them."""
    from utils.io import load_pickle

    below = load_pickle(layout.influence_file(task), "result").get("settings", {}).get("influence_timesteps_below")
    if below is not None:
        sys.exit(f"error: {layout.influence_file(task)} measured its losses below t = {below} only, and this table "
                 "subtracts all-T losses from them: run it without --influence_timesteps_below")
