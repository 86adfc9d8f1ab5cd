"""The judge of mini-AbC's gates: a small CNN trained on the pretraining images to tell concept and style.

Gate 1 (the base model follows prompts): sample images for (concept, style) prompts and ask the judge
which concept and which style it sees; report top-1 / top-5 concept accuracy and top-1 style accuracy
against chance. Gate 2 (a customization took): in the judge's penultimate feature space, which sees both
concept and style, a customized model's queries should lie closer to its exemplars than the base model's
samples of the same prompts without `<new1>` do.

The judge's own accuracy is measured on pretraining images it never saw: one (concept, style) picture per
concept is held out, so the concept head is scored on a style of the concept it did not train on.
"""
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.io import save_json, save_torch
from utils.transforms import to_model_input


@dataclass
class JudgeConfig:
    width: int = 64
    epochs: int = 24
    batch_size: int = 128
    lr: float = 2e-3
    max_shift: int = 2  # random translation (pixels) in training, white fill
    seed: int = 0


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))


class JudgeNet(nn.Module):
    def __init__(self, n_concepts: int, n_styles: int, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.concept = nn.Linear(4 * width, n_concepts)
        self.style = nn.Linear(4 * width, n_styles)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 4 * width]: the penultimate features (global average of the last block)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return self.concept(f), self.style(f)


def _shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Random flips and translations by up to max_shift pixels, filling with white (1.0 in [-1, 1])."""
    x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
    if not max_shift:
        return x
    padded = F.pad(x, (max_shift,) * 4, value=1.0)
    size = x.shape[-1]
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=g)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + size, dx:dx + size]
    return out


def train_judge(images: torch.Tensor, concepts: torch.Tensor, styles: torch.Tensor, n_concepts: int, n_styles: int,
                config: JudgeConfig, out_dir, render=None) -> tuple:
    """Train on every image but one pretraining image per concept; return (judge, held-out accuracy), save both.

    Images with style label -1 are other drawings of the pretraining concepts (sets that are not training
    styles): they teach the concept head to recognize a concept across drawings and are never held out.
    `render(images)`, when given, adds each training image as the base model's VAE renders it (encoded and
    decoded): every sample the judge reads has passed through that decoder, so it learns to read its blur."""
    g = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    styled = styles.numpy() >= 0
    held = np.array([rng.choice(np.flatnonzero((concepts.numpy() == c) & styled)) for c in range(n_concepts)])
    train = np.setdiff1d(np.arange(len(images)), held)
    heldout_images = images[torch.from_numpy(held)]
    truth = (concepts[torch.from_numpy(held)], styles[torch.from_numpy(held)])
    if render is not None:
        images = torch.cat([images[torch.from_numpy(train)], render(images[torch.from_numpy(train)])])
        concepts = torch.cat([concepts[torch.from_numpy(train)]] * 2)
        styles = torch.cat([styles[torch.from_numpy(train)]] * 2)
        train = np.arange(len(images))
    judge = JudgeNet(n_concepts, n_styles, config.width)
    opt = torch.optim.AdamW(judge.parameters(), lr=config.lr, weight_decay=5e-4)
    steps = config.epochs * int(np.ceil(len(train) / config.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
    judge.train()
    for _ in range(config.epochs):
        order = train[rng.permutation(len(train))]
        for start in range(0, len(order), config.batch_size):
            idx = torch.from_numpy(order[start:start + config.batch_size])
            c_logits, s_logits = judge(_shift(images[idx], config.max_shift, g))
            known = styles[idx] >= 0
            style_loss = F.cross_entropy(s_logits[known], styles[idx][known]) if known.any() else 0.0
            loss = F.cross_entropy(c_logits, concepts[idx]) + style_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    judge.eval()
    held_concepts, held_styles = truth
    c_logits, s_logits = predict(judge, heldout_images)
    accuracy = {"heldout_images": int(len(held)), "concept_top1": _topk(c_logits, held_concepts, 1),
                "concept_top5": _topk(c_logits, held_concepts, 5), "style_top1": _topk(s_logits, held_styles, 1),
                **({} if render is None else _rendered_accuracy(judge, render(heldout_images), truth)),
                "concept_chance_top1": 1 / n_concepts, "style_chance_top1": 1 / n_styles}
    out_dir = Path(out_dir)
    save_torch(out_dir / "judge.pt", {"state": judge.state_dict(), "n_concepts": n_concepts, "n_styles": n_styles,
                                      "config": asdict(config)})
    save_json(out_dir / "accuracy.json", accuracy)
    return judge, accuracy


def _rendered_accuracy(judge: JudgeNet, images: torch.Tensor, truth) -> Dict[str, float]:
    """The held-out images as the VAE renders them: the judge's accuracy where the samples it reads come from."""
    c_logits, s_logits = predict(judge, images)
    return {"rendered_concept_top1": _topk(c_logits, truth[0], 1), "rendered_concept_top5": _topk(c_logits, truth[0], 5),
            "rendered_style_top1": _topk(s_logits, truth[1], 1)}


