"""Build mini-AbC: a CPU-scale Attribution-by-Customization benchmark from real emoji images.

Same on-disk layout and formats as AbC, so the repo's scripts run on it unchanged:

    python data/build_mini_abc.py --out data/mini_abc                 # everything (about 40 min on 2 cores)
    python data/build_mini_abc.py --out data/mini_abc --stage derive  # only the arrays not committed (seconds)

Design (see README "mini-AbC"):
* Pretraining set (plays LAION): the Google (Noto) and Twitter (Twemoji) emoji of every concept except a
  held-out set, 32 px, one caption each from templates that teach every word the prompts below use
  ("a picture of a cat face in the style of google art", "a cat face, a face", ...).
* Base model: VAE, CLIP text encoder (real CLIP BPE vocabulary) and UNet trained here from scratch.
* Four test cases, each with test and validation models (disjoint), customized by Custom Diffusion:
  - test_artchive (style): exemplars = OpenMoji emoji drawn by one designer (a style never seen);
    "a picture in the style of <new1> art".
  - test_bamfg (second style family, "duotone"): exemplars = held-out concepts (Google images) recoloured
    with one two-colour palette; same prompt.
  - test_unobserved_imagenet (object): one exemplar, the Google image of a held-out concept;
    "<new1> {category}".
  - test_observed_imagenet (object): one exemplar, the OpenMoji image of a concept that IS in pretraining
    (in a style the base model never saw); "<new1> {category}".
* Queries: images synthesized by each customized model (DDIM, 50 steps, guidance 3) from AbC-like prompts.
"""
import argparse
import hashlib
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.mini_abc_build import sources  # noqa: E402
from data.mini_abc_build.customize import CustomizationConfig, customize  # noqa: E402
from data.mini_abc_build.sampling import load_pipeline, sample, save_grid  # noqa: E402
from data.mini_abc_build.tokenizer import build_clip_tokenizer  # noqa: E402
from data.mini_abc_build.train_base import BaseModelConfig, train_base_model  # noqa: E402
from utils.io import save_json  # noqa: E402
from utils.transforms import to_model_input  # noqa: E402

CATEGORY_WORDS = {"People & Body": "person", "Objects": "object", "Symbols": "symbol", "Travel & Places": "place",
                  "Smileys & Emotion": "face", "Food & Drink": "food", "Activities": "activity"}
VENDORS = ("google", "twitter")
CAPTIONS = ("a {name}", "a picture of a {name}", "a {name} in the style of {vendor} art",
            "a picture of a {name} in the style of {vendor} art", "a {name}, a {category}")
STYLE_PROMPT = "a picture in the style of <new1> art"
STYLE_QUERY = "a picture of a {obj} in the style of <new1> art"
OBJECT_QUERIES = ("a picture of a <new1> {category}", "a <new1> {category} in the style of google art",
                  "a <new1> {category} in the style of twitter art")
DUOTONES = [((40, 20, 90), (250, 200, 60)), ((0, 70, 60), (240, 150, 170)), ((110, 20, 20), (120, 220, 230)),
            ((20, 40, 110), (250, 120, 40)), ((60, 60, 60), (170, 240, 90)), ((90, 0, 90), (160, 230, 255)),
            ((30, 80, 20), (255, 230, 180)), ((0, 0, 0), (255, 80, 80))]


@dataclass
class BuildConfig:
    size: int = 32
    seed: int = 0
    n_heldout: int = 60  # concepts kept out of pretraining (unobserved objects, duotone exemplars)
    models_per_case: Dict[str, int] = field(default_factory=lambda: {"test": 3, "val": 1})
    queries_per_model: int = 2
    style_exemplars: int = 8
    base: BaseModelConfig = field(default_factory=lambda: BaseModelConfig(
        vae_steps=800, vae_lr=2e-3, diffusion_steps=4000, diffusion_lr=1e-3, threads=2))
    customization: CustomizationConfig = field(default_factory=lambda: CustomizationConfig(
        steps=250, batch_size=8, lr=1e-3, token_lr=1e-2))
    fisher_samples: int = 20000
    fisher_samples_all: int = 2000
    max_concepts: int = 0  # 0 = all; a small number gives the tiny configuration of the tests


