"""The paper's comparison on mini-AbC: AbU, its ablations and controls, and baselines, on one split.

    python -m benchmarks.mini_abc_comparison --split test                     # the README's table (about an hour)
    python -m benchmarks.mini_abc_comparison --split test --with_stop_rule    # + the stopping rule's three rows
    python -m benchmarks.mini_abc_comparison --split val --methods AbU ...    # tuning (validation only)

Runs stage 1 once (shared cache), each method into results/mini_abc/<split>/<method>/, scores each with
utils/evaluation.py (evaluate.py's scorer), and writes comparison.md / comparison.csv (Recall@{5,10,100}, mAP with
standard errors per family, wall time, collateral forgetting, image specificity, how far the exemplars' loss rise
stands out, AbU's margins over its wrong-image and noise-image controls) and comparison.png (Recall@10 against
mAP, like the paper's Figure 6). Reruns reuse finished queries.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from benchmarks.runner import (BENCH, COLOURS, REPO, SIZING, TUNED, abu_flags, canvas, check_all_timestep_losses,
                               common_flags, derive_arrays, labelled_task_file, run, stage1, timed, write_table)
from data.mini_abc_build.image_level import IMAGE_TEST_CASES, ImageLevelConfig
from utils.evaluation import load_result, mean_metric, overlap, score_queries
from utils.metrics import mean_and_stderr, rank_candidates
from utils.io import atomic_write, save_json
from utils.layout import EXEMPLAR_LOSS, LAION_LOSS, VISUALIZATION, ResultsLayout
from utils.tasks import FAMILIES, load_tasks

STOP_FLAGS = ["--stop_rule", "{stop_rule}", "--stop_target", "{stop_target}", "--stop_every", "{stop_every}"]
METHODS = {  # name: (kind, extra flags)
    "AbU": ("abu", []),
    "AbU, plain gradient ascent (no Fisher)": ("abu", ["--preconditioner", "none", "--unlearn_lr", "{sgd_lr}"]),
    # N of its own: at the K/V rows' N = 1e6 every weight moving diverges (docs/mini_abc.md)
    "AbU, all weights": ("abu", ["--weight_selection", "all", "--fisher_path", "{fisher_all}",
                                 "--fisher_dataset_size", "{all_weights_n}"]),
    "AbU, one step (lr x steps)": ("abu", ["--unlearn_steps", "1", "--unlearn_lr", "{one_step_lr}"]),
    "AbU, prompt without <new1>": ("abu", ["--drop_concept_token"]),
    "AbU, unscaled synth latent (authors)": ("abu", ["--unscaled_synth_latent"]),
    "AbU, wrong-image control": ("abu-wrong-image", []),
    # the prompt alone: the query's image replaced by Gaussian noise in latent space
    "AbU, noise-image control": ("abu", ["--noise_image"]),
    # the per-query stopping rule (docs/method.md, section 9; rule and target chosen on the validation split), with
    # controls of its own that stop by the same rule
    "AbU, stop rule": ("abu", STOP_FLAGS),
    "AbU, stop rule, wrong-image control": ("abu-wrong-image", STOP_FLAGS),
    "AbU, stop rule, noise-image control": ("abu", ["--noise_image"] + STOP_FLAGS),
    "random": ("baseline", ["--method", "random"]),
    "pixel cosine": ("baseline", ["--method", "pixel"]),
    "VAE-latent cosine": ("baseline", ["--method", "vae"]),
    "gradient similarity (Fisher-whitened, K/V)": ("baseline", ["--method", "gradient"]),
}


STOP_METHODS = [m for m in METHODS if m.startswith("AbU, stop rule")]
# the table's rows: the authors' unscaled latent (a pitfall of their release, not part of the method; docs/mini_abc.md)
# is left out by default, and the stopping rule's rows come with --with_stop_rule
DEFAULT_METHODS = [m for m in METHODS if m != "AbU, unscaled synth latent (authors)" and m not in STOP_METHODS]
IMAGE_METHODS = ["AbU", "AbU, plain gradient ascent (no Fisher)", "AbU, wrong-image control", "AbU, noise-image control",
                 "random", "pixel cosine", "VAE-latent cosine", "gradient similarity (Fisher-whitened, K/V)"]
IMAGE_LAION_SUBSET = ImageLevelConfig().pretraining_candidates  # the pretraining level's concepts are among these


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def wrong_image_tasks(tasks_path: Path, out_path: Path) -> Path:
    """Each query's image replaced by a query image of another model, a derangement, the prompt unchanged: of
    the same family (object or style) where the split has two models of it, else of any model of the families
    that have only one (the validation split; joined to another family's pool when that leaves one model)."""
    tasks = json.loads(tasks_path.read_text())
    rng = np.random.default_rng(0)
    groups = {}
    for i, t in enumerate(tasks):
        groups.setdefault(FAMILIES.get(t["test_case"], t["test_case"]), []).append(i)
    single = [g for g, idx in groups.items() if len({tasks[i]["model_path"] for i in idx}) < 2]
    pools = [idx for g, idx in groups.items() if g not in single]
    singles = sum((groups[g] for g in single), [])
    if pools and len({tasks[i]["model_path"] for i in singles}) == 1:
        pools[0] = pools[0] + singles
    else:
        pools.append(singles)
    for idx in filter(None, pools):
        images = [tasks[i]["synth_image_path"] for i in idx]
        perm = cross_model_derangement([tasks[i]["model_path"] for i in idx], rng)
        if perm is None:
            raise RuntimeError(f"cannot swap query images between models of {tasks_path}: no model may hold more "
                               f"than half of a pool's queries")
        for k, p in enumerate(perm):
            tasks[idx[k]]["synth_image_path"] = images[p]
    save_json(out_path, tasks)
    return out_path


def cross_model_derangement(models, rng, tries: int = 1000):
    """A permutation p with models[p[k]] != models[k] for every k: a random one if `tries` draws find it, else the
    queries grouped by model and shifted by the largest group's size (possible when no model holds more than
    half); None when impossible."""
    for _ in range(tries):
        perm = rng.permutation(len(models))
        if all(models[p] != models[k] for k, p in enumerate(perm)):
            return perm
    order = sorted(range(len(models)), key=lambda i: models[i])
    shift = max(models.count(m) for m in models) if models else 0
    if 2 * shift > len(models):
        return None
    perm = np.empty(len(models), dtype=np.int64)
    for j, i in enumerate(order):
        perm[i] = order[(j + shift) % len(models)]
    return perm


STYLE_QUERY = re.compile(r"^a picture of an? (.+) in the style of <new1> art$")


def object_match(rank, n_exemplar: int, prompt: str, captions, k: int = 10):
    """For a style query "a picture of a {object} in the style of <new1> art": the fraction of its top-k
    pretraining candidates whose caption names the object, and that fraction over all candidates (chance).
    High means the ranking follows the query's content, not the customized style. None for other prompts."""
    m = STYLE_QUERY.match(prompt)
    if not m:
        return None, None
    names = [f"a {m.group(1)}" in c for c in captions]
    top = [int(i) - n_exemplar for i in rank if i >= n_exemplar][:k]
    return float(np.mean([names[i] for i in top])), float(np.mean(names))


def score(layout: ResultsLayout, tasks, captions, dataroot, truth_tasks=None):
    """utils.evaluation's per-query rows (image-level metrics included), plus what the extra columns need.
    `truth_tasks`: the queries whose ground truth each result is scored against, when it is not the task's own (the
    wrong-image control runs query i's prompt on another query's image: it is scored as query i)."""
    results = [load_result(layout, t) for t in tasks]
    rows = score_queries(list(zip(truth_tasks or tasks, results)), dataroot=dataroot)
    for row, t, r in zip(rows, tasks, results):
        row.update(task=t, rank=r["rank"], query_loss=r.get("query_loss"), steps=r.get("unlearn_steps_taken"))
        row["object_match"], row["object_chance"] = object_match(r["rank"], r["n_exemplar"], t.prompt,
                                                                 captions[:len(r["rank"]) - r["n_exemplar"]])
    return rows


def mean_object_match(rows):
    pairs = [(r["object_match"], r["object_chance"]) for r in rows if r["object_match"] is not None]
    return tuple(float(np.mean(v)) for v in zip(*pairs)) if pairs else (float("nan"), float("nan"))


def loss_rises(layout: ResultsLayout, task):
    """(exemplars', pretraining candidates') loss rise after unlearning a query, one value per row, averaged over
    its T timesteps: what collateral forgetting and the exemplar rise z are computed from (loaded once)."""
    check_all_timestep_losses(layout, task)
    return tuple((after - before).reshape(len(before), -1).mean(1) for after, before in
                 ((np.load(layout.query_dir(task) / name), np.load(layout.loss_cache(task) / name))
                  for name in (EXEMPLAR_LOSS, LAION_LOSS)))


def collateral(rows, rises):
    """Mean LAION loss rise / the query's own loss rise (paper Table 3's collateral forgetting)."""
    ratios = []
    for r, (_, laion) in zip(rows, rises):
        if not r["query_loss"]:
            return float("nan")
        ratios.append(float(laion.mean()) / max(r["query_loss"][1] - r["query_loss"][0], 1e-12))
    return float(np.mean(ratios))


def exemplar_rise_z(rows, rises):
    """Per family, the mean over queries of how far the exemplars' mean loss rise stands above the pretraining
    candidates' rises, in their standard deviations. Large when unlearning hits the exemplars specifically,
    whether through the image or through the prompt's <new1>."""
    z = {"style": [], "object": []}
    for r, (ex, laion) in zip(rows, rises):
        if r["family"] in z:  # AbC's families: an image-level test case's exemplars are not all its answer
            z[r["family"]].append(float((ex.mean() - laion.mean()) / max(laion.std(), 1e-12)))
    return {f: float(np.mean(v)) if v else float("nan") for f, v in z.items()}


def image_share(layout: ResultsLayout, noise_layout: ResultsLayout, tasks, dataroot):
    """Per query, the candidates ranked by AbU's influence minus the noise-image control's (same cache, same
    noise, same prompt): what the query's image adds to what its prompt alone does. Score rows as `score`."""
    found = []
    for t in tasks:
        a, b = load_result(layout, t), load_result(noise_layout, t)
        found.append((t, {"n_exemplar": a["n_exemplar"],
                          "rank": rank_candidates(a["influence"] - b["influence"], a["n_exemplar"])}))
    return score_queries(found, dataroot=dataroot)


def specificity(rows, k: int = 10):
    """1 - mean top-k overlap between rankings of two queries of the same model (0: the image never matters)."""
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r["rank"][:k])
    overlaps = [overlap(a, b, k) for ranks in by_model.values() for i, a in enumerate(ranks)
                for b in ranks[i + 1:]]
    return 1 - float(np.mean(overlaps)) if overlaps else float("nan")