def load_judge(out_dir) -> JudgeNet:
    saved = torch.load(Path(out_dir) / "judge.pt", map_location="cpu", weights_only=False)
    judge = JudgeNet(saved["n_concepts"], saved["n_styles"], saved["config"]["width"])
    judge.load_state_dict(saved["state"])
    return judge.eval()


@torch.no_grad()
def predict(judge: JudgeNet, images: torch.Tensor, batch_size: int = 256):
    outs = [judge(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


@torch.no_grad()
def features(judge: JudgeNet, pil_images) -> torch.Tensor:
    x = torch.stack([to_model_input(img.convert("RGB")) for img in pil_images])
    return F.normalize(judge.features(x), dim=1)


def _topk(logits: torch.Tensor, labels, k: int) -> float:
    labels = torch.as_tensor(labels)
    return float((logits.topk(k, dim=1).indices == labels.view(-1, 1)).any(dim=1).float().mean())


def prompt_gate(pipe, judge: JudgeNet, plan: dict, config, styles: List[str]) -> Dict[str, float]:
    """Gate 1: sample `gate_samples` images for each of `gate_prompts` (pretraining concept, training style)
    prompts and score the judge's reading of them against what the prompt asked for. `styles`: the style
    sets in the order of the judge's style head (not plan.json's order: JSON files are written with sorted
    keys, and a first gate read against that order scored the styles below chance)."""
    from data.mini_abc_build.sampling import sample

    rng = np.random.default_rng(config.seed + 11)
    concepts = plan["pretraining_concepts"]
    pairs = [(int(rng.integers(len(concepts))), int(rng.integers(len(styles)))) for _ in range(config.gate_prompts)]
    prompts, c_true, s_true = [], [], []
    for c, s in pairs:
        prompt = f"a picture of a {plan['names'][concepts[c]]} in the style of {plan['training_styles'][styles[s]]} art"
        prompts += [prompt] * config.gate_samples
        c_true += [c] * config.gate_samples
        s_true += [s] * config.gate_samples
    images = sample(pipe, prompts, seed=config.seed + 5000, steps=config.sample_steps)
    c_logits, s_logits = predict(judge, torch.stack([to_model_input(i.convert("RGB")) for i in images]))
    return {"prompts": len(pairs), "samples": len(images), "concept_top1": _topk(c_logits, c_true, 1),
            "concept_top5": _topk(c_logits, c_true, 5), "style_top1": _topk(s_logits, s_true, 1),
            "concept_chance_top1": 1 / len(concepts), "concept_chance_top5": 5 / len(concepts),
            "style_chance_top1": 1 / len(styles)}


def customization_gate(judge: JudgeNet, exemplars: List, queries: List, plain: List) -> Dict[str, float]:
    """Gate 2: mean cosine of the queries to the exemplars' feature centroid, minus that of the base model's
    samples of the same prompts without <new1> (same seeds). Positive: the customization moved the samples
    towards the exemplars."""
    centroid = F.normalize(features(judge, exemplars).mean(0), dim=0)
    q = float((features(judge, queries) @ centroid).mean())
    b = float((features(judge, plain) @ centroid).mean())
    return {"query_similarity": round(q, 4), "base_similarity": round(b, 4), "gain": round(q - b, 4)}
