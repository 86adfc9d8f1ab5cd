"""Build mini-AbC (v2): a CPU-scale Attribution-by-Customization benchmark from real emoji, in many styles.

Same on-disk layout and formats as AbC, so the repo's scripts run on it unchanged:

    python -m data.build_mini_abc --out data/mini_abc                  # everything (docs/mini_abc.md: time)
    python -m data.build_mini_abc --out data/mini_abc --stage derive   # only the arrays not committed
    python -m data.build_mini_abc --out data/mini_abc --device cuda    # train on a GPU (the CPU path is the default)

Design (docs/mini_abc.md):
* 11 independently designed emoji sets draw the same concepts (data/mini_abc_build/sources.py). Four are
  training styles, each named by one word in captions ("a picture of a rocket in the style of outline art");
  four others are held out of pretraining for the style and observed-object test cases.
* Concepts: a few hundred everyday emoji (no symbols, no people), each drawn in every training style; a
  set of them is held out of pretraining entirely (unobserved objects, duotone exemplars).
* Base model: VAE, CLIP text encoder (CLIP's real BPE vocabulary) and UNet trained here from scratch, with
  an EMA of the weights; checkpointed, so a stopped build resumes.
* A judge (a small CNN trained on the pretraining images, concept and style heads) measures two gates:
  the base model follows prompts (concept and style of its samples) and each customization took (its
  queries look like its exemplars more than the base model's samples of the same prompts do).
* Four test cases, test and validation models (disjoint), customized by Custom Diffusion:
  - test_artchive (style): 8 exemplars drawn in one held-out emoji set; "a picture in the style of <new1> art";
  - test_bamfg (style, "duotone"): 8 held-out concepts recoloured with one two-colour palette; same prompt;
  - test_unobserved_imagenet (object): one exemplar, a held-out concept in a training style; "<new1> {category}";
  - test_observed_imagenet (object): one exemplar, a pretraining concept drawn in a held-out style.
  A style model trains on its exemplars captioned with their objects, an object model on its prompt.
* Queries: images synthesized by each customized model (DDIM, 50 steps, guidance 5) from AbC-like prompts.

Stages: data (fetch, choose, rasterize; writes plan.json) -> base -> judge (gate 1, base grid) -> models
(customize, synthesize, gate 2, grids) -> image_level (the test cases whose answer depends on the image:
data/mini_abc_build/image_level.py) -> derive (the arrays and Fishers not committed). Each later stage
reads plan.json, so any subset of stages can be rerun. Two more run only when named: counterfactual (retrained
customizations, docs/counterfactual.md) and pool (every icon of every set as a 28K-picture candidate pool in
<out>/pool/, data/mini_abc_build/pool.py).
"""
import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

from data.mini_abc_build import sources
from data.mini_abc_build.common import (HELDOUT_STYLES, STYLE_PROMPT, STYLE_QUERY, TRAINING_STYLES,
                                        PipeAsBase, duotone, slug, train_captions)
from data.mini_abc_build.counterfactual import CounterfactualConfig, CounterfactualStage
from data.mini_abc_build.customize import CustomizationConfig, customize
from data.mini_abc_build.image_level import ImageLevelConfig, ImageLevelStage, image_level_report
from data.mini_abc_build.judge import JudgeConfig, customization_gate, load_judge, prompt_gate, train_judge
from data.mini_abc_build.pool import build_pool
from data.mini_abc_build.sampling import load_pipeline, sample, save_grid
from data.mini_abc_build.tokenizer import build_clip_tokenizer
from data.mini_abc_build.train_base import BaseModelConfig, train_base_model
from utils.io import load_json, save_json
from utils.transforms import to_model_input

CATEGORY_WORDS = {"Objects": "object", "Travel & Places": "place", "Smileys & Emotion": "face",
                  "Food & Drink": "food", "Activities": "activity"}
CAPTIONS_WITH_STYLE = ("a {name} in the style of {style} art", "a picture of a {name} in the style of {style} art")
CAPTIONS_PLAIN = ("a {name}", "a picture of a {name}", "a {name}, a {category}")
OBJECT_QUERIES = ("a picture of a <new1> {category}", "a <new1> {category} in the style of google art",
                  "a <new1> {category} in the style of glossy art")
