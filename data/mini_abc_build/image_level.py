"""Image-level test cases of mini-AbC: queries with the same prompt and model whose right answers differ because
their images differ (docs/mini_abc.md, "Image-level test cases").

AbC's ground truth is per model: every query of a customized model has that model's exemplars as its answer, so a
method that reads only the prompt's `<new1>` scores as if it read the image. Here each query's answer depends on
what its image shows:

* customization level (`test_looks_style`, `test_looks_object`): a model customized on exemplars in two looks
  (two duotone palettes) under one token and one captioning scheme, sampled at many seeds. The model blends the
  looks with the base model's own colours, so a sample is placed between them rather than labelled outright:
  `look_position` puts its mean ink colour on the line from look A's exemplars (0) to look B's (1), a measure fixed
  here, before any attribution. A pair is two samples of one prompt at least `min_gap` apart on that line; the
  one nearer A has look A's exemplars as its ground truth and B's as the non-matching set, the other the reverse.
* pretraining level (`test_pretraining_style`): the base model itself, sampled from prompts that name a concept
  but no style ("a picture of a rocket"); the judge's style head labels each sample. Ground truth: the
  pretraining picture of that concept in that style (second reading: every pretraining picture in that style);
  non-matching: the same for the pair partner's style. The scripts need a customized model, so this level has an
  identity customization: the base model's own K/V weights and a `<new1>` that no prompt uses, with one white
  placeholder exemplar (the layout needs one; it is in neither set).

Queries come in balanced pairs: one A and one B query of the same prompt, each the other's non-matching set, so a
ranking that ignores the image scores a pair-mean AUC of exactly 0.5 (utils/metrics.py, `auc`).
The ground truth lives in each json/<test_case>.json entry under "image_level" (utils/tasks.py,
`image_ground_truth`), beside AbC's own keys, which keep their meaning.
"""
import shutil
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from data.mini_abc_build.common import STYLE_PROMPT, STYLE_QUERY, TRAINING_STYLES, PipeAsBase, duotone, slug

# (look A's palette, look B's palette) per model: dark and light end of each duotone ramp, hues far apart
LOOK_PALETTES = [  # one hue a look, so that a look survives the model's blurring at 32 px
    (((110, 0, 0), (255, 170, 170)), ((0, 20, 120), (170, 200, 255))),  # red / blue
    (((0, 80, 0), (170, 255, 170)), ((70, 0, 100), (230, 170, 255))),  # green / purple
    (((120, 50, 0), (255, 210, 150)), ((0, 80, 80), (160, 240, 240))),  # orange / teal
    (((110, 0, 70), (255, 170, 220)), ((80, 80, 0), (250, 250, 150))),  # magenta / olive
]
LOOK_SPLITS = ("val", "test", "test", "test")  # per family: one validation model, three test models
LOOKS = ("A", "B")
INK_THRESHOLD = 235  # a pixel whose darkest channel is above this is background (white)


@dataclass
class ImageLevelConfig:
    style_exemplars_per_look: int = 4
    style_prompts: int = 12  # pretraining objects asked for in the <new1> style
    object_prompts: Sequence[str] = ("a picture of a <new1> {category}", "a <new1> {category}",
                                     "a <new1> {category}, a {category}")
    seeds_per_prompt: int = 12
    pairs_per_model: int = 4
    min_gap: float = 0.25  # look_position's distance between the two queries of a pair
    style_steps: int = 1000  # a looks model must reproduce its looks: twice the steps and lr of test_bamfg's recipe
    style_lr: float = 1e-2
    looks_guidance: float = 1.0  # no classifier-free guidance: with it a prompt's samples hardly differ
    pretraining_pairs: Tuple[int, int] = (4, 8)  # (validation, test) pairs of the pretraining level
    pretraining_seeds: int = 12
    guidance: float = 3.0  # the pretraining level's guidance (the builder's grids'); at 5 samples hardly differ
    min_style_probability: float = 0.6  # the judge's style probability a pretraining label needs
    attempts: int = 3  # customizations tried before a model without enough pairs is dropped (an object model
    # tries another held-out concept each time: one that the model draws in a single look will not change)
    pretraining_candidates: int = 300  # the pretraining level asks only for concepts among the first this many
    # pretraining images: the comparison's candidate subset for these test cases


