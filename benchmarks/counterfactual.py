"""Every ranking judged on counterfactual ground truth: what retraining a customization without an exemplar does.

    python -m benchmarks.counterfactual --split val     # benchmarks/results/mini_abc/counterfactual_val.{md,csv,png}
    python -m benchmarks.counterfactual --split test

Reads the truth the builder measured (python -m data.build_mini_abc --stage counterfactual;
data/mini_abc_build/counterfactual.py) for every customized model of the split that has one, runs (or reuses) the
rankings over every query of tasks/counterfactual_<split>.json at the image-level comparison's sizing (its results
folder results/mini_abc/image_<split>, so both share runs): AbU on the paper's schedule, AbU with the stopping rule,
their noise-image controls (one query per prompt: a prompt's controls are identical), and the baselines of
compute_baselines.py. Each --ranking is composed per query with utils.ranking exactly as compute_influence.py
composes it, with **peers the other samples of the query's prompt that no label chose** (the labelled pair partner
is left out: a user's other samples of a prompt are not chosen by the answer). Then, per query (utils/counterfactual.py):
LOO Spearman, LDS and both on the image-specific part; per prompt of a two-look model, the look-level truth; the
truth's own seed ceiling and how much it differs between samples of a prompt; the proxy labels against it.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.runner import (BENCH, COLOURS, REPO, SIZING, TUNED, abu_flags, canvas, common_flags, derive_arrays,
                               run, stage1, timed, tuned_sizing, write_table)
from benchmarks.counterfactual_scoring import (BASELINES, CONTROL, KINDS, METRICS, N_LAION, RANKINGS, SEED_ALONE,
                                               UNLEARNING, Base, ceiling_rows, exemplar_scores, first_samples, fmt,
                                               look_ceiling, look_rows, representatives, score_rows, slug)
from data.mini_abc_build.counterfactual import OUT_DIR
from utils import counterfactual as cf
from utils.evaluation import load_result, score_queries
from utils.io import load_json, save_json
from utils.layout import ResultsLayout
from utils.metrics import mean_and_stderr
from utils.tasks import load_tasks


def with_truth(bench: Path, split: str, out: Path, bases=None, per_prompt: int = 0) -> Path:
    """<out>/counterfactual_tasks.json: the queries of tasks/counterfactual_<split>.json whose model has a measured
    leave-one-out truth (a build in progress has some models only): the ones worth running. `bases` (names) instead
    chooses the models, truth or not yet (to run while the builder still measures them)."""
    plan = load_json(bench / OUT_DIR / "plan.json", "counterfactual plan (python -m data.build_mini_abc --stage "
                                                    "counterfactual)")
    chosen = set(bases) if bases else measured_bases(bench, plan)
    ready = {q["path"] for b in plan["bases"] if b["split"] == split and b["name"] in chosen
             for q in first_samples(b["queries"], per_prompt)}
    entries = json.loads((bench / "tasks" / f"counterfactual_{split}.json").read_text())
    path = out / "counterfactual_tasks.json"
    save_json(path, [e for e in entries if e["synth_image_path"] in ready])
    return path


def measured_bases(bench: Path, plan: dict) -> set:
    """Names of the bases with a truth at the model's own training seed: full@0 and every loo<e>@0 measured, or (a
    two-look style model, built look level first with --sets 'look*@...') both looks alone."""
    folder = bench / OUT_DIR / "losses"
    measured = lambda b, names: all((folder / b["name"] / f"{n}.npz").is_file() for n in names)  # noqa: E731
    return {b["name"] for b in plan["bases"]
            if measured(b, ["full@0"] + [f"loo{e}@0" for e in range(len(b["exemplars"]))])
            or (b["kind"] == "two-look style" and measured(b, ["lookA@0", "lookB@0"]))}


def ensure_runs(task_json: Path, out: Path, tasks, args) -> dict:
    """Run (or reuse) every ranking's unlearning and baseline runs; {name: seconds}."""
    bench = Path(args.bench)
    derive_arrays(bench, all_weights_fisher=False)
    n_laion = args.laion_subset_size or len((bench / "abc" / "laion_subset" / "captions.txt").read_text().splitlines())
    flags = common_flags(bench, n_laion) + ["--device", "cpu"]
    sizing = argparse.Namespace(**{**vars(tuned_sizing()), "unlearn_steps": args.unlearn_steps,
                                   "fisher_dataset_size": args.fisher_dataset_size})
    ok, seconds = stage1(task_json, out, sizing, flags)
    if not ok:
        sys.exit("stage 1 failed; see the error above")
    times = {"stage 1": seconds}
    control_json = out / "counterfactual_controls.json"  # one query a prompt
    all_tasks = json.loads(task_json.read_text())
    reps = {t.synth_image_path for t in representatives(tasks).values()}
    save_json(control_json, [t for t in all_tasks if t["synth_image_path"] in reps])
    cache = out / "orig_loss"
    for name, (folder, extra) in UNLEARNING.items():
        for tj, f, more in ((task_json, folder, []), (control_json, CONTROL[name], ["--noise_image"])):
            cmd = (["compute_influence.py", "--task_json", tj, "--result_dir", out / f, "--loss_cache_dir", cache]
                   + abu_flags(sizing) + flags + extra + more)
            ok, times[f] = timed(out / f, "influence.pkl", lambda: run(cmd))
            if not ok:
                sys.exit(f"{' '.join(map(str, cmd))} failed")
    for name, method in BASELINES.items():
        if method == "gradient" and args.no_gradient:
            continue
        cmd = (["compute_baselines.py", "--task_json", task_json, "--result_dir", out / slug(name), "--loss_cache_dir",
                cache, "--method", method] + common_flags(bench, n_laion))
        ok, times[slug(name)] = timed(out / slug(name), "influence.pkl", lambda: run(cmd))
        if not ok:
            sys.exit(f"{' '.join(map(str, cmd))} failed")
    return times