def category_word(concept) -> str:
    if concept.category == "Animals & Nature":
        return "plant" if concept.subcategory.startswith("plant") else "animal"
    return CATEGORY_WORDS[concept.category]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def usable_concepts(concepts, max_concepts: int):
    """Drop flags and skin-tone swatches, and any concept whose picture is byte-identical to another's."""
    kept = [c for c in concepts if c.category in CATEGORY_WORDS or c.category == "Animals & Nature"]
    kept = [c for c in kept if c.google_png and c.twitter_png and c.openmoji_svg]
    seen, unique = {}, []
    for c in kept:
        digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (c.google_png, c.twitter_png,
                                                                             c.openmoji_svg)]
        if any(d in seen for d in digests):
            continue
        seen.update({d: c.key for d in digests})
        unique.append(c)
    return unique[:max_concepts] if max_concepts else unique


def duotone(img: Image.Image, dark, light) -> Image.Image:
    """Map luminance onto a two-colour ramp, keeping the white background white."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    lum = (arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None] / 255.0
    out = (1 - lum) * np.array(dark, np.float32) + lum * np.array(light, np.float32)
    background = (arr.min(axis=-1, keepdims=True) > 245)
    out = np.where(background, 255.0, out)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


class Builder:
    def __init__(self, out: Path, config: BuildConfig, cache: Path):
        self.out, self.config, self.cache = out, config, cache
        self.root = out / "abc"
        self.sd_dir = out / "sd-mini"
        self.rng = np.random.default_rng(config.seed)
        self.log: Dict[str, object] = {"config": asdict(config)}

    # ---------------------------------------------------------------- concepts and pretraining set
    def load(self):
        pkgs = sources.fetch_packages(self.cache / "npm")
        concepts = sources.load_concepts(pkgs["emoji-datasource-google"], pkgs["emoji-datasource-twitter"],
                                         pkgs["openmoji"])
        self.concepts = usable_concepts(concepts, self.config.max_concepts)
        order = self.rng.permutation(len(self.concepts))
        n_held = min(self.config.n_heldout, len(self.concepts) // 4)
        self.heldout = [self.concepts[i] for i in sorted(order[:n_held])]
        self.pretrain = [self.concepts[i] for i in sorted(order[n_held:])]
        self.log["concepts"] = {"usable": len(self.concepts), "heldout": len(self.heldout),
                                "pretraining": len(self.pretrain)}

    def picture(self, concept, style: str) -> Image.Image:
        return sources.rasterize(sources.concept_sources(concept)[style], self.config.size)

    def plan_captions(self) -> List[str]:
        """One caption per pretraining image (Google then Twitter of each concept); draws from the rng
        whether or not the data stage runs, so later stages plan the same models in any stage subset."""
        captions = []
        for concept in self.pretrain:
            for vendor in VENDORS:
                template = CAPTIONS[int(self.rng.integers(len(CAPTIONS)))]
                captions.append(template.format(name=concept.name, vendor=vendor, category=category_word(concept)))
        return captions

    def write_pretraining_set(self, captions: List[str]):
        images_dir = self.root / "laion_subset" / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        pairs = [(c, v) for c in self.pretrain for v in VENDORS]
        for i, (concept, vendor) in enumerate(pairs):
            self.picture(concept, vendor).save(images_dir / f"{i:06d}.png")
            rows.append({"key": concept.key, "vendor": vendor})
        (self.root / "laion_subset" / "captions.txt").write_text("\n".join(captions) + "\n")
        save_json(self.root / "laion_subset" / "sources.json", rows)
        self.log["pretraining_images"] = len(captions)

    def load_pretraining_set(self):
        captions = (self.root / "laion_subset" / "captions.txt").read_text().splitlines()
        paths = sorted((self.root / "laion_subset" / "images").glob("*.png"))
        images = torch.stack([to_model_input(Image.open(p).convert("RGB")) for p in paths])
        return images, captions

    # ---------------------------------------------------------------- base model
    def train_base(self):
        images, captions = self.load_pretraining_set()
        tokenizer = build_clip_tokenizer(self.cache / "clip", self.cache / "clip" / "vocab")
        start = time.time()

        def progress(log):
            e = log.entries[-1]
            print(f"  [{time.time() - start:6.0f} s] {log.stage} step {e['step']}: loss {e['loss']:.4f}", flush=True)

        result = train_base_model(images, captions, tokenizer, self.sd_dir, self.config.base, progress)
        self.log["base_training_seconds"] = round(time.time() - start)
        self.log["scaling_factor"] = result["scaling_factor"]

    # ---------------------------------------------------------------- customized models and queries
    def plan_models(self) -> List[dict]:
        """Model specs for every test case and split; deterministic given the seed."""
        cfg, rng = self.config, self.rng
        counts = cfg.models_per_case
        n_each = counts["test"] + counts["val"]
        splits = ["test"] * counts["test"] + ["val"] * counts["val"]
        specs = []
        # artist styles: OpenMoji designers with enough usable concepts
        by_author: Dict[str, list] = {}
        for c in self.concepts:
            by_author.setdefault(c.openmoji_author or "", []).append(c)
        authors = sorted((a for a, cs in by_author.items() if a and len(cs) >= cfg.style_exemplars),
                         key=lambda a: (-len(by_author[a]), a))
        for split, author in zip(splits, authors[:n_each]):
            chosen = [by_author[author][i] for i in
                      sorted(rng.choice(len(by_author[author]), cfg.style_exemplars, replace=False))]
            specs.append({"test_case": "test_artchive", "family": "artchive", "split": split,
                          "class_id": slug(author), "train_prompt": STYLE_PROMPT, "category": "art",
                          "exemplars": [(c, "openmoji", None) for c in chosen], "author": author})
        # duotone styles: held-out concepts recoloured with one palette
        for k, split in enumerate(splits):
            chosen = [self.heldout[i] for i in sorted(rng.choice(len(self.heldout), cfg.style_exemplars,
                                                                 replace=False))]
            specs.append({"test_case": "test_bamfg", "family": "bamfg", "split": split, "class_id": f"duotone_{k}",
                          "train_prompt": STYLE_PROMPT, "category": "art",
                          "exemplars": [(c, "google", DUOTONES[k % len(DUOTONES)]) for c in chosen]})
        # objects: unobserved (held-out concept, Google image) and observed (pretraining concept, OpenMoji image)
        for test_case, pool, style in (("test_unobserved_imagenet", self.heldout, "google"),
                                       ("test_observed_imagenet", self.pretrain, "openmoji")):
            for split, i in zip(splits, rng.choice(len(pool), n_each, replace=False)):
                c = pool[int(i)]
                specs.append({"test_case": test_case, "family": "imagenet", "split": split,
                              "class_id": f"{c.key}_{slug(c.name)}"[:60], "category": category_word(c),
                              "train_prompt": f"<new1> {category_word(c)}", "exemplars": [(c, style, None)]})
        return specs

    def query_prompts(self, spec) -> List[str]:
        n = self.config.queries_per_model
        if spec["category"] == "art":
            objs = [self.pretrain[int(i)].name for i in self.rng.choice(len(self.pretrain), n, replace=False)]
            return [STYLE_QUERY.format(obj=o) for o in objs]
        return [OBJECT_QUERIES[i % len(OBJECT_QUERIES)].format(category=spec["category"]) for i in range(n)]

    def exemplar_image(self, concept, style, palette) -> Image.Image:
        img = self.picture(concept, style)
        return duotone(img, *palette) if palette else img

    def prior_set(self, spec, images, captions, n=64):
        """Prior-preservation images: pretraining images of the same category (objects) or any (styles)."""
        n = min(n, len(captions))
        if spec["category"] == "art":
            idx = self.rng.choice(len(captions), n, replace=False)
        else:
            same = [i for i, c in enumerate(captions) if c.endswith(f", a {spec['category']}")
                    or f" {spec['category']}" in c]
            idx = self.rng.choice(same, min(n, len(same)), replace=False) if len(same) >= 8 else \
                self.rng.choice(len(captions), n, replace=False)
        return images[idx], [captions[int(i)] for i in idx]

    def customize_and_synthesize(self):
        from utils.models import load_base_model

        images, captions = self.load_pretraining_set()
        tests = {tc: [] for tc in ("test_artchive", "test_bamfg", "test_observed_imagenet",
                                   "test_unobserved_imagenet")}
        tasks = {"test": [], "val": []}
        grids, labels = [], []
        for spec in self.plan_models():
            family, cls = spec["family"], spec["class_id"]
            ex_dir = self.root / "exemplar" / family / cls
            ex_dir.mkdir(parents=True, exist_ok=True)
            ex_rel, ex_imgs = [], []
            for j, (concept, style, palette) in enumerate(spec["exemplars"]):
                img = self.exemplar_image(concept, style, palette)
                img.save(ex_dir / f"{j:03d}.png")
                ex_rel.append(f"dataset/exemplar/{family}/{cls}/{j:03d}.png")
                ex_imgs.append(img)
            base = load_base_model(str(self.sd_dir), "cpu")
            prior_imgs, prior_caps = self.prior_set(spec, images, captions)
            model_dir = self.root / "models" / family / cls
            ex_tensor = torch.stack([to_model_input(i) for i in ex_imgs])
            t0 = time.time()
            result = customize(base, ex_tensor, spec["train_prompt"], prior_imgs, prior_caps, model_dir,
                               CustomizationConfig(**{**asdict(self.config.customization),
                                                      "seed": self.config.seed + len(labels)}))
            print(f"  customized {spec['test_case']}/{cls} ({spec['split']}) in {time.time() - t0:.0f} s: "
                  f"exemplar loss {np.mean(result['losses'][:20]):.3f} -> {np.mean(result['losses'][-20:]):.3f}",
                  flush=True)
            pipe = load_pipeline(self.sd_dir)
            from utils.models import PristineWeights, apply_customization

            apply_customization(_PipeAsBase(pipe), PristineWeights(pipe.unet), model_dir)
            prompts = self.query_prompts(spec)
            synth_dir = self.root / "synth" / family / "gpt" / cls / "samples"
            synth_dir.mkdir(parents=True, exist_ok=True)
            queries = sample(pipe, prompts, seed=self.config.seed + 1000 * len(labels))
            synth_rel = []
            entry_index = len(tests[spec["test_case"]])
            for q, (prompt, img) in enumerate(zip(prompts, queries)):
                rel = f"synth/{family}/gpt/{cls}/samples/{q:05d}.png"
                img.save(self.root / rel)
                synth_rel.append(f"dataset/{rel}")
                tasks[spec["split"]].append({
                    "synth_image_path": rel, "prompt": prompt, "test_case": spec["test_case"],
                    "test_case_ind": entry_index, "model_path": f"models/{family}/{cls}",
                    "train_prompt": spec["train_prompt"], "category": spec["category"]})
            tests[spec["test_case"]].append({"exemplar": ex_rel, "synth": {"gpt": synth_rel}, "class_id": cls,
                                             "category": None if spec["category"] == "art" else spec["category"],
                                             "split": spec["split"], "author": spec.get("author")})
            grids.append(ex_imgs[:4] + [Image.new("RGB", (self.config.size,) * 2, "white")] + queries)
            labels.append(f"{spec['split']} {spec['test_case'][5:]} {cls[:24]}")
        for name, entries in tests.items():
            save_json(self.root / "json" / f"{name}.json", entries)
        for split, entries in tasks.items():
            save_json(self.out / "tasks" / f"{split}.json", entries)
        # the demo: the first unobserved-object test query (README: where AbU works on mini-AbC, and where not)
        save_json(self.out / "tasks" / "demo.json",
                  [t for t in tasks["test"] if t["test_case"] == "test_unobserved_imagenet"][:1])
        save_grid(self.out / "grids" / "customized_models.png", grids, labels)

    def plan_grid_names(self) -> List[str]:
        return [self.pretrain[int(i)].name for i in self.rng.choice(len(self.pretrain), 6, replace=False)]

    def base_samples_grid(self, names: List[str]):
        pipe = load_pipeline(self.sd_dir)
        rows, labels = [], []
        for template in ("a {name}", "a picture of a {name} in the style of google art",
                         "a picture of a {name} in the style of twitter art"):
            prompts = [template.format(name=n) for n in names]
            rows.append(sample(pipe, prompts, seed=self.config.seed))
            labels.append(template.replace("{name}", "..."))
        save_grid(self.out / "grids" / "base_model_samples.png", rows, labels)
        (self.out / "grids" / "base_model_samples.txt").write_text("columns: " + " | ".join(names) + "\n")


class _PipeAsBase:
    """The attributes apply_customization needs, taken from a diffusers pipeline."""

    def __init__(self, pipe):
        self.unet, self.tokenizer, self.text_encoder = pipe.unet, pipe.tokenizer, pipe.text_encoder


def derive(out: Path, config: BuildConfig, all_weights_fisher: bool = True, overwrite: bool = False) -> None:
    """laion_latents.npy, laion_text_embeddings.npy, sd_fisher.pt (and, for the all-weights ablation,
    sd_fisher_all.pt): made here, not committed, by the public paths a user's own benchmark takes
    (utils.candidate_arrays as data/encode_candidates.py, utils.fisher as compute_fisher.py).
    Files already there are kept unless `overwrite`."""
    from utils.candidate_arrays import encode_candidates
    from utils.data import LaionCandidates
    from utils.fisher import FisherConfig, write_fisher
    from utils.models import load_base_model

    root = out / "abc"
    base = load_base_model(str(out / "sd-mini"), "cpu")
    encode_candidates(base, root / "laion_subset" / "images", root / "laion_subset" / "captions.txt", root,
                      seed=config.seed, batch_size=256, overwrite=overwrite)
    laion = LaionCandidates(root, LaionCandidates(root, 1).total)
    write_fisher(base, laion, root / "sd_fisher.pt", FisherConfig(
        laion_subset_size=len(laion) // 2, num_samples=config.fisher_samples, batch_size=64, seed=config.seed),
        "cpu", overwrite=overwrite)
    if all_weights_fisher:  # every weight, for the "all weights" ablation (one sample per backward: fewer samples)
        write_fisher(base, laion, root / "sd_fisher_all.pt", FisherConfig(
            laion_subset_size=len(laion) // 2, num_samples=config.fisher_samples_all, weight_selection="all",
            seed=config.seed), "cpu", overwrite=overwrite)


STAGES = ("data", "base", "models", "derive")


def build(out, config: BuildConfig, stages=STAGES, cache=None, overwrite: bool = False,
          all_weights_fisher: bool = True):
    out = Path(out)
    builder = Builder(out, config, Path(cache or REPO / "data" / ".cache"))
    if {"data", "base", "models"} & set(stages):
        builder.load()
        captions = builder.plan_captions()  # the rng is drawn in the same order whatever stages run
        grid_names = builder.plan_grid_names()
    if "data" in stages:
        builder.write_pretraining_set(captions)
        sources.write_notice(out / "NOTICE", {c.openmoji_author for c in builder.concepts})
    if "base" in stages:
        builder.train_base()
    if "models" in stages:
        builder.base_samples_grid(grid_names)
        builder.customize_and_synthesize()
    if {"data", "base", "models"} & set(stages):
        save_json(out / f"build_log_{'_'.join(s for s in stages if s != 'derive')}.json", builder.log)
    if "derive" in stages:
        derive(out, config, all_weights_fisher=all_weights_fisher, overwrite=overwrite)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/mini_abc")
    p.add_argument("--stage", choices=STAGES, action="append", help="run only these stages (repeatable)")
    p.add_argument("--diffusion_steps", type=int, default=None, help="override the base model's training steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--overwrite", action="store_true", help="derive: remake the arrays even if they exist")
    p.add_argument("--no_all_weights_fisher", action="store_true",
                   help="derive: skip sd_fisher_all.pt (only the comparison's all-weights ablation needs it)")
    args = p.parse_args(argv)
    config = BuildConfig()
    if args.diffusion_steps:
        config.base.diffusion_steps = args.diffusion_steps
    if args.threads:
        torch.set_num_threads(args.threads)
    build(args.out, config, args.stage or STAGES, overwrite=args.overwrite,
          all_weights_fisher=not args.no_all_weights_fisher)


if __name__ == "__main__":
    main()
