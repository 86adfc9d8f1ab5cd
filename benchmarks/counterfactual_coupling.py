"""What coupling the training draws does to the counterfactual truth (docs/counterfactual.md, "Why the training
draws are coupled"): the same leave-one-out sets of one model measured by an uncoupled build (every set trained with
draws of its own; data/mini_abc/counterfactual/losses_uncoupled/) and by the coupled one (losses/), compared on the
exemplars both have at both training seeds.

    python -m benchmarks.counterfactual_coupling        # looks_style__looks_0, the model both builds measured

Per design: the LOO effects' agreement between the two training seeds (per-query Spearman over the exemplars, its
image-specific part, Kendall's tau), against how much two samples of one prompt agree (Kendall's tau, same seed):
a truth whose seed agreement is below its between-sample agreement is mostly training noise. `full@<s>` is the same
model in both designs (a coupled run that keeps every exemplar is the plain run bit for bit).
"""
import argparse
from pathlib import Path

import numpy as np

from benchmarks.runner import BENCH
from data.mini_abc_build.counterfactual import load_truth
from utils import counterfactual as cf
from utils.io import load_json


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default=str(BENCH))
    p.add_argument("--base", default="looks_style__looks_0")
    args = p.parse_args()
    root = Path(args.bench) / "counterfactual"
    plan = load_json(root / "plan.json", "counterfactual plan (python -m data.build_mini_abc --stage counterfactual)")
    spec = next(b for b in plan["bases"] if b["name"] == args.base)
    prompt_of = [q["prompt_index"] for q in spec["queries"]]
    coupled = load_truth(args.bench, args.base)["loss"]
    designs = {"uncoupled": {**load_truth(args.bench, args.base, "losses_uncoupled")["loss"],
                             **{k: v for k, v in coupled.items() if k.startswith("full")}},
               "coupled": coupled}
    both = [e for e in range(len(spec["exemplars"]))
            if all(f"loo{e}@{s}" in d for d in designs.values() for s in (0, 1))]
    print(f"{args.base}: {len(prompt_of)} queries, exemplars {both} (those both designs measured at both seeds)\n")
    print("| design | mean LOO effect, seed 0 / 1 | Spearman, two seeds | same, image-specific | Kendall tau, two seeds "
          "| Kendall tau, two samples of a prompt |")
    print("|---|---|---|---|---|---|")
    for name, loss in designs.items():
        effects = [np.stack([loss[f"loo{e}@{s}"] - loss[f"full@{s}"] for e in both], axis=1) for s in (0, 1)]
        seeds = np.nanmean(cf.per_query(effects[1], effects[0]))
        specific = np.nanmean(cf.per_query(cf.image_specific(effects[1], prompt_of),
                                           cf.image_specific(effects[0], prompt_of)))
        tau = np.nanmean([cf.kendall_tau(a, b) for a, b in zip(*effects)])
        samples = np.nanmean(cf.agreement_between_samples(effects[0], prompt_of))
        print(f"| {name} | {effects[0].mean():.3f} / {effects[1].mean():.3f} | {seeds:+.2f} | {specific:+.2f} | "
              f"{tau:+.2f} | {samples:+.2f} |")
    if "committed" in coupled:
        print(f"\nfull@0 retrained against the committed model: mean |loss change| "
              f"{np.abs(coupled['full@0'] - coupled['committed']).mean():.4f}")


if __name__ == "__main__":
    main()
