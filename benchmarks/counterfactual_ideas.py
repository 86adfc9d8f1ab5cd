"""Issue 31's first probe: ideas for an attribution that predicts the counterfactual, scored on its truth.

    python -m benchmarks.counterfactual_ideas --split val    # benchmarks/results/mini_abc/counterfactual_ideas_val.md

A probe, not a flag: it scores ideas on the counterfactual table's truth and queries (benchmarks/counterfactual_scoring.py,
docs/counterfactual.md) before any of them is worth a flag of compute_influence.py. It reads that table's runs
(results/mini_abc/image_<split>, made by `python -m benchmarks.counterfactual --split <split>`) and adds:

* **exemplar unlearning**, the counterfactual's own direction: AbU unlearns the *query* and measures how much each
  exemplar's loss rises; leave-one-out removes an *exemplar* and measures the query. Here each exemplar of a model
  is unlearned in turn (AbU's Fisher-preconditioned ascent on the exemplar under the model's training caption,
  utils.unlearning.QueryUnlearner, the customized weights restored after each), and every query's loss under its
  own prompt is measured before and after it (both flips, T shared (t, noise) draws): the score of (query,
  exemplar) is the rise. One unlearning per exemplar serves all of a model's queries. Two schedules: the
  stopping rule of the table's runs ("stop rule") and five small steps (lr 0.02, "gentle");
* **the relative rise**, one of AbU's own knobs: each exemplar's loss rise over its loss before unlearning, from the
  table's runs (their after-losses and stage-1 caches);
* **peer contrasts of every row**: the score minus its mean over the prompt's samples no label chose;
* **blends** z(s) + lambda z(s - peers' mean), z over the model's exemplars: a query's whole ordering and its
  image's part in one score (a tie goes to the whole ordering).

The exemplar-unlearning losses are cached per model and schedule under <runs>/exemplar_unlearning/ (atomic,
reused; --overwrite measures again).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.counterfactual_scoring import (BASELINES, CONTROL, N_LAION, STOP, Base, ceiling_rows,
                                               exemplar_scores, fmt, look_rows, representatives, score_rows, slug)
from benchmarks.runner import BENCH, REPO, abu_flags, common_flags, tuned_sizing
from data.mini_abc_build.counterfactual import OUT_DIR
from utils.io import atomic_write, load_json, load_npy
from utils.layout import EXEMPLAR_LOSS, ResultsLayout
from utils.metrics import fold_flips
from utils.ranking import standardize
from utils.tasks import load_tasks

SCHEDULES = {"stop rule": STOP, "gentle": ["--stop_rule", "none", "--unlearn_steps", "5", "--unlearn_lr", "0.02"]}
COLUMNS = [("LOO", "LOO"), ("LOO, image-specific", "LOO, image-specific"), ("LDS", "LDS"),
           ("LDS, image-specific", "LDS, image-specific"), ("across samples", "across samples"),
           ("look Spearman", "look, per prompt"), ("look pair AUC", "look pair AUC")]
LAMBDAS = (0.5, 1.0, 2.0)


class ExemplarUnlearning:
    """Unlearns each exemplar of a counterfactual base and measures its queries' losses (see the module doc)."""

    def __init__(self, schedule: list, time_samples: int):
        from utils.models import load_base_model
        from utils.settings import InfluenceSettings, parse_settings
        from utils.unlearning import QueryUnlearner
        from utils.weights import PristineWeights

        flags = (["--task_json", "unused"] + common_flags(BENCH, N_LAION) + abu_flags(tuned_sizing())
                 + ["--device", "cpu"] + schedule)
        self.settings = parse_settings(InfluenceSettings, "", flags)
        self.dataroot, self.time_samples = BENCH / "abc", time_samples
        self.model = load_base_model(str(BENCH / "sd-mini"), "cpu")
        self.pristine = PristineWeights(self.model.unet)
        measurement = self.settings.measurement()
        collect = lambda c, desc, **kw: measurement.collect(self.model.unet, self.model.scheduler, c, desc, **kw)  # noqa
        self.unlearner = QueryUnlearner(self.settings, self.model, self.dataroot, collect, self.pristine)

    def query_losses(self, queries) -> np.ndarray:
        """[n queries] mean loss over both flips and the T draws (the same draws at every call)."""
        from utils.losses import collect_losses

        loss = collect_losses(self.model.unet, self.model.scheduler, queries, batch_size=8 * self.time_samples,
                              time_samples=self.time_samples, seed=0, desc="query losses")
        n = len(loss) // 2
        return 0.5 * (loss[:n] + loss[n:])

    def effects(self, spec: dict) -> dict:
        """{"before" [n queries], "after" [n exemplars, n queries], "steps" [n exemplars], "forwards" (UNet
        forward-equivalents, backward = 2)} for one base of the counterfactual plan."""
        import torch

        from utils.customization import apply_customization
        from utils.data import ExemplarCandidates, load_exemplar_images
        from utils.encoders import encode_images, encode_prompt
        from utils.tasks import Task
        from utils.weights import restored

        m = self.model
        apply_customization(m, self.pristine, self.dataroot / spec["model_path"])
        try:
            images = load_exemplar_images([self.dataroot / q["path"] for q in spec["queries"]], m.resolution)
            latents = encode_images(m.vae, images, torch.Generator().manual_seed(0), batch_size=64)
            text = {p: encode_prompt(m.tokenizer, m.text_encoder, p).cpu() for p in {q["prompt"] for q in spec["queries"]}}
            queries = ExemplarCandidates(latents, torch.cat([text[q["prompt"]] for q in spec["queries"]]))
            before, after, steps, forwards = self.query_losses(queries), [], [], 0.0
            for path in spec["exemplars"]:
                exemplar = Task(synth_image_path=path, prompt=spec["train_prompt"], test_case=spec["test_case"],
                                test_case_ind=0, model_path=spec["model_path"], train_prompt=spec["train_prompt"])
                with restored(self.unlearner.params):
                    unlearned = self.unlearner.unlearn(exemplar, None)
                    after.append(self.query_losses(queries))
                steps.append(len(unlearned["history"]))
                forwards += sum(self.unlearner.cost(unlearned).values())  # its steps and the exemplar's own loss
        finally:
            self.pristine.restore()
        n_rows = 2 * len(spec["queries"]) * self.time_samples
        return {"before": before, "after": np.stack(after), "steps": np.array(steps),
                "forwards": forwards + (len(steps) + 1) * n_rows}