DUOTONES = [((40, 20, 90), (250, 200, 60)), ((0, 70, 60), (240, 150, 170)), ((110, 20, 20), (120, 220, 230)),
            ((20, 40, 110), (250, 120, 40)), ((60, 60, 60), (170, 240, 90)), ((90, 0, 90), (160, 230, 255))]
SPLITS = ("test", "test", "test", "val")  # per test case: three test models, one validation model


@dataclass
class BuildConfig:
    size: int = 32
    seed: int = 0
    n_concepts: int = 400  # drawn in every style set; the held-out ones never appear in pretraining
    n_heldout: int = 40
    queries_per_model: int = 2
    style_exemplars: int = 8
    style_caption_share: float = 0.7  # captions that name the style
    base: BaseModelConfig = field(default_factory=lambda: BaseModelConfig(
        unet_channels=(64, 128), text_layers=3, vae_steps=800, vae_lr=2e-3, diffusion_steps=5000,
        diffusion_batch_size=128, diffusion_lr=1e-3, diffusion_min_lr=1e-4, warmup_steps=200, ema_decay=0.999,
        log_every=100, checkpoint_every=250, threads=2))
    customization: CustomizationConfig = field(default_factory=lambda: CustomizationConfig(
        steps=250, batch_size=8, lr=1e-3, token_lr=1e-2))  # object models (one exemplar)
    style_customization: CustomizationConfig = field(default_factory=lambda: CustomizationConfig(
        steps=500, batch_size=8, lr=5e-3, token_lr=5e-2))  # style models (eight exemplars, captioned)
    gain_floor: float = 0.02  # gate 2: a model whose queries are not this much nearer its exemplars than the
    # base model's samples are (judge features, cosine) did not take
    query_guidance: float = 5.0  # classifier-free guidance of the queries (and the base's samples gate 2 compares)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    image_level: ImageLevelConfig = field(default_factory=ImageLevelConfig)  # the image-level test cases
    counterfactual: CounterfactualConfig = field(default_factory=CounterfactualConfig)  # retrained customizations
    gate_prompts: int = 100  # (concept, style) prompts sampled for gate 1
    gate_samples: int = 4  # images per prompt
    sample_steps: int = 50  # DDIM steps of every sample (queries, grids, gates); guidance 3 but for the queries
    fisher_samples: int = 20000
    fisher_samples_all: int = 2000
    max_concepts: int = 0  # 0 = all usable; a small number gives the tiny configuration of the tests
    device: str = "cpu"


def display_name(concept) -> str:
    """The everyday name ("red heart", "pizza"), else emoji-datasource's Unicode name."""
    return concept.cldr_name or concept.name


def usable_concepts(concepts, max_concepts: int = 0):
    """Concepts drawn by every style set used, in the categories a caption can name (no symbols, flags, people)."""
    styles = list(TRAINING_STYLES) + list(HELDOUT_STYLES)
    kept = [c for c in concepts if c.category in CATEGORY_WORDS and all(s in c.svgs for s in styles)]
    return kept[:max_concepts] if max_concepts else kept