# the extra columns of a row that has none (a failed method, a derived row)
NO_EXTRA = {"collateral": float("nan"), "specificity": float("nan"), "style exemplar z": float("nan"),
            "object exemplar z": float("nan"), "style top-10 object match": float("nan"),
            "object match chance": float("nan")}
TEST_CASES = ("test_artchive", "test_bamfg", "test_unobserved_imagenet", "test_observed_imagenet")
# the image-level test cases (docs/mini_abc.md): same prompt, different image, different answer
IMAGE_CASES = dict(zip(IMAGE_TEST_CASES, ("customization, style", "customization, object", "pretraining, style")))
IMAGE_COLUMNS = ("auc", "auc (that style)", "image_ap", "ap")  # the metrics the table shows per image-level case


def summarize(name, rows, seconds, extra):
    steps = [r["steps"] for r in rows if r.get("steps") is not None]
    out = {"method": name, "n": len(rows), "seconds": round(seconds, 1),
           "mean steps": float(np.mean(steps)) if steps else float("nan"), **extra}
    groups = [("style", [r for r in rows if r["family"] == "style"]),
              ("object", [r for r in rows if r["family"] == "object"]), ("all", rows)]
    groups += [(tc[5:], [r for r in rows if r["test_case"] == tc]) for tc in TEST_CASES]
    for group, members in groups:
        for metric in ("recall@5", "recall@10", "recall@100", "ap"):
            out[f"{group} {metric}"], out[f"{group} {metric} se"] = mean_metric(members, metric)
    for tc in IMAGE_CASES:
        members = [r for r in rows if r["test_case"] == tc]
        for metric in IMAGE_COLUMNS:
            out[f"{tc[5:]} {metric}"], out[f"{tc[5:]} {metric} se"] = mean_metric(members, metric)
    return out