def cached_effects(folder: Path, spec: dict, schedule: str, probe, overwrite: bool) -> dict:
    path = folder / f"{spec['name']}__{slug(schedule)}.npz"
    if overwrite or not path.is_file():
        started = time.time()
        got = probe(schedule).effects(spec)
        atomic_write(path, lambda f: np.savez(f, **got, queries=np.array([q["path"] for q in spec["queries"]]),
                                             seconds=time.time() - started))
        print(f"{spec['name']} ({schedule}): {time.time() - started:.0f} s -> {path}", flush=True)
    with np.load(path) as z:
        if list(z["queries"]) != [q["path"] for q in spec["queries"]]:
            raise RuntimeError(f"{path} was measured on other queries than the plan's {spec['name']}: pass --overwrite")
        return {k: z[k] for k in ("before", "after", "steps", "forwards")}


def relative_rise(base: Base, folder: Path, cache: Path) -> np.ndarray:
    """[n queries, n exemplars]: (after - before) / before per exemplar row, flips folded as the influence folds
    them (utils.metrics.fold_flips), from a run's after-losses and its stage-1 cache."""
    layout = ResultsLayout(folder, cache)
    before = load_npy(layout.loss_cache(base.tasks[0]) / EXEMPLAR_LOSS, "stage-1 exemplar losses").astype(np.float64)
    out = []
    for task in base.tasks:  # one model: one stage-1 cache
        after = load_npy(layout.query_dir(task) / EXEMPLAR_LOSS, "exemplar losses after unlearning")
        out.append(fold_flips((after - before) / before)[:base.n_exemplar])
    return np.array(out)


def peer_contrast(base: Base, scores: np.ndarray) -> np.ndarray:
    """[n queries, n exemplars]: each query's scores minus their mean over its unselected peers."""
    return np.stack([s - scores[p].mean(axis=0) if p else s for s, p in zip(scores, base.unselected_peers)])


def z_exemplars(scores: np.ndarray) -> np.ndarray:
    """[n queries, n exemplars]: each query's scores standardised over the model's exemplars (utils.ranking's
    standardize, row by row: a constant row becomes zeros)."""
    return np.array([standardize(row) for row in scores])