def ink_colour(img: Image.Image) -> np.ndarray:
    """[3] mean RGB (0-255) of the image's inked pixels (not the white background); NaN when fewer than 20."""
    x = np.asarray(img.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    ink = x[x.min(axis=1) < INK_THRESHOLD]
    return ink.mean(axis=0) if len(ink) >= 20 else np.full(3, np.nan, np.float32)


def look_position(img: Image.Image, colour_a: np.ndarray, colour_b: np.ndarray) -> float:
    """Where the image's mean ink colour lies between look A's (0) and look B's (1), projected on the line through
    them (the looks' exemplars' mean ink colours); NaN for an image without ink."""
    axis = np.asarray(colour_b, np.float64) - np.asarray(colour_a, np.float64)
    return float((ink_colour(img) - colour_a) @ axis / (axis @ axis))


def contrast_pairs(prompt_of: Sequence[int], position: Sequence[float], min_gap: float, n_pairs: int,
                   per_prompt: int) -> List[Tuple[int, int]]:
    """Up to n_pairs (index of the sample nearer look A, index of the one nearer look B) of the same prompt: a
    prompt's samples ordered by `look_position`, its lowest paired with its highest, then the next two inwards, while
    they lie at least min_gap apart; at most per_prompt pairs a prompt, prompts in order."""
    pairs = []
    for p in dict.fromkeys(prompt_of):
        order = sorted((i for i, q in enumerate(prompt_of) if q == p and np.isfinite(position[i])),
                       key=lambda i: position[i])
        for j in range(min(per_prompt, len(order) // 2)):
            a, b = order[j], order[-1 - j]
            if position[b] - position[a] < min_gap:
                break
            pairs.append((a, b))
        if len(pairs) >= n_pairs:
            return pairs[:n_pairs]
    return pairs


def style_pair_of(styles: Sequence[int], probability: Sequence[float], min_probability: float):
    """For one prompt's samples: (index, index) of the most confident samples of its two most confidently read
    styles (different styles), or None when fewer than two styles are read with min_probability."""
    best: Dict[int, int] = {}
    for i, (s, p) in enumerate(zip(styles, probability)):
        if p >= min_probability and (s not in best or p > probability[best[s]]):
            best[s] = i
    if len(best) < 2:
        return None
    a, b = sorted(best.values(), key=lambda i: -probability[i])[:2]
    return a, b


def ground_truth_entry(label: str, pair: int, prompt: str, readings) -> dict:
    """One query's image-level ground truth: readings = [(name, matching paths, non-matching paths)], the first
    the primary one; paths relative to the dataroot."""
    return {"label": label, "pair": pair, "prompt": prompt,
            "readings": [{"name": n, "matching": list(m), "non_matching": list(nm)} for n, m, nm in readings]}


IMAGE_TEST_CASES = ("test_looks_style", "test_looks_object", "test_pretraining_style")


class ImageLevelStage:
    """The build stage `image_level` (data/build_mini_abc.py): customizes the two-look models, samples and labels
    their queries, samples the base model for the pretraining level, and writes ground truth, task files
    (tasks/image_val.json, tasks/image_test.json), grids and image_level_log.json."""

    def __init__(self, builder, config: ImageLevelConfig):
        self.b, self.config = builder, config
        self.candidate_images = config.pretraining_candidates
        self.cases = {tc: [] for tc in IMAGE_TEST_CASES}
        self.tasks = {"val": [], "test": []}
        self.grids = {"customization": ([], []), "pretraining": ([], [])}
        self.log = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
                    "models": [], "pretraining": []}

    def run(self) -> dict:
        import time

        from data.mini_abc_build.judge import load_judge
        from data.mini_abc_build.sampling import load_pipeline, save_grid
        from utils.io import save_json

        t0 = time.time()
        plan = self.b.plan()
        pipe = load_pipeline(self.b.sd_dir)
        concepts = self.b.concepts()
        pretraining = self.b.pretraining_set()
        for k, split in enumerate(LOOK_SPLITS):
            for family in ("style", "object"):
                self.looks_model(family, k, split, plan, concepts, pipe, pretraining)
        judge = load_judge(self.b.out / "judge")
        for split in ("val", "test"):
            self.pretraining_level(split, plan, pipe, judge, pretraining[2])
        root = self.b.root
        for tc, entries in self.cases.items():
            save_json(root / "json" / f"{tc}.json", entries)
        for split, entries in self.tasks.items():
            save_json(self.b.out / "tasks" / f"image_{split}.json", entries)
        for level, (rows, labels) in self.grids.items():
            if rows:  # a level without pairs (a tiny test build) has no grid
                save_grid(self.b.out / "grids" / f"image_level_{level}.png", rows, labels, tile=48)
        self.log["seconds"] = round(time.time() - t0)
        save_json(self.b.out / "image_level_log.json", self.log)
        print(image_level_report(self.b.out), flush=True)
        return self.log

    # ------------------------------------------------------------ customization level
    def plan_looks_model(self, family: str, k: int, split: str, plan, rng, attempt: int) -> dict:
        """A two-look model: its exemplars [(concept key, look 0/1)], their captions, its query prompts. An object
        model's concept is the attempt-th of a fixed order of the held-out concepts."""

        cfg, heldout = self.config, plan["heldout_concepts"]
        if family == "style":
            keys = [heldout[int(i)] for i in rng.choice(len(heldout), 2 * cfg.style_exemplars_per_look, replace=False)]
            objects = rng.choice(len(plan["pretraining_concepts"]), cfg.style_prompts, replace=False)
            return {"class_id": f"looks_{k}", "train_prompt": STYLE_PROMPT, "category": "art",
                    "exemplars": [(key, i // cfg.style_exemplars_per_look) for i, key in enumerate(keys)],
                    "captions": [f"a picture of a {plan['names'][key]} in the style of <new1> art" for key in keys],
                    "prompts": [STYLE_QUERY.format(obj=plan["names"][plan["pretraining_concepts"][int(i)]])
                                for i in objects], **self.looks_common(family, k, split)}
        order = np.random.default_rng(self.b.config.seed + 301 + 10 * k).permutation(len(heldout))
        key = heldout[int(order[attempt % len(heldout)])]
        category = plan["categories"][key]
        return {"class_id": f"{key}_{slug(plan['names'][key])}"[:40], "train_prompt": f"<new1> {category}",
                "category": category, "exemplars": [(key, 0), (key, 1)], "captions": [f"<new1> {category}"] * 2,
                "prompts": [p.format(category=category) for p in cfg.object_prompts], **self.looks_common(family, k, split)}

    @staticmethod
    def looks_common(family: str, k: int, split: str) -> dict:
        return {"test_case": f"test_looks_{family}", "family": f"looks_{family}", "split": split,
                "looks": LOOK_PALETTES[k]}

    def write_exemplars(self, spec, concepts) -> list:
        """The exemplars drawn (noto) in their look's duotone, saved under exemplar/<family>/<model>/; the images."""
        from data.mini_abc_build import sources

        ex_dir = self.b.root / "exemplar" / spec["family"] / spec["class_id"]
        ex_dir.mkdir(parents=True, exist_ok=True)
        images, spec["exemplar_paths"] = [], []
        for j, (key, look) in enumerate(spec["exemplars"]):
            img = duotone(sources.rasterize(concepts[key].svgs["noto"], self.b.config.size), *spec["looks"][look])
            img.save(ex_dir / f"{j:03d}.png")
            images.append(img)
            spec["exemplar_paths"].append(f"exemplar/{spec['family']}/{spec['class_id']}/{j:03d}.png")
        return images

    def looks_model(self, family: str, k: int, split: str, plan, concepts, pipe, pretraining) -> None:
        """Customize a two-look model (another seed, and for an object another concept, each attempt), sample its
        prompts at many seeds, pair samples by look_position; keep the attempt with the most pairs."""
        cfg = self.config
        rng = np.random.default_rng(self.b.config.seed + 300 + 10 * k)
        best = None
        for attempt in range(cfg.attempts):
            if best is None or family == "object":
                spec = self.plan_looks_model(family, k, split, plan, rng, attempt)
                ex_imgs = self.write_exemplars(spec, concepts)
            prompt_of = [p for p in range(len(spec["prompts"])) for _ in range(cfg.seeds_per_prompt)]
            per_prompt = 1 if family == "style" else -(-cfg.pairs_per_model // len(spec["prompts"]))
            samples, seconds = self.customize_and_sample(spec, ex_imgs, spec["captions"],
                                                         [spec["prompts"][p] for p in prompt_of], k, attempt, pipe,
                                                         pretraining)
            colours = [np.mean([ink_colour(img) for img, (_, look) in zip(ex_imgs, spec["exemplars"]) if look == side],
                               axis=0) for side in (0, 1)]
            position = [look_position(img, *colours) for img in samples]
            pairs = contrast_pairs(prompt_of, position, cfg.min_gap, cfg.pairs_per_model, per_prompt)
            self.log["models"].append({
                "model": spec["class_id"], "test_case": spec["test_case"], "split": split, "attempt": attempt,
                "samples": len(samples), "position_quartiles": np.nanpercentile(position, [25, 50, 75]).round(2).tolist(),
                "pair_gaps": [round(position[j] - position[i], 2) for i, j in pairs], "pairs": len(pairs),
                "seconds": seconds})
            print(f"  image level: {spec['test_case']}/{spec['class_id']} ({split}, attempt {attempt}): "
                  f"{self.log['models'][-1]}", flush=True)
            if best is None or len(pairs) > len(best[3]):
                if best is not None and best[0]["class_id"] != spec["class_id"]:
                    self.remove_model(best[0])
                best = (spec, ex_imgs, samples, pairs, prompt_of, len(self.log["models"]) - 1)
            elif spec["class_id"] != best[0]["class_id"]:
                self.remove_model(spec)
            if len(pairs) >= cfg.pairs_per_model:
                break
        spec, ex_imgs, samples, pairs, prompt_of, entry = best
        kept = len(pairs) >= cfg.pairs_per_model
        self.log["models"][entry]["kept"] = kept
        if kept and entry != len(self.log["models"]) - 1 and family == "style":  # the best model is not the last
            self.customize_and_sample(spec, ex_imgs, spec["captions"], [], k, self.log["models"][entry]["attempt"],
                                      pipe, pretraining)  # trained again (same seed): the folder holds the last
        self.write_looks_queries(spec, ex_imgs, samples, pairs if kept else [], prompt_of, kept)

    def remove_model(self, spec) -> None:
        """A model folder (weights, exemplars) that an attempt left and no query uses."""
        for sub in ("models", "exemplar"):
            shutil.rmtree(self.b.root / sub / spec["family"] / spec["class_id"], ignore_errors=True)

    def write_looks_queries(self, spec, ex_imgs, samples, pairs, prompt_of, kept: bool) -> None:
        looks = [l for _, l in spec["exemplars"]]
        look_paths = [[p for p, look in zip(spec["exemplar_paths"], looks) if look == side] for side in (0, 1)]
        queries = []
        for pair, (ia, ib) in enumerate(pairs):
            for side, i in ((0, ia), (1, ib)):
                queries.append((spec["prompts"][prompt_of[i]], samples[i], LOOKS[side], pair,
                                [("look", look_paths[side], look_paths[1 - side])]))
        self.write_queries(spec, queries)
        blank = Image.new("RGB", ex_imgs[0].size, "white")
        side = [[img for img, look in zip(ex_imgs, looks) if look == s] for s in (0, 1)]
        rows, labels = self.grids["customization"]
        rows.append(side[0] + [samples[i] for i, _ in pairs] + [blank] + side[1] + [samples[i] for _, i in pairs])
        labels.append(f"{spec['split']} {spec['family'][6:]} {spec['class_id'][:20]}" + ("" if kept else " (dropped)"))

    def customize_and_sample(self, spec, ex_imgs, captions, prompts, k: int, attempt: int, pipe, pretraining):
        """Customize (Custom Diffusion, the builder's recipe for the family) and sample `prompts` (seeds in order);
        (images, seconds)."""
        import time
        from dataclasses import asdict

        import torch

        from data.mini_abc_build.customize import CustomizationConfig, customize
        from data.mini_abc_build.sampling import sample
        from utils.customization import apply_customization
        from utils.models import load_base_model
        from utils.transforms import to_model_input
        from utils.weights import PristineWeights

        images, captions_all, rows = pretraining
        t0 = time.time()
        m = 200 + 2 * k + (spec["category"] != "art")
        prior_imgs, prior_caps = self.b.prior_set(spec, images, captions_all, rows, m)
        model_dir = self.b.root / "models" / spec["family"] / spec["class_id"]
        base = load_base_model(str(self.b.sd_dir), self.b.config.device)
        recipe = asdict(self.b.config.customization)
        if spec["category"] == "art":
            recipe.update(asdict(self.b.config.style_customization), steps=self.config.style_steps,
                          lr=self.config.style_lr)
        customize(base, torch.stack([to_model_input(img) for img in ex_imgs]), captions, prior_imgs, prior_caps,
                  model_dir, CustomizationConfig(**{**recipe, "seed": self.b.config.seed + m + 100 * attempt,
                                                    "device": self.b.config.device}))
        pristine = PristineWeights(pipe.unet)
        apply_customization(PipeAsBase(pipe), pristine, model_dir)
        samples = sample(pipe, prompts, seed=self.b.config.seed + 20000 + 1000 * m + 100000 * attempt,
                         steps=self.b.config.sample_steps, guidance_scale=self.config.looks_guidance)
        pristine.restore()
        return samples, round(time.time() - t0)

    def write_queries(self, spec, queries) -> None:
        """queries: [(prompt, image, label, pair, readings)]; appends the json entry and the tasks."""
        family, name = spec["family"], spec["class_id"]
        synth_dir = self.b.root / "synth" / family / "gpt" / name / "samples"
        synth_dir.mkdir(parents=True, exist_ok=True)
        for old in synth_dir.glob("*.png"):  # an earlier build may have kept more
            old.unlink()
        if not queries:
            return
        entries = self.cases[spec["test_case"]]
        truth, synth = {}, []
        for q, (prompt, img, label, pair, readings) in enumerate(queries):
            rel = f"synth/{family}/gpt/{name}/samples/{q:05d}.png"
            img.save(self.b.root / rel)
            synth.append(f"dataset/{rel}")
            truth[rel] = ground_truth_entry(label, pair, prompt, readings)
            self.tasks[spec["split"]].append({
                "synth_image_path": rel, "prompt": prompt, "test_case": spec["test_case"],
                "test_case_ind": len(entries), "model_path": f"models/{family}/{name}",
                "train_prompt": spec["train_prompt"], "category": spec["category"]})
        entries.append({"exemplar": [f"dataset/{p}" for p in spec["exemplar_paths"]], "synth": {"gpt": synth},
                        "class_id": name, "category": None if spec["category"] == "art" else spec["category"],
                        "split": spec["split"], "image_level": truth})

    # ------------------------------------------------------------ pretraining level
    def pretraining_level(self, split: str, plan, pipe, judge, rows) -> None:
        """Base-model samples of 'a picture of a {concept}' read by the judge's style head; one pair per concept
        whose samples show two styles confidently, until the split has its pairs."""

        cfg = self.config
        n_pairs = cfg.pretraining_pairs[split == "test"]
        styles = list(TRAINING_STYLES)  # the judge's style head order
        pool = list(dict.fromkeys(r["key"] for r in rows[:self.candidate_images]))
        order = np.random.default_rng(self.b.config.seed + 400).permutation(len(pool))
        third = len(pool) // 3  # validation asks for the first third of the concepts, test for the rest
        keys = [pool[int(i)] for i in (order[:third] if split == "val" else order[third:])]
        name = f"identity_{split}"
        spec = {"test_case": "test_pretraining_style", "family": "pretraining", "split": split, "class_id": name,
                "train_prompt": "<new1>", "category": "art",
                "exemplar_paths": [f"exemplar/pretraining/{name}/000.png"]}
        self.write_identity_model(spec)
        queries, tried = [], 0
        for start in range(0, len(keys), 8):
            batch = keys[start:start + 8]
            prompts = [f"a picture of a {plan['names'][key]}" for key in batch for _ in range(cfg.pretraining_seeds)]
            samples, style, prob = self.read_styles(pipe, judge, prompts, self.b.config.seed + 30000 + 1000 * start
                                                    + 500 * (split == "test"))
            for c, key in enumerate(batch):
                tried += 1
                first = c * cfg.pretraining_seeds
                found = style_pair_of(style[first:first + cfg.pretraining_seeds],
                                      prob[first:first + cfg.pretraining_seeds], cfg.min_style_probability)
                if found is not None:
                    picked = [(first + i, styles[style[first + i]]) for i in found]
                    self.add_pretraining_pair(key, picked, prompts, samples, rows, queries, plan, split)
                if len(queries) >= 2 * n_pairs:
                    break
            if len(queries) >= 2 * n_pairs:
                break
        self.log["pretraining"].append({"split": split, "concepts_tried": tried, "pairs": len(queries) // 2})
        self.write_queries(spec, queries)

    def read_styles(self, pipe, judge, prompts, seed: int):
        """The base model's samples of `prompts` (seeds from `seed`) and the judge's style reading of each:
        (images, style index, its probability)."""
        import torch

        from data.mini_abc_build.judge import predict
        from data.mini_abc_build.sampling import sample
        from utils.transforms import to_model_input

        samples = sample(pipe, prompts, seed=seed, steps=self.b.config.sample_steps, guidance_scale=self.config.guidance)
        _, logits = predict(judge, torch.stack([to_model_input(s.convert("RGB")) for s in samples]))
        prob, style = logits.softmax(1).max(1)
        return samples, style.tolist(), prob.tolist()

    def add_pretraining_pair(self, key, picked, prompts, samples, rows, queries, plan, split) -> None:
        """Append one pair's two queries (picked: [(sample index, style set)] x 2) with their readings, and its grid
        row: each query beside the pretraining picture of its concept in its style."""

        index = {(r["key"], r["style"]): i for i, r in enumerate(rows)}
        pictures = [self.laion_path(index[(key, s)]) for _, s in picked]
        in_style = [[self.laion_path(i) for i, r in enumerate(rows[:self.candidate_images]) if r["style"] == s]
                    for _, s in picked]
        pair = len(queries) // 2
        for side, (i, s) in enumerate(picked):
            queries.append((prompts[i], samples[i], TRAINING_STYLES[s], pair,
                            [("concept in that style", [pictures[side]], [pictures[1 - side]]),
                             ("that style", in_style[side], in_style[1 - side])]))
        blank = Image.new("RGB", samples[0].size, "white")
        grid_rows, grid_labels = self.grids["pretraining"]
        grid_rows.append([samples[picked[0][0]], self.laion_image(pictures[0]), blank,
                          samples[picked[1][0]], self.laion_image(pictures[1])])
        grid_labels.append(f"{split} {plan['names'][key][:18]}: {TRAINING_STYLES[picked[0][1]]} / "
                           f"{TRAINING_STYLES[picked[1][1]]}")

    def write_identity_model(self, spec) -> None:
        """The base model as a customized model: its own cross-attention K/V and a <new1> no prompt uses (the
        mean of the token embeddings), with one white placeholder exemplar."""
        from utils.customization import CONCEPT_FILE, CONCEPT_TOKEN, CUSTOM_WEIGHTS_FILE
        from utils.io import save_torch
        from utils.models import load_base_model
        from utils.weights import select_parameter_names

        base = load_base_model(str(self.b.sd_dir), "cpu")
        names = select_parameter_names(base.unet, "cross-attn-kv")
        params = dict(base.unet.named_parameters())
        model_dir = self.b.root / "models" / spec["family"] / spec["class_id"]
        save_torch(model_dir / CUSTOM_WEIGHTS_FILE, {n: params[n].detach().clone() for n in names})
        table = base.text_encoder.get_input_embeddings().weight
        save_torch(model_dir / CONCEPT_FILE, {CONCEPT_TOKEN: table.detach().mean(0).clone()})
        path = self.b.root / spec["exemplar_paths"][0]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (self.b.config.size,) * 2, "white").save(path)

    @staticmethod
    def laion_path(i: int) -> str:
        return f"laion_subset/images/{i:06d}.png"

    def laion_image(self, rel: str) -> Image.Image:
        return Image.open(self.b.root / rel).convert("RGB")


def image_level_report(out) -> str:
    """The image-level test cases as markdown, from image_level_log.json: per model, its confident samples and
    pairs; per split, the pretraining level's pairs."""
    from utils.io import load_json

    log = load_json(out / "image_level_log.json", "image-level log (run the image_level stage)")
    lines = [f"Image-level test cases (pairs: look positions >= {log['config']['min_gap']} apart; judge style "
             f"probability >= {log['config']['min_style_probability']}; of each model, the attempt whose samples were used):", "",
             "| test case | model | split | attempts | samples | look position quartiles | pairs (gaps) | kept |",
             "|---|---|---|---|---|---|---|---|"]
    last, tries = {}, {}
    for m in log["models"]:  # an object model's attempts may each have another concept: counted by test case, index
        tries[m["model"]] = tries.get(m["model"], 0) + 1
        if "kept" in m:
            last[m["model"]] = m
    for name, m in last.items():
        lines.append(f"| {m['test_case'][5:]} | {name} | {m['split']} | {tries[name]} | {m['samples']} | "
                     f"{' / '.join(map(str, m['position_quartiles']))} | {m['pairs']} ({', '.join(map(str, m['pair_gaps']))}) | "
                     f"{'yes' if m.get('kept') else 'no'} |")
    for p in log["pretraining"]:
        lines.append(f"| pretraining_style | identity_{p['split']} | {p['split']} | - | "
                     f"{p['concepts_tried']} concepts | - | {p['pairs']} | yes |")
    return "\n".join(lines) + f"\n\nBuilt in {log.get('seconds', 0)} s.\n"
