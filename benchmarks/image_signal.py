"""Where a query's image shows in AbU's loss rises: per timestep and per unlearning step, on mini-AbC's image-level
test cases (docs/method.md section 11).

    python -m benchmarks.image_signal --split val     # prints the table, writes results/mini_abc/image_signal_val.csv

Each image-level pair is two samples of one prompt whose answers are swapped (q reads as look/style A, q' as B). For
every pair this unlearns both queries as compute_influence.py does (same flags as the comparison's AbU row), keeps
the weights after 5, 10, ..., 25 steps, and measures the loss of the pair's candidates (the exemplars of both looks,
or the concept's two pretraining pictures) on a grid of --time_samples timesteps (many more than the comparison's
3), before and after. The pair's double difference

    DD(t, s) = [rise(A | q) - rise(A | q')] - [rise(B | q) - rise(B | q')]      (A, B: the mean over each answer set)

is positive when the image moves the right candidates: the prompt's part, shared by q and q', cancels. The table
gives, per level, the fraction of pairs with DD > 0 (over all timesteps, and per band of timesteps) at each step.
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.runner import BENCH, REPO, abu_flags, common_flags, tuned_sizing
from utils.attribution import Attributor
from utils.customization import apply_customization
from utils.data import ExemplarCandidates, LaionCandidates
from utils.encoders import encode_images, encode_prompt
from utils.layout import ResultsLayout
from utils.losses import LossMeasurement
from utils.models import load_base_model
from utils.settings import InfluenceSettings, parse_settings
from utils.tasks import exemplar_paths, image_ground_truth, load_tasks
from utils.transforms import load_image_tensor
from utils.unlearning import unlearn
from utils.weights import copy_weights, loaded, restored

BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))
LEVELS = (("customization, style", "looks_style"), ("customization, object", "looks_object"),
          ("pretraining, style", "pretraining"))


def pairs_of(tasks, dataroot: Path):
    """[(q, q', matching of q, matching of q')]: image-level queries of one model and prompt whose answers are
    swapped (q's matching set is q''s non-matching one)."""
    truth = {t.synth_image_path: image_ground_truth(dataroot, t) for t in tasks}
    out, used = [], set()
    for q in tasks:
        if truth[q.synth_image_path] is None or q.synth_image_path in used:
            continue
        a = truth[q.synth_image_path][0]
        r = next((t for t in tasks if t.synth_image_path not in used | {q.synth_image_path}
                  and (t.model_path, t.prompt) == (q.model_path, q.prompt) and truth[t.synth_image_path]
                  and truth[t.synth_image_path][0].matching == a.non_matching), None)
        if r is not None:
            used |= {q.synth_image_path, r.synth_image_path}
            out.append((q, r, a.matching, a.non_matching))
    return out


def candidate_rows(attributor, task, paths, dataroot: Path):
    """(candidates, rows of `paths` in them, unflipped and flipped): the model's exemplars or the LAION subset."""
    ex = [p.relative_to(dataroot).as_posix() for p in exemplar_paths(dataroot, task)]
    if all(p in ex for p in paths):
        image = torch.stack([load_image_tensor(dataroot / p, attributor.base.resolution) for p in ex])
        latents = encode_images(attributor.base.vae, torch.cat([image, image.flip(-1)]),
                                torch.Generator().manual_seed(attributor.settings.common.seed))
        text = encode_prompt(attributor.base.tokenizer, attributor.base.text_encoder, task.train_prompt).cpu()
        idx = [ex.index(p) for p in paths]
        return ExemplarCandidates(latents, text), np.array(idx + [i + len(ex) for i in idx])
    laion = [p.relative_to(dataroot).as_posix() for p in attributor.laion_paths]
    idx = [laion.index(p) for p in paths]
    return attributor.laion, np.array(idx + [i + attributor.laion.subset_size for i in idx])


def rises_by_step(attributor, task, candidates, rows, measure: LossMeasurement, keep=(5, 10, 15, 20)):
    """{steps: [rows, T] loss rise} after unlearning `task` for each kept number of steps and for the whole
    schedule; the weights are restored to the customized ones afterwards."""
    a, u = attributor, attributor.unlearner
    collect = lambda: measure.collect(a.loss_unet, a.base.scheduler, candidates, "pair losses", rows=rows,
                                      per_timestep=True).astype(np.float64)
    before = collect()
    kept = {}

    def snapshot(done):
        if done in keep:
            kept[done] = copy_weights(u.params)
        return False

    s = a.settings.unlearning
    generator = torch.Generator().manual_seed(a.settings.common.seed)
    latents, text = u.inputs(task, generator)
    with restored(u.params):
        unlearn(a.base.unet, a.base.scheduler, latents, text, u.params, u.fisher, steps=s.unlearn_steps,
                grad_accum_steps=s.unlearn_grad_accum_steps, lr=s.unlearn_lr, dataset_size=u.dataset_size,
                generator=generator, precision=a.settings.common.precision, should_stop=snapshot, progress=False)
        out = {s.unlearn_steps: collect() - before}
    for steps, weights in kept.items():
        with loaded(u.params, weights):
            out[steps] = collect() - before
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--time_samples", type=int, default=50, help="grid timesteps each candidate is measured at")
    p.add_argument("--out", default=None, help="default results/mini_abc/image_signal_<split>.csv")
    p.add_argument("--extra", default="", help="more compute_influence.py flags, e.g. the all-weights ablation's "
                                               "'--weight_selection all --fisher_path data/mini_abc/abc/"
                                               "sd_fisher_all.pt --fisher_dataset_size 100000000'")
    args = p.parse_args()
    bench, stem = BENCH, f"image_{args.split}"
    task_json = bench / "tasks" / f"{stem}.json"
    dataroot = bench / "abc"
    sizing = tuned_sizing()
    flags = ["--task_json", str(task_json), "--result_dir", str(REPO / "results" / "mini_abc" / stem), "--device",
             "cpu"] + abu_flags(sizing) + common_flags(bench, 300) + args.extra.split()
    settings = parse_settings(InfluenceSettings, "", flags)
    base = load_base_model(settings.common.sd_version, "cpu")
    laion = LaionCandidates(dataroot, settings.common.laion_subset_size)
    attributor = Attributor(settings, base, laion, dataroot, ResultsLayout(settings.common.result_dir), {})
    measure = LossMeasurement(4 * args.time_samples, args.time_samples, settings.common.seed, "fp32", False, "cpu")
    grid = np.arange(0, 1000, 1000 // args.time_samples)[:args.time_samples]
    records = []
    pairs = pairs_of(load_tasks(task_json), dataroot)
    for q, r, match_q, match_r in tqdm(pairs, desc="pairs", unit="pair"):
        apply_customization(base, attributor.pristine, dataroot / q.model_path)
        candidates, rows = candidate_rows(attributor, q, list(match_q) + list(match_r), dataroot)
        n_a, n = len(match_q), len(match_q) + len(match_r)
        rises = [rises_by_step(attributor, t, candidates, rows, measure) for t in (q, r)]
        attributor.pristine.restore()
        for steps in sorted(rises[0]):
            # fold flips as the ranking does (each candidate's larger rise), then the mean over each answer set
            folded = [np.maximum(x[steps][:n], x[steps][n:]) for x in rises]
            a = [f[:n_a].mean(0) for f in folded]  # [T]: rise of q's answer under q, under q'
            b = [f[n_a:].mean(0) for f in folded]
            dd = (a[0] - a[1]) - (b[0] - b[1])
            records.append({"level": next(name for name, key in LEVELS if key in q.test_case), "pair": q.prompt,
                            "model": q.model_path, "steps": steps, **{f"t{t}": v for t, v in zip(grid, dd)}})
    out = Path(args.out or REPO / "results" / "mini_abc" / f"image_signal_{args.split}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    print(table(records, grid))
    print(f"\nper pair and step: {out}")


def table(records, grid) -> str:
    lines = ["| level | steps | pairs | DD > 0, mean over t | " + " | ".join(f"t in [{lo}, {hi})" for lo, hi in BANDS)
             + " | mean DD / its s.e. |", "|---|---:|---:|---:|" + "---:|" * (len(BANDS) + 1)]
    for name, _ in LEVELS:
        for steps in sorted({r["steps"] for r in records}):
            rs = [r for r in records if r["level"] == name and r["steps"] == steps]
            if not rs:
                continue
            dd = np.array([[r[f"t{t}"] for t in grid] for r in rs])  # [pairs, T]
            mean = dd.mean(1)
            bands = [np.mean(dd[:, (grid >= lo) & (grid < hi)].mean(1) > 0) for lo, hi in BANDS]
            t_stat = mean.mean() / (mean.std(ddof=1) / np.sqrt(len(mean))) if len(mean) > 1 else float("nan")
            lines.append(f"| {name} | {steps} | {len(rs)} | {np.mean(mean > 0):.2f} | "
                         + " | ".join(f"{b:.2f}" for b in bands) + f" | {t_stat:+.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