def truth_stats(base: Base) -> dict:
    """The ruler's own figures for one base."""
    out = {"base": base.name, "kind": base.kind, "split": base.split, "queries": len(base.tasks),
           "prompts": len(set(base.prompt_of)), "sets": len(base.truth["loss"])}
    if base.effects is not None:
        out["mean LOO effect"] = float(base.effects.mean())
        out["queries needing every exemplar (effect > 0)"] = float((base.effects > 0).all(axis=1).mean())
        if base.n_exemplar > 1:
            out["Kendall tau, two samples of a prompt"] = float(np.nanmean(
                cf.agreement_between_samples(base.effects, base.prompt_of)))
    if base.effects is not None and base.effects_1 is not None:
        out["training seeds averaged, truth and ceiling each"] = base.seeds_per_half
        if base.n_exemplar > 1:
            out["Kendall tau, two training seeds"] = float(np.nanmean(
                [cf.kendall_tau(x, y) for x, y in zip(base.effects, base.effects_1)]))
            out["Spearman, two training seeds"] = float(np.nanmean(cf.per_query(base.effects_1, base.effects)))
            out["Spearman, two seeds, image-specific"] = float(np.nanmean(cf.per_query(
                base.image_specific(base.effects_1), base.image_specific(base.effects))))
        out["between samples / seed noise"] = cf.signal_to_noise(base.effects, base.effects_1, base.prompt_of)
    loss = base.truth["loss"]
    if "committed" in loss and "full@0" in loss:
        out["|full@0 - committed| / mean LOO effect"] = float(
            np.abs(loss["full@0"] - loss["committed"]).mean() / max(abs(out.get("mean LOO effect", np.nan)), 1e-12))
    dependence = base.looks_truth
    if dependence is not None:
        seed1 = base.looks_ceiling
        out["look dependence > 0"] = float((dependence > 0).mean())
        out["look dependence, spread within prompt / between"] = float(
            np.mean([np.std(dependence[np.array(base.prompt_of) == p]) for p in set(base.prompt_of)])
            / max(np.std(dependence), 1e-12))
        if seed1 is not None:
            out["look seeds averaged, truth and ceiling each"] = base.look_seeds_per_half
            out["look dependence, Spearman across seeds"] = cf.spearman(dependence, seed1)
        position = proxy_positions(base)
        out["proxy (look position) vs look dependence, Spearman per prompt"] = float(np.nanmean(
            cf.per_prompt_spearman(-position, dependence, base.prompt_of)))
        labelled = [(i, j) for i in range(len(base.tasks)) for j in range(len(base.tasks))
                    if base.spec["queries"][i]["label"] == "A" and base.spec["queries"][j]["label"] == "B"
                    and base.spec["queries"][i]["pair"] == base.spec["queries"][j]["pair"]]
        if labelled:
            out["labelled pairs whose A sample needs look A more"] = float(np.mean(
                [dependence[i] > dependence[j] for i, j in labelled]))
    return out


