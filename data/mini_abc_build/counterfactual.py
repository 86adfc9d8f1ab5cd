"""Counterfactual ground truth for mini-AbC's customizations: what removing an exemplar does (docs/counterfactual.md).

The field's standard for "this training image influenced that output" is counterfactual: train without it and see
what changes (leave-one-out, and the linear datamodeling score of TRAK / D-TRAK over random half subsets). At the
customization level it is cheap: a mini-AbC customization is minutes on a CPU. For each chosen customized model
(a *base* here) this stage retrains the customization with the builder's own recipe (same prior-preservation
images, steps, learning rates, captions; data/mini_abc_build/customize.py) on sets of its exemplars:

  full@0            every exemplar, the model's own customization seed s0
  loo<j>@0          every exemplar but j (leave-one-out); a one-exemplar model's is the prior images alone
  half<m>@0         M random halves (models with at least 4 exemplars; each exemplar in about half of them)
  lookA@0, lookB@0  one look alone (two-look style models; a two-look object model's looks are its LOO sets)
  full@1, loo<j>@1  the same under a second training seed: the truth's own noise

and measures, under every retrained model, each query's conditional denoising loss under its own prompt: the
repo's loss loop (utils.losses.collect_losses) over both flips of the query's latent at T = 128 grid timesteps, with
seeded noise that is the same for every retrained model of a base (the query list and its order are fixed).
The committed model itself is measured too (set `committed`): the retrained full@0 should match it.

Queries: every sampled seed of the prompts a base is evaluated on. A two-look model's are the builder's own samples
(data/mini_abc_build/image_level.py, regenerated from the committed model at the builder's seeds; the labelled pair
samples keep their committed files and must match the regenerated ones), of the prompts that hold a labelled pair;
an AbC model's are its two queries and more seeds of their prompts (same guidance).

Outputs, under <out>/counterfactual/: plan.json (bases, sets, queries), losses/<base>/<set>.npz (per query row: the
mean loss over the T draws, and over 8 bands of timesteps; what made it), committed; models/ (the retrained
weights, not committed). The task files tasks/counterfactual_<split>.json hold every query; the image-level task
files gain the unlabelled samples. Each retrained model is a unit of work: claimed (two processes can share the
build), written atomically, skipped when done; a stopped build resumes.
"""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from data.mini_abc_build.common import PipeAsBase, train_captions
from data.mini_abc_build.image_level import LOOK_SPLITS, LOOKS, contrast_pairs, ink_colour, look_position

OUT_DIR = "counterfactual"
SECOND_SEED = 1  # set names end in @0 (the model's seed) or @1 (the second training seed)


@dataclass
class CounterfactualConfig:
    half_subsets: int = 16  # M random halves of a model with at least 4 exemplars (LDS)
    second_seed_offset: int = 5000  # the second training seed is s0 + this
    time_samples: int = 128  # grid timesteps per query row (both flips: 2 rows a query)
    loss_batch_size: int = 256  # a multiple of time_samples
    loss_seed: int = 0  # the noise of the loss loop (the same for every retrained model of a base)
    latent_seed: int = 0  # the VAE samples of the query images (the same for every retrained model)
    abc_seeds_per_prompt: int = 6  # an AbC model's samples a prompt: its query and this many - 1 more seeds
    bands: int = 8  # timestep bands the losses are also kept per
    loo_second_seed_abc: bool = True  # also LOO under the second seed for AbC models (required for two-look ones)
    coupled: bool = True  # a subset's run shares every random draw with the full set's (customize's `keep`)
    null_runs: int = 4  # full-set runs with a LOO-sized random share of draws perturbed (customize's `resample`)
    training_seeds: int = 10  # seeds of the full and LOO sets; past the first two they are tier 3 (the averaged truth)


# the AbC models that get a counterfactual truth: the first kept model of each test case in each split
ABC_TEST_CASES = ("test_artchive", "test_bamfg", "test_unobserved_imagenet", "test_observed_imagenet")


def base_name(model_path: str) -> str:
    """'models/looks_style/looks_0' -> 'looks_style__looks_0' (a folder name)."""
    return "__".join(Path(model_path).parts[1:])