def ideas(base: Base, root: Path, reps: dict, effects: dict) -> dict:
    """{idea: ([n queries, n exemplars] scores, cost per query in UNet forward-equivalents or NaN)}."""
    runs = {"AbU (the paper)": exemplar_scores(base, root, "abu", "influence"),
            "AbU, stop rule": exemplar_scores(base, root, "abu_stop_rule", "influence"),
            "AbU, stop rule, control-corrected": exemplar_scores(base, root, "abu_stop_rule", "control-corrected",
                                                                 CONTROL["AbU, stop rule"], reps)}
    out = {name: (s, cost) for name, (s, _, cost) in runs.items()}
    for name, folder in (("AbU (the paper)", "abu"), ("AbU, stop rule", "abu_stop_rule")):
        out[f"{name}, relative rise"] = (relative_rise(base, root / folder, root / "orig_loss"), out[name][1])
    for name in BASELINES:
        if (root / slug(name)).is_dir():
            out[name] = (exemplar_scores(base, root, slug(name), "influence")[0], float("nan"))
    for schedule, e in effects.items():
        out[f"exemplar unlearning, {schedule}"] = ((e["after"] - e["before"][None]).T, e["forwards"] / len(base.tasks))
    for name, (s, cost) in list(out.items()):
        out[f"{name} - peers"] = (peer_contrast(base, s), cost)
    for name in ("AbU (the paper)", "AbU, stop rule"):
        s, cost = out[name]
        whole, image = z_exemplars(s), z_exemplars(peer_contrast(base, s))
        for lam in LAMBDAS:  # 1e-6 more of the whole: a tie (two exemplars, lambda 1) goes to the whole ordering
            out[f"z({name}) + {lam:g} z(its - peers)"] = ((1 + 1e-6) * whole + lam * image, cost)
    return out


def evaluate(split: str, root: Path, schedules: list, overwrite: bool):
    plan = load_json(BENCH / OUT_DIR / "plan.json", "counterfactual plan")
    tasks = load_tasks(BENCH / "tasks" / f"counterfactual_{split}.json")
    by_path, reps = {t.synth_image_path: t for t in tasks}, representatives(tasks)
    probes = {}  # one loaded model per schedule, made on first need (a rerun with every model cached loads none)

    def probe(schedule: str) -> ExemplarUnlearning:
        if schedule not in probes:
            probes[schedule] = ExemplarUnlearning(SCHEDULES[schedule], 32)
        return probes[schedule]

    rows, costs = {}, {}
    for spec in (b for b in plan["bases"] if b["split"] == split):
        base = Base(spec, by_path, BENCH)
        if base.effects is None and base.looks_truth is None:
            continue
        effects = {s: cached_effects(root / "exemplar_unlearning", spec, s, probe, overwrite) for s in schedules}
        ceiling = ceiling_rows(base) or {}
        for metric, values in ceiling.items():
            rows.setdefault((base.kind, "*ceiling*", metric), []).extend(values.tolist())
        for name, (scores, cost) in ideas(base, root, reps, effects).items():
            got = {**score_rows(base, scores), **look_rows(base, scores)}
            for metric, values in got.items():
                rows.setdefault((base.kind, name, metric), []).extend(np.asarray(values, float).tolist())
            costs.setdefault(name, []).append(cost)
    return rows, {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in costs.items()}


def markdown(split: str, rows: dict, costs: dict) -> str:
    kinds = list(dict.fromkeys(k for k, _, _ in rows))
    lines = [f"`python -m benchmarks.counterfactual_ideas --split {split}`", "",
             "Ideas for issue 31 on the counterfactual truth (mean ± standard error over queries; look columns over "
             "prompts). `- peers`: minus the mean over the prompt's unselected samples; `z(s) + l z(its - peers)`: "
             "both standardised over the model's exemplars. Cost: UNet forward-equivalents per query.", ""]
    for kind in kinds:
        methods = sorted(dict.fromkeys(m for k, m, _ in rows if k == kind), key=lambda m: m != "*ceiling*")
        lines += [f"**{kind}**", "", "| idea | " + " | ".join(c for _, c in COLUMNS) + " | cost |",
                  "|---" * (len(COLUMNS) + 2) + "|"]
        for m in methods:
            cost = costs.get(m, float("nan"))
            lines.append(f"| {m} | " + " | ".join(fmt(rows.get((kind, m, key), [])) for key, _ in COLUMNS)
                         + f" | {'' if cost != cost else f'{cost:,.0f}'} |")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    p.add_argument("--overwrite", action="store_true", help="measure the exemplar unlearning again")
    p.add_argument("--table_dir", default=str(REPO / "benchmarks" / "results" / "mini_abc"))
    args = p.parse_args()
    root = REPO / "results" / "mini_abc" / f"image_{args.split}"
    if not (root / "abu").is_dir():
        sys.exit(f"error: {root}/abu not found: run `python -m benchmarks.counterfactual --split {args.split}` first")
    rows, costs = evaluate(args.split, root, args.schedules, args.overwrite)
    md = markdown(args.split, rows, costs)
    path = Path(args.table_dir) / f"counterfactual_ideas_{args.split}.md"
    atomic_write(path, lambda f: f.write(md.encode()))
    print(md)


if __name__ == "__main__":
    main()