def proxy_positions(base: Base) -> np.ndarray:
    """The builder's proxy measure of every query: look_position of its mean ink colour (0 look A, 1 look B)."""
    from PIL import Image

    from data.mini_abc_build.image_level import ink_colour, look_position

    root = base.bench / "abc"
    ex = [Image.open(root / p).convert("RGB") for p in base.spec["exemplars"]]
    colours = [np.mean([ink_colour(img) for img, look in zip(ex, base.spec["looks"]) if look == side], axis=0)
               for side in (0, 1)]
    return np.array([look_position(Image.open(root / t.synth_image_path).convert("RGB"), *colours)
                     for t in base.tasks])


# ------------------------------------------------------------------ the table
def evaluate(split: str, root: Path, bench: Path = BENCH, per_prompt: int = 0):
    plan = load_json(bench / OUT_DIR / "plan.json", "counterfactual plan (python -m data.build_mini_abc --stage "
                                                    "counterfactual)")
    tasks = load_tasks(bench / "tasks" / f"counterfactual_{split}.json")
    by_path = {t.synth_image_path: t for t in tasks}
    bases = [Base(b, by_path, bench, per_prompt) for b in plan["bases"] if b["split"] == split]
    bases = [b for b in bases if b.effects is not None or b.looks_truth is not None]  # LOO, look level or both
    reps = representatives(tasks)
    looks, per_query, labelled = {}, {}, {}

    def add(method: str, per_base_scores, cost):
        for base, scores in per_base_scores:
            got = score_rows(base, scores)
            for metric, values in got.items():
                per_query.setdefault((method, base.kind, metric), []).extend(values.tolist())
            for metric, values in look_rows(base, scores).items():
                looks.setdefault((method, base.kind, metric), []).extend(values)
        per_query.setdefault((method, "cost", "cost"), []).append(cost)

    for name, (folder, _) in UNLEARNING.items():
        for label, ranking in RANKINGS:
            method = f"{name}: {label}"
            got = [(b,) + exemplar_scores(b, root, folder, ranking, CONTROL[name], reps) for b in bases]
            add(method, [(b, s) for b, s, _, _ in got], np.mean([c for _, _, _, c in got]))
            labelled[method] = proxy_auc([(b, r) for b, _, r, _ in got], bench)
    for name, folder in (("AbU, noise-image control", CONTROL["AbU"]),):
        got = [(b, control_scores(b, root, folder, reps)) for b in bases]
        add(name, got, float("nan"))
    for name in BASELINES:
        if (root / slug(name)).is_dir():
            got = [(b,) + exemplar_scores(b, root, slug(name), "influence") for b in bases]
            add(name, [(b, s) for b, s, _, _ in got], float("nan"))
    rng = np.random.default_rng(0)
    add("random scores (truth's chance)", [(b, rng.standard_normal((len(b.tasks), b.n_exemplar))) for b in bases],
        float("nan"))
    ceilings = {}
    for b in bases:
        c = ceiling_rows(b)
        if c is not None:
            for metric, values in c.items():
                ceilings.setdefault((b.kind, metric), []).extend(values.tolist())
        look = look_ceiling(b)
        if look is not None:
            ceilings.setdefault((b.kind, "look Spearman"), []).extend(look)
    stats = [truth_stats(b) for b in bases]
    return per_query, looks, ceilings, stats, labelled