def md_text(name: str) -> str:
    """A method name as markdown table text: `<new1>` would otherwise read as an HTML tag and vanish."""
    return name.replace("<", "&lt;")


def markdown(table):
    head = ("| method | style R@10 | style mAP | object R@10 | object mAP | all R@5 | all R@100 | collateral | "
            "specificity | exemplar rise z (style / object) | style: top-10 names the object | unlearning steps | time (s) |")
    lines = [head, "|" + "---|" * 13]
    f = lambda r, k: f"{r[k]:.3f} ± {r[k + ' se']:.3f}"  # noqa: E731
    for r in table:
        lines.append(f"| {md_text(r['method'])} | {f(r, 'style recall@10')} | {f(r, 'style ap')} | {f(r, 'object recall@10')} | "
                     f"{f(r, 'object ap')} | {f(r, 'all recall@5')} | {f(r, 'all recall@100')} | "
                     f"{r['collateral']:.3f} | {r['specificity']:.2f} | "
                     f"{r['style exemplar z']:.1f} / {r['object exemplar z']:.1f} | {r['style top-10 object match']:.2f} | "
                     f"{r['mean steps']:.1f} | {r['seconds']:.0f} |")
    lines += ["", "Per test case, mAP (Recall@10):", "",
              "| method | " + " | ".join(tc[5:] for tc in TEST_CASES) + " |", "|" + "---|" * (len(TEST_CASES) + 1)]
    for r in table:
        lines.append(f"| {md_text(r['method'])} | " + " | ".join(
            f"{r[tc[5:] + ' ap']:.3f} ± {r[tc[5:] + ' ap se']:.3f} ({r[tc[5:] + ' recall@10']:.2f})"
            for tc in TEST_CASES) + " |")
    return "\n".join(lines) + "\n"