# ---------------------------------------------------------------- the plan (data stage)
def choose_concepts(concepts, config: BuildConfig, rng: np.random.Generator):
    """(pretraining concepts, held-out concepts): n_concepts drawn evenly over the categories."""
    by_category: Dict[str, list] = {}
    for c in usable_concepts(concepts, config.max_concepts):
        by_category.setdefault(c.category, []).append(c)
    total = sum(len(v) for v in by_category.values())
    n = min(config.n_concepts, total)
    chosen = []
    for cat in sorted(by_category):
        members = by_category[cat]
        k = max(1, round(n * len(members) / total))
        chosen += [members[i] for i in sorted(rng.choice(len(members), min(k, len(members)), replace=False))]
    chosen = sorted(chosen, key=lambda c: c.key)
    order = rng.permutation(len(chosen))
    n_held = min(config.n_heldout, len(chosen) // 4)
    heldout = sorted((chosen[i] for i in order[:n_held]), key=lambda c: c.key)
    pretrain = sorted((chosen[i] for i in order[n_held:]), key=lambda c: c.key)
    return pretrain, heldout


def caption(concept, style: str, config: BuildConfig, rng: np.random.Generator) -> str:
    words = dict(name=display_name(concept), style=TRAINING_STYLES[style], category=CATEGORY_WORDS[concept.category])
    pool = CAPTIONS_WITH_STYLE if rng.random() < config.style_caption_share else CAPTIONS_PLAIN
    return pool[int(rng.integers(len(pool)))].format(**words)


def plan_models(pretrain, heldout, config: BuildConfig, rng: np.random.Generator) -> List[dict]:
    """Every customized model: test case, split, exemplars (concept key, style, palette), prompts."""
    specs = []
    for k, (split, style) in enumerate(zip(SPLITS, HELDOUT_STYLES)):
        chosen = sorted(rng.choice(len(pretrain), config.style_exemplars, replace=False))
        specs.append({"test_case": "test_artchive", "family": "artchive", "split": split, "class_id": slug(style),
                      "train_prompt": STYLE_PROMPT, "category": "art",
                      "exemplars": [(pretrain[i].key, style, None) for i in chosen]})
    for k, split in enumerate(SPLITS):
        chosen = sorted(rng.choice(len(heldout), config.style_exemplars, replace=False))
        specs.append({"test_case": "test_bamfg", "family": "bamfg", "split": split, "class_id": f"duotone_{k}",
                      "train_prompt": STYLE_PROMPT, "category": "art",
                      "exemplars": [(heldout[i].key, "noto", DUOTONES[k % len(DUOTONES)]) for i in chosen]})
    for test_case, pool, styles in (("test_unobserved_imagenet", heldout, ("noto",) * 4),
                                    ("test_observed_imagenet", pretrain, HELDOUT_STYLES)):
        for split, i, style in zip(SPLITS, rng.choice(len(pool), len(SPLITS), replace=False), styles):
            c = pool[int(i)]
            word = CATEGORY_WORDS[c.category]
            specs.append({"test_case": test_case, "family": "imagenet", "split": split,
                          "class_id": f"{c.key}_{slug(display_name(c))}"[:60], "category": word,
                          "train_prompt": f"<new1> {word}", "exemplars": [(c.key, style, None)]})
    for spec in specs:
        if spec["category"] == "art":
            objs = [display_name(pretrain[int(i)]) for i in rng.choice(len(pretrain), config.queries_per_model,
                                                                       replace=False)]
            spec["prompts"] = [STYLE_QUERY.format(obj=o) for o in objs]
        else:
            spec["prompts"] = [OBJECT_QUERIES[i % len(OBJECT_QUERIES)].format(category=spec["category"])
                               for i in range(config.queries_per_model)]
    return specs


def gates_report(out: Path) -> str:
    """Both gates as markdown, from gates_base.json and gates_models.json (the README's tables)."""
    base = load_json(out / "gates_base.json", "gate 1 (run the judge stage)")
    judge, prompts = base["judge"], base["prompts"]
    lines = ["Gate 1, the base model follows prompts (judge's reading of "
             f"{prompts['samples']} samples of {prompts['prompts']} prompts; chance in brackets):", "",
             "| | concept top-1 | concept top-5 | style top-1 |", "|---|---|---|---|",
             f"| judge on held-out pretraining images | {judge['concept_top1']:.2f} | {judge['concept_top5']:.2f} | "
             f"{judge['style_top1']:.2f} |",
             f"| judge on their VAE renderings | {judge['rendered_concept_top1']:.2f} | "
             f"{judge['rendered_concept_top5']:.2f} | {judge['rendered_style_top1']:.2f} |",
             f"| base model's samples | {prompts['concept_top1']:.2f} ({prompts['concept_chance_top1']:.3f}) | "
             f"{prompts['concept_top5']:.2f} ({prompts['concept_chance_top5']:.3f}) | "
             f"{prompts['style_top1']:.2f} ({prompts['style_chance_top1']:.2f}) |"]
    gates = load_json(out / "gates_models.json", "gate 2 (run the models stage)")
    last, tries = {}, {}
    for a in gates["attempts"]:
        last[a["model"]], tries[a["model"]] = a, tries.get(a["model"], 0) + 1
    lines += ["", f"Gate 2, each customization took (judge-feature cosine to the exemplars' centroid: the queries', "
              f"the base model's samples of the same prompts without `<new1>`, and the gain; threshold "
              f"{gates['threshold']:.3f}, floor {gates['floor']:.3f}; the last attempt):", "",
              "| test case | model | split | attempts | queries | base | gain | kept |", "|---|---|---|---|---|---|---|---|"]
    for m, a in last.items():
        lines.append(f"| {a['test_case'][5:]} | {m} | {a['split']} | {tries[m]} | {a['query_similarity']:.3f} | "
                     f"{a['base_similarity']:.3f} | {a['gain']:+.3f} | {'no' if m in gates['dropped'] else 'yes'} |")
    return "\n".join(lines) + "\n"


def without_concept_token(prompt: str) -> str:
    return " ".join(prompt.replace("<new1>", " ").split())


class Builder:
    def __init__(self, out: Path, config: BuildConfig, cache: Path):
        self.out, self.config, self.cache = Path(out), config, Path(cache)
        self.root = self.out / "abc"
        self.sd_dir = self.out / "sd-mini"
        self.plan_file = self.out / "plan.json"

    # ---------------------------------------------------------------- data
    def concepts(self):
        return {c.key: c for c in sources.load_concepts(sources.fetch_packages(self.cache / "npm"))}

    def data(self) -> None:
        cfg, rng = self.config, np.random.default_rng(self.config.seed)
        concepts = self.concepts()
        pretrain, heldout = choose_concepts(list(concepts.values()), cfg, rng)
        images_dir = self.root / "laion_subset" / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        rows, captions = [], []
        t0 = time.time()
        for concept in pretrain:  # row order: concept by concept, every training style
            for style in TRAINING_STYLES:
                sources.rasterize(concept.svgs[style], cfg.size).save(images_dir / f"{len(rows):06d}.png")
                captions.append(caption(concept, style, cfg, rng))
                rows.append({"key": concept.key, "style": style, "name": display_name(concept),
                             "category": CATEGORY_WORDS[concept.category]})
        (self.root / "laion_subset" / "captions.txt").write_text("\n".join(captions) + "\n")
        save_json(self.root / "laion_subset" / "sources.json", rows)
        specs = plan_models(pretrain, heldout, cfg, rng)
        for spec in specs:
            ex_dir = self.root / "exemplar" / spec["family"] / spec["class_id"]
            ex_dir.mkdir(parents=True, exist_ok=True)
            spec["exemplar_paths"] = []
            for j, (key, style, palette) in enumerate(spec["exemplars"]):
                img = sources.rasterize(concepts[key].svgs[style], cfg.size)
                (duotone(img, *palette) if palette else img).save(ex_dir / f"{j:03d}.png")
                spec["exemplar_paths"].append(f"exemplar/{spec['family']}/{spec['class_id']}/{j:03d}.png")
        styles_used = list(TRAINING_STYLES) + list(HELDOUT_STYLES)
        sources.write_notice(self.out / "NOTICE", styles_used, pool_only=sources.SETS)  # the pool: every set
        names = {c.key: display_name(c) for c in pretrain + heldout}
        save_json(self.plan_file, {
            "config": asdict(cfg), "training_styles": TRAINING_STYLES, "heldout_styles": list(HELDOUT_STYLES),
            "pretraining_concepts": [c.key for c in pretrain], "heldout_concepts": [c.key for c in heldout],
            "names": names, "categories": {c.key: CATEGORY_WORDS[c.category] for c in pretrain + heldout},
            "models": specs, "data_seconds": round(time.time() - t0)})
        print(f"data: {len(pretrain)} pretraining concepts x {len(TRAINING_STYLES)} styles = {len(rows)} images, "
              f"{len(heldout)} held-out concepts, {len(specs)} models planned ({time.time() - t0:.0f} s)", flush=True)

    def plan(self) -> dict:
        return load_json(self.plan_file, "mini-AbC plan (run the data stage first)")

    def pretraining_set(self):
        captions = (self.root / "laion_subset" / "captions.txt").read_text().splitlines()
        paths = sorted((self.root / "laion_subset" / "images").glob("*.png"))
        images = torch.stack([to_model_input(Image.open(p).convert("RGB")) for p in paths])
        return images, captions, load_json(self.root / "laion_subset" / "sources.json", "pretraining sources")

    # ---------------------------------------------------------------- base model
    def base(self) -> None:
        images, captions, _ = self.pretraining_set()
        tokenizer = build_clip_tokenizer(self.cache / "clip", self.cache / "clip" / "vocab")
        start = time.time()

        def progress(log):
            e = log.entries[-1]
            print(f"  [{time.time() - start:6.0f} s] {log.stage} step {e['step']}: loss {e['loss']:.4f}", flush=True)

        result = train_base_model(images, captions, tokenizer, self.sd_dir, self.config.base, progress)
        print(f"base model: {result['seconds']} s (this run), scaling factor {result['scaling_factor']}", flush=True)

    # ---------------------------------------------------------------- judge and gate 1
    def train_judge(self):
        """The judge (once: it depends on the data, not on the base model). Its style head learns the pretraining
        images' styles; its concept head also sees the pretraining concepts drawn by the sets that are not
        training styles, since three or four drawings a concept are too few to recognize one in a new drawing."""
        if (self.out / "judge" / "judge.pt").is_file():
            return load_judge(self.out / "judge"), load_json(self.out / "judge" / "accuracy.json", "judge accuracy")
        images, _, rows = self.pretraining_set()
        plan = self.plan()
        concepts, styles = plan["pretraining_concepts"], list(TRAINING_STYLES)
        labels = [concepts.index(r["key"]) for r in rows]
        style_labels = [styles.index(r["style"]) for r in rows]
        drawn = self.concepts()
        extra = [(c, s) for c, key in enumerate(concepts) for s in sources.SETS
                 if s not in TRAINING_STYLES and s in drawn[key].svgs]
        images = torch.cat([images, torch.stack([to_model_input(sources.rasterize(drawn[concepts[c]].svgs[s],
                                                                                   self.config.size))
                                                 for c, s in extra])])
        labels = torch.tensor(labels + [c for c, _ in extra])
        style_labels = torch.tensor(style_labels + [-1] * len(extra))
        t0 = time.time()
        judge, accuracy = train_judge(images, labels, style_labels, len(concepts), len(styles), self.config.judge,
                                      self.out / "judge", render=self.vae_render)
        accuracy["seconds"] = round(time.time() - t0)
        save_json(self.out / "judge" / "accuracy.json", accuracy)
        return judge, accuracy

    @torch.no_grad()
    def vae_render(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images encoded and decoded by the base model's VAE (posterior mode): how samples come out of it."""
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(self.sd_dir, subfolder="vae").eval()
        return torch.cat([vae.decode(vae.encode(images[i:i + batch_size]).latent_dist.mode()).sample.clamp(-1, 1)
                          for i in range(0, len(images), batch_size)])

    def judge(self) -> None:
        judge, accuracy = self.train_judge()
        plan = self.plan()
        report = {"judge": accuracy}
        pipe = load_pipeline(self.sd_dir)
        report["prompts"] = prompt_gate(pipe, judge, plan, self.config, list(TRAINING_STYLES))
        self.base_grid(pipe, plan)
        save_json(self.out / "gates_base.json", report)
        print(json.dumps(report, indent=1), flush=True)

    def base_grid(self, pipe, plan) -> None:
        rng = np.random.default_rng(self.config.seed + 7)
        keys = [plan["pretraining_concepts"][int(i)] for i in rng.choice(len(plan["pretraining_concepts"]), 8,
                                                                            replace=False)]
        rows, labels = [], []
        for style, word in TRAINING_STYLES.items():
            prompts = [f"a picture of a {plan['names'][k]} in the style of {word} art" for k in keys]
            rows.append(sample(pipe, prompts, seed=self.config.seed, steps=self.config.sample_steps))
            labels.append(f"... in the style of {word} art")
        rows.append(sample(pipe, [f"a picture of a {plan['names'][k]}" for k in keys], seed=self.config.seed,
                           steps=self.config.sample_steps))
        labels.append("a picture of a ... (no style)")
        save_grid(self.out / "grids" / "base_model_samples.png", rows, labels)
        (self.out / "grids" / "base_model_samples.txt").write_text(
            "columns: " + " | ".join(plan["names"][k] for k in keys) + "\n")

    # ---------------------------------------------------------------- customized models, queries, gate 2
    def models(self) -> None:
        """Customize every planned model, synthesize its queries, and keep it when gate 2 says it took.

        The validation models go first, held to config.gain_floor; they set the test models' threshold: half the median
        of their gains (judge.customization_gate), and never below the floor. A model under its threshold is
        customized again with another seed, twice at most, and dropped if it still falls short
        (gates_models.json records every attempt)."""
        plan = self.plan()
        judge = load_judge(self.out / "judge")
        pipe = load_pipeline(self.sd_dir)
        pretraining = self.pretraining_set()
        specs = plan["models"]
        order = [i for i, s in enumerate(specs) if s["split"] == "val"] + \
                [i for i, s in enumerate(specs) if s["split"] != "val"]
        made, threshold, log = {}, self.config.gain_floor, []
        for i in order:
            spec = specs[i]
            for attempt in range(3):
                made[i] = self.customize_model(spec, i, attempt, pipe, judge, pretraining,
                                               train_captions(spec, plan["names"]))
                gain = made[i]["gate"]["gain"]
                log.append({"model": spec["class_id"], "test_case": spec["test_case"], "split": spec["split"],
                            "attempt": attempt, **made[i]["gate"], "seconds": made[i]["seconds"]})
                print(f"  {spec['test_case']}/{spec['class_id']} ({spec['split']}, attempt {attempt}): "
                      f"{made[i]['gate']} in {made[i]['seconds']} s", flush=True)
                if gain >= threshold:
                    break
            made[i]["kept"] = made[i]["gate"]["gain"] >= threshold
            if spec["split"] == "val" and all(j in made for j in order if specs[j]["split"] == "val"):
                threshold = max(self.config.gain_floor, 0.5 * float(np.median([made[j]["gate"]["gain"] for j in made])))
        self.write_models(specs, made)
        save_json(self.out / "gates_models.json", {"floor": self.config.gain_floor, "threshold": threshold, "attempts": log,
                                                   "dropped": [specs[i]["class_id"] for i in made
                                                               if not made[i]["kept"]]})
        print(gates_report(self.out), flush=True)

    def image_level(self) -> None:
        """The image-level test cases (data/mini_abc_build/image_level.py): same prompt, different image,
        different answer."""
        ImageLevelStage(self, self.config.image_level).run()

    def counterfactual(self, bases=None, max_tier: int = 2, sets=None) -> None:
        """Counterfactual ground truth (data/mini_abc_build/counterfactual.py): chosen customizations retrained on
        subsets of their exemplars, every query's loss under each. Resumable; opt-in (hours on a CPU)."""
        CounterfactualStage(self, self.config.counterfactual, self.config.image_level).run(bases, max_tier, sets)

    def customize_model(self, spec, i: int, attempt: int, pipe, judge, pretraining, exemplar_captions) -> dict:
        """Train one model (seeded by its index and attempt), sample its queries and, from the base model, the
        same prompts without <new1> (same seeds); score gate 2."""
        from utils.customization import apply_customization
        from utils.models import load_base_model
        from utils.weights import PristineWeights

        images, captions, rows = pretraining
        ex_imgs = [Image.open(self.root / p).convert("RGB") for p in spec["exemplar_paths"]]
        prior_imgs, prior_caps = self.prior_set(spec, images, captions, rows, i)
        model_dir = self.root / "models" / spec["family"] / spec["class_id"]
        t0 = time.time()
        base = load_base_model(str(self.sd_dir), self.config.device)
        seed = self.config.seed + i + 100 * attempt
        recipe = self.config.style_customization if spec["category"] == "art" else self.config.customization
        result = customize(base, torch.stack([to_model_input(img) for img in ex_imgs]), exemplar_captions,
                           prior_imgs, prior_caps, model_dir, CustomizationConfig(
                               **{**asdict(recipe), "seed": seed, "device": self.config.device}))
        pristine = PristineWeights(pipe.unet)
        steps, guidance = self.config.sample_steps, self.config.query_guidance
        plain = sample(pipe, [without_concept_token(p) for p in spec["prompts"]], seed=self.config.seed + 1000 * i,
                       steps=steps, guidance_scale=guidance)
        apply_customization(PipeAsBase(pipe), pristine, model_dir)
        queries = sample(pipe, spec["prompts"], seed=self.config.seed + 1000 * i, steps=steps,
                         guidance_scale=guidance)
        pristine.restore()
        return {"exemplars": ex_imgs, "queries": queries, "plain": plain, "seconds": round(time.time() - t0),
                "gate": customization_gate(judge, ex_imgs, queries, plain),
                "loss": [float(np.mean(result["losses"][:20])), float(np.mean(result["losses"][-20:]))]}

    def write_models(self, specs, made) -> None:
        """The kept models' queries, ground-truth json, task files and the grid of every model."""
        tests = {tc: [] for tc in ("test_artchive", "test_bamfg", "test_observed_imagenet",
                                   "test_unobserved_imagenet")}
        tasks = {"test": [], "val": []}
        grids, labels = [], []
        for i, spec in enumerate(specs):
            m = made[i]
            if m["kept"]:
                self.write_queries(spec, m["queries"], tests, tasks)
            else:  # a dropped model leaves no queries behind (an earlier build may have kept it)
                shutil.rmtree(self.root / "synth" / spec["family"] / "gpt" / spec["class_id"], ignore_errors=True)
            blank = Image.new("RGB", (self.config.size,) * 2, "white")
            grids.append(m["exemplars"][:4] + [blank] + m["queries"] + [blank] + m["plain"])
            labels.append(f"{spec['split']} {spec['test_case'][5:]} {spec['class_id'][:24]}"
                          + ("" if m["kept"] else " (dropped)"))
        for name, entries in tests.items():
            save_json(self.root / "json" / f"{name}.json", entries)
        for split, entries in tasks.items():
            save_json(self.out / "tasks" / f"{split}.json", entries)
        save_json(self.out / "tasks" / "demo.json",
                  [t for t in tasks["test"] if t["test_case"] == "test_unobserved_imagenet"][:1])
        save_grid(self.out / "grids" / "customized_models.png", grids, labels)

    def write_queries(self, spec, queries, tests, tasks) -> None:
        synth_dir = self.root / "synth" / spec["family"] / "gpt" / spec["class_id"] / "samples"
        synth_dir.mkdir(parents=True, exist_ok=True)
        entry_index = len(tests[spec["test_case"]])
        synth_rel = []
        for q, (prompt, img) in enumerate(zip(spec["prompts"], queries)):
            rel = f"synth/{spec['family']}/gpt/{spec['class_id']}/samples/{q:05d}.png"
            img.save(self.root / rel)
            synth_rel.append(f"dataset/{rel}")
            tasks[spec["split"]].append({
                "synth_image_path": rel, "prompt": prompt, "test_case": spec["test_case"],
                "test_case_ind": entry_index, "model_path": f"models/{spec['family']}/{spec['class_id']}",
                "train_prompt": spec["train_prompt"], "category": spec["category"]})
        tests[spec["test_case"]].append({
            "exemplar": [f"dataset/{p}" for p in spec["exemplar_paths"]], "synth": {"gpt": synth_rel},
            "class_id": spec["class_id"], "category": None if spec["category"] == "art" else spec["category"],
            "split": spec["split"]})

    def prior_set(self, spec, images, captions, rows, m: int, n: int = 64):
        """Prior-preservation images: pretraining images of the same category (objects) or any (styles)."""
        rng = np.random.default_rng(self.config.seed + 100 + m)
        if spec["category"] == "art":
            pool = np.arange(len(captions))
        else:
            pool = np.array([i for i, r in enumerate(rows) if r["category"] == spec["category"]])
        idx = rng.choice(pool, min(n, len(pool)), replace=False)
        return images[idx], [captions[int(i)] for i in idx]


def derive(out: Path, config: BuildConfig, all_weights_fisher: bool = True, overwrite: bool = False) -> None:
    """laion_latents.npy, laion_text_embeddings.npy, sd_fisher.pt, sd_ekfac.safetensors and
    sd_ekfac_reduce.safetensors (the Kronecker-factored Fisher of the same samples, K-FAC-expand's and K-FAC-reduce's
    factors, for --preconditioner ekfac / kfac) and, for the all-weights ablation,
    sd_fisher_all.pt: made here, not committed, by the public paths a user's own benchmark takes
    (utils.candidate_arrays as data/encode_candidates.py, utils.fisher as compute_fisher.py).
    Files already there are kept unless `overwrite`."""
    from utils.candidate_arrays import encode_candidates
    from utils.data import LaionCandidates
    from utils.fisher import FisherConfig, write_fisher
    from utils.kfac import EKFAC_FILE, EKFAC_REDUCE_FILE
    from utils.models import load_base_model

    root = out / "abc"
    base = load_base_model(str(out / "sd-mini"), config.device)
    encode_candidates(base, root / "laion_subset" / "images", root / "laion_subset" / "captions.txt", root,
                      seed=config.seed, batch_size=256, overwrite=overwrite)
    laion = LaionCandidates(root, LaionCandidates(root, 1).total)
    for kind, approx, name in (("diagonal", "expand", "sd_fisher.pt"), ("ekfac", "expand", EKFAC_FILE),
                               ("ekfac", "reduce", EKFAC_REDUCE_FILE)):
        write_fisher(base, laion, root / name, FisherConfig(
            laion_subset_size=len(laion) // 2, num_samples=config.fisher_samples, batch_size=64, seed=config.seed,
            kind=kind, kfac_approx=approx), config.device, overwrite=overwrite)
    if all_weights_fisher:  # every weight, for the "all weights" ablation (one sample per backward: fewer samples)
        write_fisher(base, laion, root / "sd_fisher_all.pt", FisherConfig(
            laion_subset_size=len(laion) // 2, num_samples=config.fisher_samples_all, weight_selection="all",
            seed=config.seed), config.device, overwrite=overwrite)


STAGES = ("data", "base", "judge", "models", "image_level", "derive", "counterfactual", "pool")
# only when asked: the counterfactual truth (hours on a CPU, docs/counterfactual.md) and the large candidate pool
# (28K pictures, docs/performance.md)
DEFAULT_STAGES = STAGES[:-2]


def build(out, config: BuildConfig, stages=DEFAULT_STAGES, cache=None, overwrite: bool = False,
          all_weights_fisher: bool = True, bases=None, max_tier: int = 2, sets=None):
    out = Path(out)
    builder = Builder(out, config, Path(cache or REPO / "data" / ".cache"))
    times = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        t0 = time.time()
        if stage == "derive":
            derive(out, config, all_weights_fisher=all_weights_fisher, overwrite=overwrite)
        elif stage == "counterfactual":
            builder.counterfactual(bases, max_tier, sets)
        elif stage == "pool":
            build_pool(out, builder.cache, config.size, builder.sd_dir, config.device)
        else:
            getattr(builder, stage)()
        times[stage] = round(time.time() - t0)
    if set(stages) - {"derive", "counterfactual", "pool"}:
        log = out / "build_log.json"
        previous = json.loads(log.read_text()) if log.is_file() else {}
        save_json(log, {"config": asdict(config), "seconds": {**previous.get("seconds", {}), **times}})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/mini_abc")
    p.add_argument("--stage", choices=STAGES, action="append",
                   help="run only these stages (repeatable); counterfactual runs only when named")
    p.add_argument("--bases", nargs="+", default=None,
                   help="counterfactual: only these customized models (names as in counterfactual/plan.json, "
                        "e.g. looks_style__looks_0)")
    p.add_argument("--max_tier", type=int, default=2, choices=[0, 1, 2, 3],
                   help="counterfactual: 0 the leave-one-out sets and the second seed, 1 also the random halves, "
                        "2 also the second seed's leave-one-out of the AbC models, 3 also the full and leave-one-out "
                        "sets at the further training seeds (the seed-averaged truth; hours a model on a CPU)")
    p.add_argument("--sets", nargs="+", default=None,
                   help="counterfactual: only the sets whose names match these shell patterns (e.g. 'look*@[0-3]' "
                        "for each look alone at training seeds 0-3, 'full@1' 'loo*@1' for the second seed); within "
                        "--max_tier")
    p.add_argument("--device", default="cpu", help="where to train and sample (cpu or cuda)")
    p.add_argument("--diffusion_steps", type=int, default=None, help="override the base model's training steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--report", action="store_true", help="print both gates' tables from the built benchmark and exit")
    p.add_argument("--overwrite", action="store_true", help="derive: remake the arrays even if they exist")
    p.add_argument("--no_all_weights_fisher", action="store_true",
                   help="derive: skip sd_fisher_all.pt (only the comparison's all-weights ablation needs it)")
    args = p.parse_args(argv)
    if args.report:
        print(gates_report(Path(args.out)), end="")
        if (Path(args.out) / "image_level_log.json").is_file():
            print("\n" + image_level_report(Path(args.out)), end="")
        return
    config = BuildConfig(device=args.device)
    config.base.device = args.device
    if args.diffusion_steps:
        config.base.diffusion_steps = args.diffusion_steps
    if args.threads:
        torch.set_num_threads(args.threads)
        config.base.threads = args.threads
    build(args.out, config, args.stage or DEFAULT_STAGES, overwrite=args.overwrite,
          all_weights_fisher=not args.no_all_weights_fisher, bases=args.bases, max_tier=args.max_tier, sets=args.sets)


if __name__ == "__main__":
    from utils.cli import run

    run(main)