def control_scores(base: Base, root: Path, folder: str, reps) -> np.ndarray:
    """The noise-image control as a ranking: its influence (the prompt's representative's) for every sample."""
    layout = ResultsLayout(root / folder, root / "orig_loss")
    return np.array([load_result(layout, reps[(t.model_path, t.prompt)])["influence"][:base.n_exemplar]
                     for t in base.tasks])


def proxy_auc(found, bench: Path) -> dict:
    """The image-level AUC of the labelled pair queries (their proxy labels), per family, from rankings composed with
    unselected peers."""
    out = {}
    for base, ranked in found:
        pairs = [(t, r) for t, r, lab in zip(base.tasks, ranked, base.labelled) if lab]
        if pairs:
            for row in score_queries(pairs, dataroot=bench / "abc"):
                out.setdefault(base.kind, []).append(row["auc"])
    return out


def ceiling_seeds(stats, key: str, kinds) -> str:
    """What a ceiling row reads: 'a second training seed', or the other seeds and how many each side averages
    (`key` of the models' truth_stats, for the models of `kinds`)."""
    averaged = sorted({s.get(key, 1) for s in stats if s["kind"] in kinds})
    return ("a second training seed" if averaged == [1] else
            f"other training seeds ({'/'.join(map(str, averaged))} averaged, as the truth)")