def image_markdown(table):
    """The image-level table: AUC per level and family (0.5: the ranking ignores the image), image mAP (the
    matching set as ground truth), and the model-level mAP of the customization level (AbC's ground truth)."""
    cases = list(IMAGE_CASES)
    head = ("| method | " + " | ".join(f"AUC, {IMAGE_CASES[tc]}" for tc in cases) + " | AUC, pretraining, every "
            "picture in that style | " + " | ".join(f"image mAP, {IMAGE_CASES[tc]}" for tc in cases) +
            " | model-level mAP, customization (style / object) | time (s) |")
    lines = [head, "|" + "---|" * (2 * len(cases) + 4)]
    f = lambda r, k: "–" if r[k] != r[k] else f"{r[k]:.3f} ± {r[k + ' se']:.3f}"  # noqa: E731
    for r in table:
        lines.append(f"| {md_text(r['method'])} | " + " | ".join(f(r, f"{tc[5:]} auc") for tc in cases) +
                     f" | {f(r, 'pretraining_style auc (that style)')} | " +
                     " | ".join(f(r, f"{tc[5:]} image_ap") for tc in cases) +
                     f" | {r['looks_style ap']:.3f} / {r['looks_object ap']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


CONTROLS = ("wrong-image control", "noise-image control")


def control_of(method: str, control: str, per_query):
    """The row that controls `method`: its own ("AbU, stop rule, wrong-image control") if the table has one,
    else AbU's ("AbU, wrong-image control")."""
    own = f"{method}, {control}"
    return own if own in per_query else f"AbU, {control}"


def margins(per_query, metric: str = "ap", groups=(("style", "family", "style"), ("object", "family", "object"))) -> str:
    """Each AbU row's `metric` minus each control's, per group (name, row key, value): the mean and standard error of
    the paired per-query difference (the control's query i is query i with its image swapped or replaced by
    noise)."""
    rows = [m for m in per_query if m.startswith("AbU") and not m.endswith(CONTROLS)]
    if not rows or not any(control_of(m, c, per_query) in per_query for m in rows for c in CONTROLS):
        return ""
    label = {"ap": "mAP", "auc": "AUC"}.get(metric, metric)
    lines = ["", f"AbU minus its controls, {label}, paired by query (mean ± standard error of the difference; a row "
             "with controls of its own is paired with those):", "",
             "| method | " + " | ".join(f"{c}: {g[0]}" for c in CONTROLS for g in groups) + " |",
             "|" + "---|" * (1 + len(groups) * len(CONTROLS))]
    for m in rows:
        cells = []
        for control in CONTROLS:
            c = control_of(m, control, per_query)
            for _, key, value in groups:
                d = [a[metric] - b[metric] for a, b in zip(per_query[m], per_query.get(c, []))
                     if a[key] == b[key] == value]
                mean, se = mean_and_stderr(d) if d else (float("nan"), float("nan"))
                cells.append(f"{mean:+.3f} ± {se:.3f}")
        lines.append(f"| {md_text(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table, path):
    """Recall@10 (x) against mAP (y), one colour per method (circle: object, square: style); the legend beside it
    names every method in full."""
    font_probe = canvas(1, 1)
    legend_w = 40 + max(int(font_probe[1].textlength(r["method"], font=font_probe[2])) for r in table)
    plot_w, h, pad = 620, max(620, 60 + 22 * len(table)), 70
    img, d, font = canvas(plot_w + legend_w + 20, h)
    right = plot_w
    d.rectangle([pad, 20, right, h - pad], outline="black")
    X = lambda v: pad + v * (right - pad)  # noqa: E731
    Y = lambda v: h - pad - v * (h - pad - 20)  # noqa: E731
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        d.text((X(v) - 10, h - pad + 6), f"{v:.2f}", fill="black", font=font)
        d.text((pad - 40, Y(v) - 7), f"{v:.2f}", fill="black", font=font)
    d.text(((pad + right) / 2 - 30, h - 30), "Recall@10", fill="black", font=font)
    d.text((8, 4), "mAP", fill="black", font=font)
    for i, r in enumerate(table):
        c = COLOURS[i % len(COLOURS)]
        for fam, shape in (("object", "o"), ("style", "s")):
            x, y = X(r[f"{fam} recall@10"]), Y(r[f"{fam} ap"])
            if x == x and y == y:
                (d.ellipse if shape == "o" else d.rectangle)([x - 6, y - 6, x + 6, y + 6], fill=c, outline="black")
        d.rectangle([right + 20, 30 + 22 * i, right + 32, 42 + 22 * i], fill=c, outline="black")
        d.text((right + 40, 29 + 22 * i), r["method"], fill="black", font=font)
    d.text((right + 20, 40 + 22 * len(table)), "circle: object, square: style", fill="black", font=font)
    atomic_write(path, lambda fh: img.save(fh, format="PNG"))


def plot_auc(table, path):
    """The image-level AUC of every method, one line each, a marker per level and family with its standard error;
    the dashed line at 0.5 is where a ranking that ignores the image lands."""
    cases = [(f"{tc[5:]} auc", IMAGE_CASES[tc]) for tc in IMAGE_CASES] + \
            [("pretraining_style auc (that style)", "pretraining, style (every picture in that style)")]
    _, probe, font = canvas(1, 1)
    label_w = 20 + max(int(probe.textlength(r["method"], font=font)) for r in table)
    row_h, top, plot_w = 36, 30, 520
    h = top + row_h * len(table) + 40 + 20 * len(cases)
    img, d, font = canvas(label_w + plot_w + 40, h)
    X = lambda v: label_w + 10 + v * plot_w  # noqa: E731
    bottom = top + row_h * len(table)
    d.rectangle([X(0), top - 10, X(1), bottom], outline="black")
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        d.text((X(v) - 10, bottom + 4), f"{v:.2f}", fill="black", font=font)
    for y in range(top - 10, bottom, 6):
        d.line([X(0.5), y, X(0.5), y + 3], fill="black")
    for i, r in enumerate(table):
        y = top + row_h * i + row_h // 2 - 6
        d.text((8, y - 7), r["method"], fill="black", font=font)
        for j, (key, _) in enumerate(cases):
            v, se = r[key], r[key + " se"]
            if v != v:
                continue
            c, yy = COLOURS[j], y + 7 * (j - 1.5)
            d.line([X(max(v - se, 0)), yy, X(min(v + se, 1)), yy], fill=c, width=2)
            d.ellipse([X(v) - 5, yy - 5, X(v) + 5, yy + 5], fill=c, outline="black")
    for j, (_, label) in enumerate(cases):
        y = bottom + 26 + 20 * j
        d.ellipse([X(0), y, X(0) + 10, y + 10], fill=COLOURS[j], outline="black")
        d.text((X(0) + 16, y - 2), f"AUC, {label}", fill="black", font=font)
    atomic_write(path, lambda fh: img.save(fh, format="PNG"))


def example_figure(layout: ResultsLayout, tasks, path: Path, width: int = 1400) -> None:
    """The first query of each test case with its top 10 (compute_influence.py's visualization.jpg), stacked."""
    from PIL import Image

    firsts = {}
    for t in tasks:
        firsts.setdefault(t.test_case, t)
    tiles = []
    for t in firsts.values():
        img = Image.open(layout.query_dir(t) / VISUALIZATION).convert("RGB")
        tiles.append(img.resize((width, round(img.height * width / img.width)), Image.LANCZOS))
    sheet = Image.new("RGB", (width, sum(t.height for t in tiles)), "white")
    y = 0
    for tile in tiles:
        sheet.paste(tile, (0, y))
        y += tile.height
    atomic_write(path, lambda fh: sheet.save(fh, format="PNG", optimize=True))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--cases", default="abc", choices=["abc", "image"],
                   help="abc: AbC's four test cases (tasks/<split>.json); image: the image-level test cases "
                        "(tasks/image_<split>.json: same prompt, different image, different answer)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of: " + "; ".join(METHODS) + " (default: every row but the authors' unscaled latent "
                        "and the stopping rule's; with --cases image, AbU, its no-Fisher ablation, its two controls "
                        "and the baselines)")
    p.add_argument("--bench", default=str(BENCH))
    p.add_argument("--out", default=None, help="default results/mini_abc/<split> (--cases image: image_<split>)")
    p.add_argument("--fisher_dataset_size", type=float, default=TUNED["fisher_dataset_size"])
    p.add_argument("--unlearn_lr", type=float, default=TUNED["unlearn_lr"])
    p.add_argument("--sgd_lr", type=float, default=TUNED["sgd_lr"])
    p.add_argument("--all_weights_n", type=float, default=TUNED["all_weights_n"], help="N of the all-weights row")
    p.add_argument("--laion_subset_size", type=int, default=None,
                   help="candidates: the first S pretraining images (0: all; default 600, --cases image 300)")
    p.add_argument("--time_samples", type=int, default=SIZING["time_samples"])
    p.add_argument("--batch_size", type=int, default=SIZING["batch_size"])
    p.add_argument("--unlearn_steps", type=int, default=SIZING["unlearn_steps"])
    p.add_argument("--unlearn_grad_accum_steps", type=int, default=SIZING["unlearn_grad_accum_steps"])
    p.add_argument("--with_stop_rule", action="store_true",
                   help="add the stopping rule's rows (the rule, its wrong-image and noise-image controls) to --methods")
    p.add_argument("--stop_rule", default=TUNED["stop_rule"], choices=["rise", "collateral"],
                   help="the stopping rule of the 'AbU, stop rule' rows")
    p.add_argument("--stop_target", type=float, default=TUNED["stop_target"])
    p.add_argument("--stop_every", type=int, default=TUNED["stop_every"])
    p.add_argument("--tag", default="", help="suffix for the method folders (tuning runs)")
    p.add_argument("--abu_extra", default="", help="extra compute_influence.py flags for every AbU row (tuning runs), "
                                                    "e.g. '--stop_rule rise --stop_target 2'")
    args = p.parse_args()
    image = args.cases == "image"
    if args.methods is None:
        args.methods = IMAGE_METHODS if image else DEFAULT_METHODS
    if args.laion_subset_size is None:
        args.laion_subset_size = IMAGE_LAION_SUBSET if image else SIZING["laion_subset_size"]
    if args.with_stop_rule:
        args.methods = list(args.methods) + [m for m in STOP_METHODS if m not in args.methods]
    bench = Path(args.bench)
    stem = f"image_{args.split}" if image else args.split
    out = Path(args.out or REPO / "results" / "mini_abc" / stem)
    task_json = bench / "tasks" / f"{stem}.json"
    load_tasks(task_json)  # checks the task file before any work
    captions = (bench / "abc" / "laion_subset" / "captions.txt").read_text().splitlines()
    dataroot = bench / "abc"
    if image:  # the labelled pairs; the file's other samples are the counterfactual benchmark's
        task_json = labelled_task_file(task_json, dataroot, out)
    n_laion = args.laion_subset_size or len(captions)
    flags = common_flags(bench, n_laion)
    device = ["--device", "cpu"]
    cache = out / "orig_loss"
    derive_arrays(bench, all_weights_fisher="AbU, all weights" in args.methods)  # the all-weights ablation's own Fisher
    ok, stage1_seconds = stage1(task_json, out, args, flags + device)
    if not ok:
        sys.exit("stage 1 failed; see the error above")
    values = {"sgd_lr": args.sgd_lr, "one_step_lr": args.unlearn_steps * args.unlearn_lr,
              "stop_rule": args.stop_rule, "stop_target": args.stop_target, "stop_every": args.stop_every,
              "fisher_all": bench / "abc" / "sd_fisher_all.pt", "all_weights_n": int(args.all_weights_n)}
    table, per_query, layouts = [], {}, {}
    for name in args.methods:
        kind, extra = METHODS[name]
        extra = [e.format(**values) for e in extra] + (args.abu_extra.split() if kind.startswith("abu") else [])
        result_dir = out / (slug(name) + args.tag)
        if kind.startswith("abu"):
            tj = wrong_image_tasks(task_json, out / "wrong_image_tasks.json") if kind == "abu-wrong-image" else task_json
            cmd = (["compute_influence.py", "--task_json", tj, "--result_dir", result_dir, "--loss_cache_dir", cache]
                   + abu_flags(args) + flags + device + extra)
        else:
            tj = task_json
            cmd = (["compute_baselines.py", "--task_json", task_json, "--result_dir", result_dir,
                    "--loss_cache_dir", cache] + flags + extra)
        ok, seconds = timed(result_dir, "influence.pkl", lambda: run(cmd))
        if not ok:  # a method that fails (e.g. diverges) is a row of the table, not the end of it
            table.append(summarize(f"{name}{args.tag} (failed: see log)", [], seconds, NO_EXTRA))
            write_outputs(out, table, stage1_seconds, per_query)
            continue
        layout = ResultsLayout(result_dir, cache)
        rows = score(layout, load_tasks(tj), captions, dataroot, truth_tasks=load_tasks(task_json))
        match, chance = mean_object_match(rows)
        unlearned = kind.startswith("abu")
        rises = [loss_rises(layout, r["task"]) for r in rows] if unlearned else None
        z = exemplar_rise_z(rows, rises) if unlearned else {"style": float("nan"), "object": float("nan")}
        extra_cols = {"collateral": collateral(rows, rises) if unlearned else float("nan"),
                      "specificity": specificity(rows), "style exemplar z": z["style"], "object exemplar z": z["object"],
                      "style top-10 object match": match, "object match chance": chance}
        table.append(summarize(name + args.tag, rows, seconds, extra_cols))
        per_query[name + args.tag] = rows
        layouts[name] = layout
        if name == "AbU":
            example_figure(layout, load_tasks(tj), out / f"examples{args.tag}.png")
        write_outputs(out, table, stage1_seconds, per_query, image)  # after every method: a failure later loses nothing
    # AbU only: the stopping rule's rows stop at different steps than their noise control, so their influences are
    # on different scales and a difference would not isolate the image
    if "AbU" in layouts and "AbU, noise-image control" in layouts:
        rows = image_share(layouts["AbU"], layouts["AbU, noise-image control"], load_tasks(task_json), dataroot)
        table.append(summarize(f"AbU, the image's share (influence minus the noise control's){args.tag}", rows, 0.0,
                               NO_EXTRA))
        write_outputs(out, table, stage1_seconds, per_query, image)
    print((image_markdown if image else markdown)(table))


def write_outputs(out: Path, table, stage1: float, per_query, image: bool = False) -> None:
    if image:
        groups = tuple((IMAGE_CASES[tc], "test_case", tc) for tc in IMAGE_CASES)
        md = (image_markdown(table) + f"\nStage 1 (shared by every AbU row): {stage1:.0f} s. AUC: the chance that a "
              f"candidate matching what the query's image shows is ranked above one matching its pair partner's image "
              f"(0.5 when a ranking ignores the image). Image mAP: AP with the matching set as ground truth over all "
              f"candidates.\n" + margins(per_query, "auc", groups))
        write_table(out, "comparison", md, table)
        plot_auc(table, out / "comparison.png")
        return
    chance = next((r["object match chance"] for r in table if r["object match chance"] == r["object match chance"]),
                  float("nan"))
    md = markdown(table) + (f"\nStage 1 (shared by every AbU row): {stage1:.0f} s. 'style: top-10 names the object': "
                            f"the fraction of a style query's top-10 pretraining candidates whose caption names the "
                            f"query's object (chance, over all candidates: {chance:.3f}). 'exemplar rise z': how many "
                            f"standard deviations of the pretraining candidates' loss rises the exemplars' mean rise "
                            f"stands above theirs (mean over queries). 'unlearning steps': the mean steps a query "
                            f"took.\n") + margins(per_query)
    write_table(out, "comparison", md, table)
    plot(table, out / "comparison.png")


if __name__ == "__main__":
    main()
