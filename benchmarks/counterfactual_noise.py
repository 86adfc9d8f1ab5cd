"""Where the counterfactual truth's noise comes from, and whether it is the exemplar's (docs/counterfactual.md, "Is
the truth the exemplar's?"): one model's leave-one-out effects read three ways.

    python -m benchmarks.counterfactual_noise                      # looks_style__looks_0 (validation)
    python -m benchmarks.counterfactual_noise --base looks_style__looks_2

* **draws**: the same trained models, the effects from the even timestep bands against the odd ones (64 of the
  128 shared (t, noise) draws each): how well the loss loop measures one training's effect.
* **training seeds**: the effects at the model's seed against the second seed (`@1`, all draws): whether another
  training run of the same sets gives the same effect.
* **null runs**: `null<m>@0` is the full set trained with the model's seed and a random 1/n of its exemplar draws
  drawn again uniformly (data/mini_abc_build/customize.py, `resample`): about as many draws perturbed as leaving
  one exemplar out perturbs, no exemplar's exposure changed. Its loss change is what perturbing the training does
  alone. A LOO effect that is the exemplar's stands out from the null runs' spread.
* **the look-level truth** (two-look models): the dependence on look A (each look alone retrained) at the two
  seeds, per prompt across its samples.

Agreements: per query, Spearman over the exemplars (mean over queries), for the whole effect and its image-specific
part (minus the mean over the other samples of the query's prompt). Spreads: per query, the standard deviation over
its exemplars (LOO) or over the null runs, averaged over queries: the spread a ranking's ordering is judged on.
Seeds needed: by Spearman-Brown, how many training seeds averaged would bring the seed agreement to 0.5 and 0.8;
where tier 3's further seeds are built, the agreement of k-seed averages measured against that prediction.
Prints markdown; writes nothing.
"""
import argparse
from pathlib import Path

import numpy as np

from benchmarks.runner import BENCH
from data.mini_abc_build.counterfactual import load_truth, look_sets
from utils import counterfactual as cf
from utils.errors import InputError
from utils.io import load_json


def agreement(a: np.ndarray, b: np.ndarray, prompt_of, specific: bool) -> float:
    """Mean over queries of the per-query Spearman between two [n_queries, n_exemplars] effect tables."""
    if specific:
        a, b = cf.image_specific(a, prompt_of), cf.image_specific(b, prompt_of)
    return float(np.nanmean(cf.per_query(a, b)))


def seeds_needed(r1: float, target: float) -> float:
    """Spearman-Brown: training seeds S whose average agrees with another S-seed average at `target`, from the
    agreement r1 of single seeds (inf when r1 <= 0)."""
    return target * (1 - r1) / (r1 * (1 - target)) if r1 > 0 else float("inf")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default=str(BENCH))
    p.add_argument("--base", default="looks_style__looks_0")
    args = p.parse_args()
    plan = load_json(Path(args.bench) / "counterfactual" / "plan.json",
                     "counterfactual plan (python -m data.build_mini_abc --stage counterfactual)")
    spec = next((b for b in plan["bases"] if b["name"] == args.base), None)
    if spec is None:
        raise InputError(f"--base {args.base}: not in the counterfactual plan; its bases are "
                         f"{', '.join(b['name'] for b in plan['bases'])}")
    n, prompt_of = len(spec["exemplars"]), [q["prompt_index"] for q in spec["queries"]]
    truth = load_truth(args.bench, args.base)
    loss, bands = truth["loss"], truth["bands"]
    measured = cf.measured_seeds(loss, n)
    print(f"{args.base}: {len(prompt_of)} queries of {len(set(prompt_of))} prompts, {n} exemplars; "
          f"`python -m benchmarks.counterfactual_noise --base {args.base}`\n")
    if {0, 1} <= set(measured):
        loo_noise(loss, bands, n, prompt_of)
    else:
        print(f"The leave-one-out sets are measured at training seeds {measured or 'none'}: their noise needs seeds 0 "
              f"and 1 (python -m data.build_mini_abc --stage counterfactual --max_tier 0 --bases {args.base})")
    look_agreement(loss, prompt_of, look_sets(spec))