def markdown(split, per_query, looks, ceilings, stats, labelled) -> str:
    methods = list(dict.fromkeys(m for m, _, _ in per_query))
    kinds = [k for k in KINDS if any(k == kk for _, kk, _ in per_query)]
    lines = [f"Counterfactual truth, mini-AbC {split} split: every ranking's scores of a model's exemplars against "
             "what retraining without each does (mean ± standard error over queries; ceiling: the truth of a second "
             "training seed scored the same way; where more seeds are built, the truth averages the even seeds and "
             "the ceiling as many odd ones). Peers of the contrasts: the prompt's samples that no label chose.", ""]
    for kind in kinds:
        n = len(per_query[(methods[0], kind, "LOO")])
        lines += [f"**{kind}** ({n} queries)", "", "| ranking | " + " | ".join(t for _, t in METRICS) + " | cost |",
                  "|---|" + "---|" * (len(METRICS) + 1)]
        at = ceiling_seeds(stats, "training seeds averaged, truth and ceiling each", [kind])
        lines.append(f"| *ceiling: the truth at {at}* | " + " | ".join(
            fmt(ceilings.get((kind, k), [])) for k, _ in METRICS) + " | |")
        for m in methods:
            cost = per_query.get((m, "cost", "cost"), [float("nan")])[0]
            lines.append(f"| {m} | " + " | ".join(fmt(per_query[(m, kind, k)]) for k, _ in METRICS) +
                         f" | {'' if cost != cost else f'{cost:,.0f}'} |")
        lines.append("")
        seeds = sorted({int(metric[len(SEED_ALONE):]) for m, k, metric in per_query
                        if k == kind and metric.startswith(SEED_ALONE)})
        if len(seeds) > 1:
            lines += [f"LOO Spearman against each training seed's truth alone ({kind}; seed 0 is the training that "
                      "made the queries' model, the others retrain the same sets with fresh draws; the table above "
                      "averages the even seeds):", "", "| ranking | " + " | ".join(f"seed {k}" for k in seeds) + " |",
                      "|---|" + "---|" * len(seeds)]
            lines += [f"| {m} | " + " | ".join(fmt(per_query.get((m, kind, f"{SEED_ALONE}{k}"), [])) for k in seeds)
                      + " |" for m in methods if (m, kind, f"{SEED_ALONE}{seeds[0]}") in per_query]
            lines.append("")
    look_kinds = [k for k in ("two-look style", "two-look object") if any(kk == k for _, kk, _ in looks)]
    if look_kinds:
        lines += ["Look-level truth (two-look models: a sample's dependence on look A = its loss under the model "
                  "retrained on look B alone minus under look A alone, averaged over the even training seeds where "
                  "more are built): per prompt, Spearman across samples between a ranking's A-exemplars-above-B "
                  "and that dependence; pair AUC on each prompt's two samples most apart on it (0.5: ignores the "
                  "image). Proxy AUC: the labelled pairs' AUC (their look-position labels), rankings composed with "
                  "unselected peers.", "",
                  "| ranking | " + " | ".join(f"{k}: look Spearman | {k}: look pair AUC | {k}: proxy AUC"
                                              for k in look_kinds) + " |",
                  "|---|" + "---|" * (3 * len(look_kinds))]
        if any((k, "look Spearman") in ceilings for k in look_kinds):
            cells = sum(([fmt(ceilings.get((k, "look Spearman"), [])), "", ""] for k in look_kinds), [])
            at = ceiling_seeds(stats, "look seeds averaged, truth and ceiling each", look_kinds)
            lines.append(f"| *ceiling: the look dependence at {at}* | " + " | ".join(cells) + " |")
        for m in methods:
            cells = []
            for k in look_kinds:
                cells += [fmt(looks.get((m, k, "look Spearman"), [])), fmt(looks.get((m, k, "look pair AUC"), [])),
                          fmt(labelled.get(m, {}).get(k, []))]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    keys = list(dict.fromkeys(k for s in stats for k in s if k not in ("base", "kind", "split")))
    lines += ["The truth itself, per customized model:", "", "| model | kind | " + " | ".join(keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for s in stats:
        lines.append(f"| {s['base']} | {s['kind']} | " + " | ".join(
            ("–" if s.get(k) is None or s.get(k) != s.get(k) else
             (f"{s[k]:.3g}" if isinstance(s[k], float) else str(s[k]))) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def plot(per_query, ceilings, path: Path, metrics=("LOO", "LOO, image-specific", "LDS", "LDS, image-specific")) -> None:
    """One panel per kind of model: each ranking's mean (± s.e.) per metric, one colour a metric, the truth's seed
    ceiling as a dashed line of the metric's colour; 0 is where a ranking that knows nothing lands."""
    from utils.io import atomic_write

    metrics = [m for m in metrics if any(v == v for (_, _, mm), vals in per_query.items() if mm == m for v in vals)]
    methods = list(dict.fromkeys(m for m, k, _ in per_query if k != "cost"))
    kinds = [k for k in KINDS if any(kk == k and any(v == v for v in vals)
                                     for (_, kk, metric), vals in per_query.items() if metric == "LOO")]
    if not methods or not kinds:  # no model of the split has its leave-one-out truth yet: nothing to draw
        print(f"no counterfactual truth to plot yet; {path} not written")
        return
    _, probe, font = canvas(1, 1)
    label_w = 20 + max(int(probe.textlength(m, font=font)) for m in methods)
    row_h, panel_w, top = 16 + 5 * len(metrics), 300, 40
    height = top + row_h * len(methods) + 30 + 18 * len(metrics)
    legend_w = 40 + max(int(probe.textlength(f"{dict(METRICS)[m]} (dashed: the truth's own ceiling, other "
                                                    "training seeds)", font=font)) for m in metrics)
    img, d, font = canvas(max(label_w + (panel_w + 30) * len(kinds) + 10, label_w + legend_w), height)
    X = lambda j, v: label_w + j * (panel_w + 30) + (v + 1) / 2 * panel_w  # noqa: E731  [-1, 1] across a panel
    bottom = top + row_h * len(methods)
    for j, kind in enumerate(kinds):
        d.rectangle([X(j, -1), top - 8, X(j, 1), bottom], outline="black")
        d.text((X(j, -1), 6), kind, fill="black", font=font)
        for v in (-1, -0.5, 0, 0.5, 1):
            d.text((X(j, v) - 8, bottom + 4), f"{v:g}", fill="black", font=font)
        for y in range(top - 8, bottom, 5):
            d.line([X(j, 0), y, X(j, 0), y + 2], fill=(150, 150, 150))
        for c, metric in enumerate(metrics):
            ceiling = [v for v in ceilings.get((kind, metric), []) if v == v]
            if ceiling:
                x = X(j, float(np.mean(ceiling)))
                for y in range(top - 8, bottom, 8):
                    d.line([x, y, x, y + 4], fill=COLOURS[c + 1], width=2)
        for i, m in enumerate(methods):
            for c, metric in enumerate(metrics):
                values = [v for v in per_query.get((m, kind, metric), []) if v == v]
                if not values:
                    continue
                mean, se = mean_and_stderr(values)
                y = top + row_h * i + 6 + 5 * c
                d.line([X(j, max(mean - se, -1)), y, X(j, min(mean + se, 1)), y], fill=COLOURS[c + 1], width=2)
                d.ellipse([X(j, mean) - 3, y - 3, X(j, mean) + 3, y + 3], fill=COLOURS[c + 1])
    for i, m in enumerate(methods):
        d.text((6, top + row_h * i + 2), m, fill="black", font=font)
    for c, metric in enumerate(metrics):
        y = bottom + 24 + 18 * c
        d.ellipse([label_w, y, label_w + 10, y + 10], fill=COLOURS[c + 1])
        d.text((label_w + 16, y - 2), f"{dict(METRICS)[metric]} (dashed: the truth's own ceiling, other training "
                                      "seeds)", fill="black", font=font)
    atomic_write(path, lambda fh: img.save(fh, format="PNG"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--no_runs", action="store_true", help="only score runs already finished")
    p.add_argument("--no_gradient", action="store_true", help="leave out the gradient-similarity baseline's runs")
    p.add_argument("--bases", nargs="+", help="run these models' queries (names as in the plan, e.g. "
                                              "looks_style__looks_0) even before their truth is measured")
    p.add_argument("--samples_per_prompt", type=int, default=0,
                   help="score (and run) only the first K samples of each prompt, in seed order (0: all); the "
                        "table's sizing on 2 CPU cores")
    p.add_argument("--bench", default=str(BENCH))
    p.add_argument("--out", default=None, help="the runs' folder (default results/mini_abc/image_<split>, shared with "
                                               "the image-level comparison)")
    p.add_argument("--table_dir", default=str(REPO / "benchmarks" / "results" / "mini_abc"))
    p.add_argument("--laion_subset_size", type=int, default=N_LAION)
    p.add_argument("--unlearn_steps", type=int, default=SIZING["unlearn_steps"])
    p.add_argument("--fisher_dataset_size", type=float, default=TUNED["fisher_dataset_size"])
    args = p.parse_args()
    bench = Path(args.bench)
    root = Path(args.out or REPO / "results" / "mini_abc" / f"image_{args.split}")
    task_json = with_truth(bench, args.split, root, args.bases, args.samples_per_prompt)
    if not args.no_runs:
        ensure_runs(task_json, root, load_tasks(task_json), args)
    per_query, looks, ceilings, stats, labelled = evaluate(args.split, root, bench, args.samples_per_prompt)
    command = " ".join(["python -m benchmarks.counterfactual"] + [a for a in sys.argv[1:] if a != "--no_runs"])
    md = f"`{command}`\n\n" + markdown(args.split, per_query, looks, ceilings, stats, labelled)
    rows = [{"method": m, "kind": k, "metric": metric, "mean": mean_and_stderr([v for v in vals if v == v])[0]
             if any(v == v for v in vals) else float("nan"), "n": sum(v == v for v in vals)}
            for (m, k, metric), vals in per_query.items()]
    write_table(Path(args.table_dir), f"counterfactual_{args.split}", md, rows)
    plot(per_query, ceilings, Path(args.table_dir) / f"counterfactual_{args.split}.png")
    print(md)


if __name__ == "__main__":
    main()