# ------------------------------------------------------------------ the plan
def two_look_bases(builder, stage) -> List[dict]:
    """The kept two-look models of the image-level stage (image_level_log.json), with their recipe, seeds and every
    sample's prompt, planned again exactly as the stage planned them."""
    plan, log = builder.plan(), _load(builder.out / "image_level_log.json")
    cfg, out = stage.config, []
    kept = {(m["test_case"], m["model"], m["attempt"]) for m in log["models"] if m.get("kept")}
    for k, split in enumerate(LOOK_SPLITS):
        for family in ("style", "object"):
            for attempt in range(cfg.attempts):  # a style model keeps its plan across attempts, an object model not
                rng = np.random.default_rng(builder.config.seed + 300 + 10 * k)
                spec = stage.plan_looks_model(family, k, split, plan, rng, attempt if family == "object" else 0)
                if (spec["test_case"], spec["class_id"], attempt) in kept:
                    out.append(two_look_base(builder, cfg, spec, k, attempt))
                    break
    # two models of one name (a tiny build's few concepts) share a folder: the files are the last one's
    last = {b["model_path"]: i for i, b in enumerate(out)}
    return [b for i, b in enumerate(out) if last[b["model_path"]] == i]


def two_look_base(builder, cfg, spec: dict, k: int, attempt: int) -> dict:
    family = spec["family"][len("looks_"):]
    m = 200 + 2 * k + (family == "object")  # as ImageLevelStage.customize_and_sample numbers it
    recipe = asdict(builder.config.customization)
    if family == "style":
        recipe.update(asdict(builder.config.style_customization), steps=cfg.style_steps, lr=cfg.style_lr)
    prompt_of = [p for p in range(len(spec["prompts"])) for _ in range(cfg.seeds_per_prompt)]
    model_path = f"models/{spec['family']}/{spec['class_id']}"
    return {"name": base_name(model_path), "split": spec["split"], "kind": f"two-look {family}",
            "test_case": spec["test_case"], "model_path": model_path, "train_prompt": spec["train_prompt"],
            "category": spec["category"],
            "exemplars": [f"exemplar/{spec['family']}/{spec['class_id']}/{j:03d}.png" for j in range(len(spec["exemplars"]))],
            "captions": spec["captions"], "looks": [look for _, look in spec["exemplars"]],
            "recipe": recipe, "prior_index": m, "seed": builder.config.seed + m + 100 * attempt,
            "sampling": {"prompts": [spec["prompts"][p] for p in prompt_of], "prompt_of": prompt_of,
                         "seed": builder.config.seed + 20000 + 1000 * m + 100000 * attempt,
                         "guidance": cfg.looks_guidance,
                         "per_prompt": 1 if family == "style" else -(-cfg.pairs_per_model // len(spec["prompts"]))}}


def abc_bases(builder, config: CounterfactualConfig) -> List[dict]:
    """The first kept model of each of AbC's test cases in each split, with its recipe, seeds and query prompts."""

    plan, gates = builder.plan(), _load(builder.out / "gates_models.json")
    attempts = {}
    for a in gates["attempts"]:  # the last attempt is the one kept
        attempts[a["model"]] = a["attempt"]
    out, taken = [], set()
    for i, spec in enumerate(plan["models"]):
        key = (spec["test_case"], spec["split"])
        if key in taken or spec["class_id"] in gates["dropped"] or spec["class_id"] not in attempts:
            continue
        taken.add(key)
        style = spec["category"] == "art"
        recipe = asdict(builder.config.style_customization if style else builder.config.customization)
        n = config.abc_seeds_per_prompt
        prompts = [p for p in spec["prompts"] for _ in range(n)]
        prompt_of = [q for q in range(len(spec["prompts"])) for _ in range(n)]
        out.append({
            "name": base_name(f"models/{spec['family']}/{spec['class_id']}"), "split": spec["split"],
            "kind": f"AbC {'style' if style else 'object'}", "test_case": spec["test_case"],
            "model_path": f"models/{spec['family']}/{spec['class_id']}", "train_prompt": spec["train_prompt"],
            "category": spec["category"], "exemplars": spec["exemplar_paths"],
            "captions": (lambda c: [c] * len(spec["exemplar_paths"]) if isinstance(c, str) else c)(
                train_captions(spec, plan["names"])),
            "looks": None, "recipe": recipe, "prior_index": i,
            "seed": builder.config.seed + i + 100 * attempts[spec["class_id"]],
            # seed j of prompt q: j = 0 is the committed query (the builder's seed + 1000 i + q); the others are new
            "sampling": {"prompts": prompts, "prompt_of": prompt_of, "guidance": builder.config.query_guidance,
                         "seeds": [builder.config.seed + 1000 * i + q if j == 0 else
                                   builder.config.seed + 1000 * i + 100 * (q + 1) + j
                                   for q in range(len(spec["prompts"])) for j in range(n)]}})
    return out


def retrained_sets(base: dict, config: CounterfactualConfig) -> List[dict]:
    """The sets a base is retrained on: [{"name", "members" (exemplar indices), "seed", "tier"}], in build order
    within a tier. Tier 0: what the LOO truth and its seed ceiling need (with the null runs for the two-look
    models); 1: the halves (and the AbC style models' null runs); 2: the second seed's LOO of AbC style models (the
    two-look ones have theirs in tier 0) and the two-look style models' looks alone at every other training seed
    (the look truth's own noise); 3: the full and LOO sets at training seeds 2 .. training_seeds - 1, whose average the truth
    needs before its image-specific part rises above seed noise (docs/counterfactual.md)."""
    n, s0 = len(base["exemplars"]), base["seed"]
    s1 = s0 + config.second_seed_offset
    everyone = list(range(n))
    sets = [{"name": "full@0", "members": everyone, "seed": s0, "tier": 0},
            {"name": "full@1", "members": everyone, "seed": s1, "tier": 0}]
    for j in everyone:  # each exemplar's two seeds together: a stopped build has whole pairs for the ceiling
        for seed_index, seed in ((0, s0), (SECOND_SEED, s1)):
            tier = 2 if seed_index and base["kind"] == "AbC style" else 0
            if tier < 2 or config.loo_second_seed_abc:
                sets.append({"name": f"loo{j}@{seed_index}", "members": [i for i in everyone if i != j], "seed": seed,
                             "tier": tier})
    if base["looks"] is not None and n > 2:  # two-look style: each look alone (objects: the LOO sets already are)
        alone = [[i for i in everyone if base["looks"][i] == side] for side in (0, 1)]
        for k in range(config.training_seeds):  # tier 2: the look truth at the other seeds, its own noise (2 a seed)
            seed = s0 + k * config.second_seed_offset
            sets += [{"name": f"look{LOOKS[side]}@{k}", "members": alone[side], "seed": seed, "tier": 2 if k else 0}
                     for side in (0, 1)]
    if n > 2:  # null runs: as many training draws perturbed as a LOO set's, no exemplar's exposure changed
        # (customize's `resample`): what a LOO effect owes to perturbing the training alone. Two-look models in
        # tier 0, AbC style models in tier 1
        sets += [{"name": f"null{m}@0", "members": everyone, "resample": [1 / n, m], "seed": s0,
                  "tier": 0 if base["looks"] is not None else 1} for m in range(config.null_runs)]
    if n >= 4:  # M distinct halves, none a set already above (a look alone): a repeated set is the same model
        rng, taken = np.random.default_rng(s0 + 777), {tuple(s["members"]) for s in sets}
        halves = []
        for _ in range(1000 * config.half_subsets):
            if len(halves) == config.half_subsets:
                break
            half = tuple(sorted(int(i) for i in rng.choice(n, n // 2, replace=False)))
            if half not in taken:
                taken.add(half)
                halves.append(half)
        sets += [{"name": f"half{m:02d}@0", "members": list(h), "seed": s0, "tier": 1} for m, h in enumerate(halves)]
    for k in range(2, config.training_seeds):  # seed by seed, so that a stopped build has whole seeds to average
        seed = s0 + k * config.second_seed_offset
        sets += [{"name": f"full@{k}", "members": everyone, "seed": seed, "tier": 3}] + [
            {"name": f"loo{j}@{k}", "members": [i for i in everyone if i != j], "seed": seed, "tier": 3}
            for j in everyone]
    return sets


def _load(path: Path):
    from utils.io import load_json

    return load_json(path, "mini-AbC build record (run the builder's earlier stages)")


# ------------------------------------------------------------------ the stage
def look_sets(spec: dict):
    """The names (without @seed) of a plan base's sets that hold look A alone and look B alone, or None (no looks):
    `lookA`, `lookB` for a two-look style model, a two-look object model's leave-one-out sets (one exemplar a look)."""
    if spec["looks"] is None:
        return None
    names = {tuple(s["members"]): s["name"].split("@")[0] for s in spec["sets"] if s["name"].endswith("@0")}
    alone = [tuple(e for e, look in enumerate(spec["looks"]) if look == side) for side in (0, 1)]
    return [names[a] for a in alone] if all(a in names for a in alone) else None


def build_order(plan: dict, bases: Optional[List[str]] = None, max_tier: int = 2,
                sets: Optional[List[str]] = None) -> List[tuple]:
    """(base, set) pairs in build order: tier by tier up to `max_tier`, validation before test, bases in plan order,
    each chosen base's committed model measured first. `bases`: names of plan.json's bases (None: all); `sets`:
    shell patterns of set names (fnmatch, e.g. "look*@[0-3]"; None: all), to build part of a tier first.

    Raises InputError naming a base that the plan does not hold, or a pattern that matches no set of the chosen
    bases up to `max_tier` (a typo would otherwise build nothing and say nothing)."""
    from fnmatch import fnmatch

    from utils.errors import InputError

    known = [b["name"] for b in plan["bases"]]
    unknown = sorted(set(bases or []) - set(known))
    if unknown:
        raise InputError(f"--bases {' '.join(unknown)}: not in the counterfactual plan; its bases are "
                         f"{', '.join(known)}")
    chosen = [b for b in plan["bases"] if not bases or b["name"] in bases]
    wanted = [(b, s) for b in chosen for s in b["sets"] if s["tier"] <= max_tier]
    for pattern in sets or []:
        if not any(fnmatch(s["name"], pattern) for _, s in wanted):
            raise InputError(f"--sets {pattern}: matches no set of the chosen bases up to --max_tier {max_tier} "
                             "(names as in counterfactual/plan.json, e.g. 'loo*@1' or 'look*@[0-3]'; a higher "
                             "--max_tier plans more)")
    order = [(b, {"name": "committed", "members": None, "seed": None, "tier": -1}) for b in chosen]
    for tier in range(max_tier + 1):
        for split in ("val", "test"):
            order += [(b, s) for b in chosen if b["split"] == split for s in b["sets"] if s["tier"] == tier
                      and (not sets or any(fnmatch(s["name"], pattern) for pattern in sets))]
    return order


class CounterfactualStage:
    """The build stage `counterfactual` (data/build_mini_abc.py --stage counterfactual)."""

    def __init__(self, builder, config: CounterfactualConfig, image_level_config):
        from data.mini_abc_build.image_level import ImageLevelStage

        self.b, self.config = builder, config
        self.looks = ImageLevelStage(builder, image_level_config)
        self.dir = builder.out / OUT_DIR

    # ---- the plan and the queries (once; committed) ----
    def plan(self) -> dict:
        """plan.json: made once (it samples the queries), then read."""
        from utils.io import save_json

        path = self.dir / "plan.json"
        if path.is_file():  # sets added to the design since the plan was made join it; planned ones never change
            plan = _load(path)
            added = 0
            for base in plan["bases"]:
                known = {s["name"] for s in base["sets"]}
                new_sets = [s for s in retrained_sets(base, self.config) if s["name"] not in known]
                base["sets"] += new_sets
                added += len(new_sets)
            if added:
                save_json(path, plan)
            return plan

        bases = two_look_bases(self.b, self.looks) + abc_bases(self.b, self.config)
        for base in bases:
            base["queries"] = self.write_queries(base)
            base["sets"] = retrained_sets(base, self.config)
        plan = {"config": asdict(self.config), "bases": bases}
        save_json(path, plan)
        self.write_task_files(plan)
        return plan

    def write_queries(self, base: dict) -> List[dict]:
        """Sample the base's prompts at the builder's seeds from the committed model; keep the samples of the prompts
        that hold a labelled pair (two-look) or all (AbC). Labelled samples keep their committed files (checked
        against the new samples); the others are written under synth/.../seeds/. Returns the queries."""
        from data.mini_abc_build.sampling import load_pipeline, sample
        from utils.customization import apply_customization
        from utils.weights import PristineWeights

        root, s = self.b.root, base["sampling"]
        pipe = load_pipeline(self.b.sd_dir)
        pristine = PristineWeights(pipe.unet)
        apply_customization(PipeAsBase(pipe), pristine, root / base["model_path"])
        if "seeds" in s:  # one seed each (AbC): sample prompt by prompt
            images = sum((sample(pipe, [p], seed=seed, steps=self.b.config.sample_steps, guidance_scale=s["guidance"])
                          for p, seed in zip(s["prompts"], s["seeds"])), [])
        else:
            images = sample(pipe, s["prompts"], seed=s["seed"], steps=self.b.config.sample_steps,
                            guidance_scale=s["guidance"])
        pristine.restore()
        synth_dir = Path("synth") / Path(base["model_path"]).parts[1] / "gpt" / Path(base["model_path"]).parts[2]
        labelled = self.labelled_samples(base, images, synth_dir)
        keep_prompts = sorted({s["prompt_of"][i] for i in labelled}) if base["looks"] is not None \
            else sorted(set(s["prompt_of"]))
        per_prompt_seed, queries = {}, []
        for i, (prompt, p) in enumerate(zip(s["prompts"], s["prompt_of"])):
            j = per_prompt_seed[p] = per_prompt_seed.get(p, -1) + 1
            if p not in keep_prompts:
                continue
            if i in labelled:
                path, label, pair = labelled[i]
            else:
                path, label, pair = str(synth_dir / "seeds" / f"p{p:02d}_s{j:02d}.png"), None, None
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                images[i].save(root / path)
            queries.append({"path": path, "prompt": prompt, "prompt_index": p, "seed_index": j, "label": label,
                            "pair": pair})
        return queries

    def labelled_samples(self, base: dict, images, synth_dir: Path) -> Dict[int, tuple]:
        """{sample index: (committed path, label, pair)}: the two-look builder's pairs found again from the new
        samples (its look_position and contrast_pairs); an AbC model's committed queries (seed 0 of each prompt,
        label None). Raises RuntimeError when a committed file differs from its new sample by more than 2 levels."""
        from PIL import Image

        root, s = self.b.root, base["sampling"]
        if base["looks"] is None:  # seed 0 of prompt q is the committed query q
            found = {i: (str(synth_dir / "samples" / f"{q:05d}.png"), None, None) for i, (q, seed) in
                     enumerate(zip(s["prompt_of"], s["seeds"])) if seed == self.b.config.seed + 1000 * base["prior_index"] + q}
        else:
            ex = [Image.open(root / p).convert("RGB") for p in base["exemplars"]]
            colours = [np.mean([ink_colour(img) for img, look in zip(ex, base["looks"]) if look == side], axis=0)
                       for side in (0, 1)]
            position = [look_position(img, *colours) for img in images]
            cfg = self.looks.config
            pairs = contrast_pairs(s["prompt_of"], position, cfg.min_gap, cfg.pairs_per_model, s["per_prompt"])
            found = {}
            for pair, (ia, ib) in enumerate(pairs):
                for side, i in ((0, ia), (1, ib)):
                    found[i] = (str(synth_dir / "samples" / f"{2 * pair + side:05d}.png"), LOOKS[side], pair)
        for i, (path, _, _) in found.items():
            committed = np.asarray(Image.open(root / path).convert("RGB"), dtype=np.int16)
            if np.abs(committed - np.asarray(images[i].convert("RGB"), dtype=np.int16)).max() > 2:
                raise RuntimeError(f"{root / path} is not the sample the builder's seed gives again (sample {i} of "
                                   f"{base['model_path']}): the committed model or queries changed since they were "
                                   "built; rebuild the image_level and models stages first")
        return found

    def write_task_files(self, plan: dict) -> None:
        """tasks/counterfactual_<split>.json (every query of the truth), and the unlabelled two-look samples added
        to tasks/image_<split>.json and to their model's json entry (their answer is the model's, as AbC's)."""
        from utils.io import load_json, save_json

        tasks_dir = self.b.out / "tasks"
        for split in ("val", "test"):
            entries = []
            image_tasks = load_json(tasks_dir / f"image_{split}.json", "image-level task file")
            known = {t["synth_image_path"] for t in image_tasks}
            for base in (b for b in plan["bases"] if b["split"] == split):
                template = self.task_template(base)
                for q in base["queries"]:
                    entries.append({**template, "synth_image_path": q["path"], "prompt": q["prompt"]})
                    if base["looks"] is not None and q["path"] not in known:
                        image_tasks.append(entries[-1])
            save_json(tasks_dir / f"counterfactual_{split}.json", entries)
            save_json(tasks_dir / f"image_{split}.json", image_tasks)

    def task_template(self, base: dict) -> dict:
        from utils.io import load_json

        entries = load_json(self.b.root / "json" / f"{base['test_case']}.json", "ground truth")
        index = next(i for i, e in enumerate(entries) if e["class_id"] == Path(base["model_path"]).name)
        return {"test_case": base["test_case"], "test_case_ind": index, "model_path": base["model_path"],
                "train_prompt": base["train_prompt"], "category": base["category"]}

    # ---- the retrained models ----
    def work(self, plan: dict, bases: Optional[List[str]] = None, max_tier: int = 2,
             sets: Optional[List[str]] = None) -> List[tuple]:
        return build_order(plan, bases, max_tier, sets)

    def loss_file(self, base: dict, set_name: str) -> Path:
        return self.dir / "losses" / base["name"] / f"{set_name}.npz"

    def run(self, bases: Optional[List[str]] = None, max_tier: int = 2, sets: Optional[List[str]] = None) -> None:
        from tqdm.auto import tqdm

        from utils.claims import claim

        plan = self.plan()
        todo = [(b, s) for b, s in self.work(plan, bases, max_tier, sets) if not self.loss_file(b, s["name"]).is_file()]
        print(f"counterfactual: {len(todo)} retrained models to build and measure", flush=True)
        measurer = None
        for base, s in tqdm(todo, desc="counterfactual models", unit="model"):
            path = self.loss_file(base, s["name"])
            with claim(path.with_suffix(".claim"), f"{base['name']} {s['name']}") as mine:
                if not mine or path.is_file():  # another process has it, or finished it meanwhile
                    continue
                t0 = time.time()
                model_dir = self.b.root / base["model_path"] if s["name"] == "committed" else self.train(base, s)
                trained = time.time() - t0
                measurer = measurer if measurer is not None and measurer.base is base else TruthMeasurer(self, base)
                losses = measurer.measure(model_dir)
                self.save(path, base, s, losses, trained, time.time() - t0 - trained)

    def train(self, base: dict, s: dict) -> Path:
        """Customize the base model on the set's exemplars with the base's recipe and seed; the folder it wrote."""
        import torch
        from PIL import Image

        from data.mini_abc_build.customize import CustomizationConfig, customize
        from utils.models import load_base_model
        from utils.transforms import to_model_input

        images, captions, rows = self.pretraining()
        prior_imgs, prior_caps = self.b.prior_set({"category": base["category"]}, images, captions, rows,
                                                  base["prior_index"])
        chosen = range(len(base["exemplars"])) if self.config.coupled else s["members"]  # uncoupled: the set alone
        if not chosen:
            raise ValueError(f"{base['name']} {s['name']}: an uncoupled run needs an exemplar (coupled=True trains on "
                             "the prior images alone)")
        exemplars = torch.stack([to_model_input(Image.open(self.b.root / base["exemplars"][j]).convert("RGB"))
                                 for j in chosen])
        out = self.dir / "models" / base["name"] / s["name"]
        model = load_base_model(str(self.b.sd_dir), self.b.config.device)
        customize(model, exemplars, [base["captions"][j] for j in chosen], prior_imgs, prior_caps, out,
                  CustomizationConfig(**{**base["recipe"], "seed": s["seed"], "device": self.b.config.device}),
                  keep=s["members"] if self.config.coupled else None,  # coupled to the full set's run
                  resample=tuple(s["resample"]) if "resample" in s else None)
        return out

    def pretraining(self):
        if not hasattr(self, "_pretraining"):
            self._pretraining = self.b.pretraining_set()
        return self._pretraining

    def save(self, path: Path, base: dict, s: dict, losses: np.ndarray, train_seconds: float,
             measure_seconds: float) -> None:
        """losses [rows, T] -> <set>.npz: the per-row mean, the band means, and what made them."""
        from utils.io import atomic_write

        bands = np.stack([b.mean(axis=1) for b in np.array_split(losses, min(self.config.bands, losses.shape[1]), axis=1)],
                         axis=1)  # consecutive grid timesteps
        record = {"base": base["name"], "set": s, "coupled": self.config.coupled,
                  "queries": [q["path"] for q in base["queries"]],
                  "time_samples": self.config.time_samples, "loss_seed": self.config.loss_seed,
                  "latent_seed": self.config.latent_seed, "train_seconds": round(train_seconds, 1),
                  "measure_seconds": round(measure_seconds, 1)}
        atomic_write(path, lambda f: np.savez(f, loss=losses.astype(np.float64).mean(axis=1), bands=bands,
                                              record=np.array(json.dumps(record))))


class TruthMeasurer:
    """One base's queries as loss-loop candidates (VAE samples of both flips, fixed), measured at any retrained
    model of the base: per query row, its loss under its own prompt at T grid timesteps."""

    def __init__(self, stage: CounterfactualStage, base: dict):
        import torch

        from utils.data import load_exemplar_images
        from utils.encoders import encode_images
        from utils.models import load_base_model
        from utils.weights import PristineWeights

        self.stage, self.base, cfg = stage, base, stage.config
        self.model = load_base_model(str(stage.b.sd_dir), stage.b.config.device)
        self.pristine = PristineWeights(self.model.unet)
        paths = [stage.b.root / q["path"] for q in base["queries"]]
        self.latents = encode_images(self.model.vae, load_exemplar_images(paths, self.model.resolution),
                                     torch.Generator().manual_seed(cfg.latent_seed), batch_size=64)
        self.prompts = [q["prompt"] for q in base["queries"]]

    def measure(self, model_dir: Path) -> np.ndarray:
        """[2 n_queries, T]: rows 0..n-1 the queries, n..2n-1 their flips."""
        import torch

        from utils.customization import apply_customization
        from utils.data import ExemplarCandidates
        from utils.encoders import encode_prompt
        from utils.losses import collect_losses

        cfg, m = self.stage.config, self.model
        apply_customization(m, self.pristine, model_dir)
        text = {p: encode_prompt(m.tokenizer, m.text_encoder, p).cpu() for p in dict.fromkeys(self.prompts)}
        candidates = ExemplarCandidates(self.latents, torch.cat([text[p] for p in self.prompts]))
        losses = collect_losses(m.unet, m.scheduler, candidates, batch_size=cfg.loss_batch_size,
                                time_samples=cfg.time_samples, seed=cfg.loss_seed, device=self.stage.b.config.device,
                                desc="query losses", per_timestep=True)
        self.pristine.restore()
        return losses


# ------------------------------------------------------------------ reading the truth
def load_truth(bench: Path, base_name_: str, losses: str = "losses") -> dict:
    """One base's measured losses: {"queries": [paths], "sets": {set name: {"members", "seed"}}, "loss": {set name:
    [n_queries] (mean over both flips and the T draws)}, "bands": {set name: [n_queries, bands]}}, for every set
    measured so far under counterfactual/<losses>/ (losses_uncoupled: the first build's, kept for comparison)."""
    folder = Path(bench) / OUT_DIR / losses / base_name_
    out = {"queries": None, "sets": {}, "loss": {}, "bands": {}}
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as z:
            record = json.loads(str(z["record"]))
            n = len(record["queries"])
            out["queries"] = out["queries"] or record["queries"]
            if record["queries"] != out["queries"]:
                raise RuntimeError(f"{path} was measured on another query list than its base's other sets")
            out["sets"][record["set"]["name"]] = record["set"]
            out["loss"][record["set"]["name"]] = 0.5 * (z["loss"][:n] + z["loss"][n:])
            out["bands"][record["set"]["name"]] = 0.5 * (z["bands"][:n] + z["bands"][n:])
    return out