def loo_noise(loss, bands, n: int, prompt_of) -> None:
    """The leave-one-out truth's noise read three ways (draws, training seeds, null runs) and the seeds it needs."""
    d = {s: cf.loo_effects(loss, n, s) for s in (0, 1)}
    by_band = {s: cf.loo_effects(bands, n, s) for s in (0, 1)}  # [n_queries, n_exemplars, bands]
    even, odd = ({s: by_band[s][..., k::2].mean(axis=-1) for s in (0, 1)} for k in (0, 1))
    nulls = sorted(k for k in loss if k.startswith("null") and k.endswith("@0"))
    null = np.stack([loss[k] - loss["full@0"] for k in nulls], axis=1) if nulls else None  # [n_queries, runs]

    print(f"{len(nulls)} null runs.\n")
    print("| agreement (Spearman over exemplars, mean over queries) | whole effect | image-specific part |")
    print("|---|---|---|")
    for name, a, b in (("draws: even vs odd timestep bands, seed 0", even[0], odd[0]),
                       ("draws: even vs odd timestep bands, seed 1", even[1], odd[1]),
                       ("training seeds: seed 0 vs seed 1 (all draws)", d[0], d[1])):
        whole, specific = agreement(a, b, prompt_of, False), agreement(a, b, prompt_of, True)
        print(f"| {name} | {whole:+.2f} | {specific:+.2f} |")

    print("\n| loss change against full@0 | mean | spread within a query | same, image-specific |")
    print("|---|---|---|---|")
    tables = [("leave one out, seed 0", d[0]), ("leave one out, seed 1 (against full@1)", d[1])]
    if null is not None:
        tables.append((f"null runs ({len(nulls)})", null))
    for name, x in tables:
        spread = np.nanmean(np.std(x, axis=1, ddof=1))
        specific = np.nanmean(np.std(cf.image_specific(x, prompt_of), axis=1, ddof=1))
        print(f"| {name} | {np.mean(x):+.4f} | {spread:.4f} | {specific:.4f} |")
    if null is not None:
        share = [np.nanmean(np.var(null, axis=1, ddof=1)) / np.nanmean(np.var(d[s], axis=1, ddof=1)) for s in (0, 1)]
        print(f"\nShare of a query's LOO spread that perturbing the training alone gives (null variance / LOO "
              f"variance, within queries): {share[0]:.2f} at seed 0, {share[1]:.2f} at seed 1.")

    # the single-seed agreement from every pair of the seeds measured (seed 0 against 1 until tier 3 adds more)
    measured = cf.measured_seeds(loss, n)
    seeds = {"whole": cf.seed_average_agreement(loss, n, 1),
             "image-specific": cf.seed_average_agreement(loss, n, 1, prompt_of)}
    print(f"\nTraining seeds to average (Spearman-Brown on the agreement of single seeds, every pair of the "
          f"{len(measured)} measured: {seeds['whole']:+.2f} whole, {seeds['image-specific']:+.2f} image-specific):")
    for part, r1 in seeds.items():
        print(f"* {part}: {seeds_needed(r1, 0.5):.1f} seeds for 0.5, {seeds_needed(r1, 0.8):.1f} for 0.8")
    seed_curve(loss, n, prompt_of)


def look_agreement(loss, prompt_of, alone) -> None:
    """The look-level truth (two-look models: L(look B alone) - L(look A alone), a whole look removed at once; `alone`
    the two sets' names) against itself at other seeds: per prompt, Spearman across its samples; k-seed averages
    where 2k are built."""
    seeds = cf.look_seeds(loss, alone) if alone else []
    if len(seeds) < 2:
        return
    print(f"\nThe look-level truth against itself at other training seeds (seeds {seeds} of each look alone; per "
          "prompt, Spearman across its samples, mean over prompts and over pairs of disjoint k-seed groups):\n")
    print("| seeds averaged, k | measured | Spearman-Brown from k = 1 |")
    print("|---|---|---|")
    r1 = cf.look_average_agreement(loss, 1, prompt_of, alone=alone)
    for k in range(1, len(seeds) // 2 + 1):
        print(f"| {k} | {cf.look_average_agreement(loss, k, prompt_of, alone=alone):+.2f} | "
              f"{cf.spearman_brown(r1, k):+.2f} |")
    dependence = cf.look_dependence(loss, alone)
    per_prompt = cf.per_prompt_spearman(dependence[0], dependence[1], prompt_of)
    print(f"\nSeed 0 against seed 1, per prompt: {', '.join(f'{v:+.2f}' for v in per_prompt)}")


def seed_curve(loss, n: int, prompt_of) -> None:
    """Measured: the LOO truth averaged over k training seeds against another k-seed average (disjoint seeds), next
    to what the Spearman-Brown step predicts from k = 1 (every pair of single seeds)."""
    seeds = cf.measured_seeds(loss, n)
    if len(seeds) < 4:
        print(f"\n{len(seeds)} training seeds measured (full and every LOO set): the averaged truth's agreement "
              "needs 4 or more (python -m data.build_mini_abc --stage counterfactual --max_tier 3)")
        return
    print(f"\nThe truth averaged over k training seeds, against another k-seed average (seeds {seeds}; up to 64 "
          "random pairs of disjoint groups, per-query Spearman over exemplars); predicted: Spearman-Brown from k = 1")
    print("\n| seeds averaged, k | whole: measured | whole: predicted | image-specific: measured | "
          "image-specific: predicted |")
    print("|---|---|---|---|---|")
    r1 = {part: cf.seed_average_agreement(loss, n, 1, p) for part, p in (("whole", None), ("specific", prompt_of))}
    for k in range(1, len(seeds) // 2 + 1):
        cells = []
        for part, p in (("whole", None), ("specific", prompt_of)):
            cells += [f"{cf.seed_average_agreement(loss, n, k, p):+.2f}", f"{cf.spearman_brown(r1[part], k):+.2f}"]
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    from utils.cli import run

    run(main)
