"""Two-stage AbU: screen every candidate cheaply for a model's queries, then re-score only the top exactly.

Exact AbU re-measures every candidate row at T timesteps after unlearning each query (docs/method.md,
section 4): for AbC that is 2M UNet forwards a query, about 98% of its cost. Only the candidates near
the top of a ranking decide Recall@K and mAP, so the two-stage mode first estimates every candidate's
loss rise cheaply (a *screen*), then measures the top M exactly, under the very noise the exact pass would
give them (utils.losses.collect_losses with `rows`).

Screens (`--screen`):
* `coarse`: the exact rise at T' of the T grid timesteps (`--screen_time_samples`), same rows, same noise,
  minus the stage-1 losses at those timesteps: T'/T of the exact cost per query.
* `first-order`: the rise of row r for query q is about <grad L_r(theta_0), delta_q>, the directional
  derivative of its loss along the query's weight change. One forward and one backward pass per row and
  screen timestep at the customized weights serves every query of the model: for an nn.Linear weight the
  inner product needs only the layer's input x and output gradient g, sum_t g_t^T delta x_t, which hooks
  compute without forming per-row gradients.

* `caption`: no UNet pass at all. Unlearning moves the cross-attention K/V weights, and those read only the
  caption: a candidate whose caption embedding c the change delta W barely moves can barely change its loss.
  The score of a row is sum over the K/V layers of ||delta W c||^2 (over c's 77 tokens), the same for a
  candidate's two flips; for all of a model's exemplars (one caption) it is one value.
* `coarse+caption`: re-score the union of both screens' top M; the rest are ranked by the coarse screen.

How many to re-score (`--keep_top`): 0 re-scores the screen's top `--rescore_top`. K > 0 re-scores in the screen's
order, the top K first, then K/10 at a time, for as long as one of the next candidates could still enter the exact
top K (`could_enter_top`: the screen calibrated on the candidates re-scored so far, plus `--keep_margin` standard
deviations of that calibration's residuals, reaches the K-th largest exact influence); at most `--rescore_top`.
The budget then follows the query: it stops where the screen's values fall clearly below the top K.

Losses before unlearning (`--before_losses`): `cache` reads stage 1's cache, every candidate at every timestep.
`on-demand` skips stage 1: `BeforeLosses` measures, at the customized weights and under the noise stage 1 would
give them, only what the two-stage mode reads: the screen's timesteps and flips of every candidate (once per
model, for all its queries) and every timestep of both flips of the candidates re-scored (each at most once per
model). At AbC's sizes that replaces stage 1's 2M forwards a model by about 100K plus a few thousand a query.

Ranking: the re-scored candidates by their exact influence, then the others by their screen (ties against
the exemplars throughout, utils.metrics.rank_candidates). A candidate the screen drops can only move down,
so a two-stage setting is judged by its agreement with exact AbU (benchmarks/two_stage.py).
"""
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .losses import batch_plan, mean_over_timesteps, per_row_loss, selected_rows
from .precision import FP16_LOSS_SCALE, autocast
from .weights import loaded

CAPTION_LAYERS = ("attn2.to_k.weight", "attn2.to_v.weight")  # the weights that read a caption


def screen_timesteps(time_samples: int, screen_time_samples: int) -> np.ndarray:
    """Indices of T' grid timesteps spread over the T of the exact grid, centred in each of T' equal parts
    (T = 10, T' = 1: index 5, t = 500; T' = 2: t = 200 and 700)."""
    if not 1 <= screen_time_samples <= time_samples:  # compute_influence.py refuses this before any work
        raise ValueError(f"--screen_time_samples must be between 1 and --loss_time_samples ({time_samples}), "
                         f"got {screen_time_samples}")
    k = np.arange(screen_time_samples)
    return np.floor((k + 0.5) * time_samples / screen_time_samples).astype(np.int64)


class DirectionalDerivatives:
    """Forward / backward hooks on the nn.Linear modules owning `deltas`' parameters.

    After `per_row_loss(...).sum().backward()`, `values` is [rows, Q]: each row's directional derivative
    <d loss_row / d theta, delta_q> for every query q. For y = x W^T + b with x [rows, tokens, in] and
    g = d loss / d y, row r's term is sum_t g_rt . (delta_W x_rt) + sum_t g_rt . delta_b.
    """

    def __init__(self, model: torch.nn.Module, deltas: Dict[str, torch.Tensor], query_chunk: int = 4):
        self.deltas, self.query_chunk = deltas, query_chunk
        self.values = None
        modules = dict(model.named_modules())
        owners = {name.rsplit(".", 1)[0] for name in deltas}
        for owner in owners:
            if not isinstance(modules.get(owner), torch.nn.Linear):
                raise ValueError(f"first-order screening needs nn.Linear parameters; {owner} is not one")
        self.handles = [modules[o].register_forward_hook(self._forward_hook(o)) for o in sorted(owners)]

    def _forward_hook(self, owner: str):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            output.register_hook(lambda g: self._add(owner, x, g.detach()))
        return hook

    def _add(self, owner: str, x: torch.Tensor, g: torch.Tensor) -> None:
        rows = x.shape[0]
        x, g = x.reshape(rows, -1, x.shape[-1]).float(), g.reshape(rows, -1, g.shape[-1]).float()
        total = 0
        weight = self.deltas.get(f"{owner}.weight")
        if weight is not None:  # chunks of queries keep the [rows, q, tokens, out] product small
            total = torch.cat([torch.einsum("rqto,rto->rq", torch.einsum("rti,qoi->rqto", x, weight[q:q + self.query_chunk]), g)
                               for q in range(0, len(weight), self.query_chunk)], dim=1)
        bias = self.deltas.get(f"{owner}.bias")
        if bias is not None:
            total = total + g.sum(1) @ bias.T
        self.values = total if self.values is None else self.values + total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def first_order_screen(unet, scheduler, candidates, deltas: List[Dict[str, torch.Tensor]], batch_size: int,
                       time_samples: int, seed: int, timestep_index: Sequence[int], device, precision: str,
                       chunk: int = 16, desc: str = "first-order screen") -> np.ndarray:
    """[rows, Q]: each candidate row's first-order loss rise for each query (mean over the screen timesteps),
    under the noise of the exact pass (the batch plan of `batch_size`), at the UNet's current (customized, not
    unlearned) weights. `chunk` rows go through each forward + backward pass: memory, not results."""
    names = list(deltas[0])
    stacked = {n: torch.stack([d[n] for d in deltas]).to(device, torch.float32) for n in names}
    params = dict(unet.named_parameters())
    was = {n: params[n].requires_grad for n in names}
    scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0  # keeps fp16 output gradients from underflowing
    per_batch, step_grid = batch_plan(scheduler, batch_size, time_samples)
    rows = np.arange(len(candidates))
    timestep_index = np.asarray(timestep_index)
    out = torch.empty(len(rows) * len(timestep_index), len(deltas), dtype=torch.float64)
    for n in names:  # the graph must reach the K/V outputs; their own .grad is discarded
        params[n].requires_grad_(True)
    try:
        for positions, latents, text, timesteps, noise in selected_rows(candidates, rows, timestep_index, per_batch,
                                                                        step_grid, seed, chunk, desc):
            latents, text, timesteps, noise = (x.to(device) for x in (latents, text, timesteps, noise))
            hooks = DirectionalDerivatives(unet, stacked)
            try:
                with torch.enable_grad(), autocast(device, precision):
                    loss = per_row_loss(unet, scheduler, latents, noise, timesteps, text)
                (loss.sum() * scale).backward()
            finally:
                hooks.remove()
                for n in names:
                    params[n].grad = None
            out[positions] = hooks.values.double().cpu() / scale
    finally:
        for n in names:
            params[n].requires_grad_(was[n])
    return out.view(len(rows), len(timestep_index), len(deltas)).mean(dim=1).numpy()


def caption_gram(delta: Dict[str, torch.Tensor]) -> torch.Tensor:
    """[D, D] float64: sum over the cross-attention K/V weight changes dW [out, D] of dW^T dW, so that
    c^T G c = sum over layers ||dW c||^2 for a token embedding c."""
    grams = [d.detach().double().cpu().T @ d.detach().double().cpu()
             for name, d in delta.items() if name.endswith(CAPTION_LAYERS) and d.ndim == 2]
    if not grams:
        raise ValueError("the unlearned weights hold no cross-attention K/V weight: the caption screen has nothing "
                         "to read (use --screen coarse)")
    return torch.stack(grams).sum(0)


def caption_scores(text: np.ndarray, grams: List[torch.Tensor], chunk: int = 1024) -> np.ndarray:
    """[n, Q]: sum over tokens of c^T G_q c for each of n caption embeddings [n, 77, D] and each query's gram."""
    out = []
    for s in range(0, len(text), chunk):
        t = torch.from_numpy(np.array(text[s:s + chunk], dtype=np.float64))  # a copy: the arrays are read-only maps
        out.append(torch.stack([((t @ g) * t).sum(dim=(1, 2)) for g in grams], dim=1))
    return torch.cat(out).numpy()


def caption_screen(deltas: List[Dict[str, torch.Tensor]], exemplar_text: torch.Tensor, n_exemplar_rows: int,
                   laion_text: np.ndarray) -> Dict[str, np.ndarray]:
    """{"exemplar": [rows, Q], "laion": [rows, Q]}: the caption-side size of each query's K/V change for every
    candidate row. `exemplar_text` [1, 77, D] is the model's training caption (every exemplar row's), `laion_text`
    [S, 77, D] the S candidates' captions (rows r and S + r, a candidate and its flip, share caption r)."""
    grams = [caption_gram(d) for d in deltas]
    exemplar = np.repeat(caption_scores(exemplar_text.numpy(), grams), n_exemplar_rows, axis=0)
    laion = caption_scores(laion_text, grams)
    return {"exemplar": exemplar, "laion": np.concatenate([laion, laion])}


def rescore_rows(candidate_index: np.ndarray, n_candidates: int) -> np.ndarray:
    """The rows (unflipped i, flipped n + i) of the chosen candidates of one set of n candidates."""
    candidate_index = np.asarray(candidate_index, dtype=np.int64)
    return np.sort(np.concatenate([candidate_index, candidate_index + n_candidates]))


def could_enter_top(screen_next: np.ndarray, screen_done: np.ndarray, influence_done: np.ndarray, keep_top: int,
                    margin: float) -> np.ndarray:
    """[n] bool: for candidates not yet re-scored (their screen values `screen_next` [n]), whether the exact
    influence could reach the K-th largest of the re-scored ones (`screen_done`, `influence_done` [m], m >= 1).

    The screen is calibrated on the re-scored candidates by least squares, influence ~ a * screen + b, and a
    candidate could enter when a * screen + b + margin * sd reaches the K-th largest exact influence, sd being
    the residuals' standard deviation (docs/method.md, section 9). With fewer than K re-scored, every candidate
    could; a NaN screen value never does."""
    screen_done = np.asarray(screen_done, np.float64)
    influence_done = np.asarray(influence_done, np.float64)
    if len(influence_done) < keep_top:
        return ~np.isnan(np.asarray(screen_next, np.float64))
    x = screen_done - screen_done.mean()
    slope = float(x @ (influence_done - influence_done.mean()) / (x @ x)) if x @ x > 0 else 0.0
    intercept = influence_done.mean() - slope * screen_done.mean()
    sd = float(np.std(influence_done - (slope * screen_done + intercept)))
    kth = np.sort(influence_done)[::-1][keep_top - 1]
    with np.errstate(invalid="ignore"):
        return slope * np.asarray(screen_next, np.float64) + intercept + margin * sd >= kth


class BeforeLosses:
    """Each candidate row's loss before unlearning, per grid timestep, measured when first asked for
    (--before_losses on-demand) at the weights loaded at that moment: callers load the customized ones first.

    `measure(candidates, desc, rows, timestep_index)` -> [len(rows), len(timestep_index)] float32 losses (the
    Attributor's loss pass, per timestep: stage 1's noise for those rows and timesteps). `sets` names the candidate
    sets, e.g. {"exemplar": ExemplarCandidates, "laion": LaionCandidates}. `by_t[key]` [rows, T] holds NaN until
    measured; `mean[key]` [rows] is a row's mean over the T timesteps (mean_over_timesteps, as stage 1 reduces
    them) once it has all T, else NaN: the same arrays throughout, updated in place. `forwards` counts the UNet
    forwards spent."""

    def __init__(self, measure: Callable, sets: dict, time_samples: int):
        self.measure, self.sets, self.time_samples = measure, sets, time_samples
        self.by_t = {k: np.full((len(c), time_samples), np.nan, np.float32) for k, c in sets.items()}
        self.mean = {k: np.full(len(c), np.nan, np.float32) for k, c in sets.items()}
        self.forwards = 0

    def ensure(self, key: str, rows, timestep_index=None) -> None:
        """Measure what `rows` lack of `timestep_index` (default: every timestep), rows grouped by what they lack."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        steps = np.arange(self.time_samples) if timestep_index is None else np.asarray(timestep_index, np.int64)
        missing = np.isnan(self.by_t[key][np.ix_(rows, steps)])
        patterns, group = np.unique(missing, axis=0, return_inverse=True)
        for g, pattern in enumerate(patterns):
            if not pattern.any():
                continue
            these, cols = rows[group.reshape(-1) == g], steps[pattern]
            self.by_t[key][np.ix_(these, cols)] = self.measure(self.sets[key], f"{key} losses before (on demand)",
                                                               these, cols)
            self.forwards += len(these) * len(cols)
            complete = these[~np.isnan(self.by_t[key][these]).any(axis=1)]
            if len(complete):
                self.mean[key][complete] = mean_over_timesteps(self.by_t[key][complete]).numpy()


# ---------------------------------------------------------------- the screens, as a registry
@dataclass
class ScreenInputs:
    """What a screen of one model's queries reads. `weights[q]`: query q's unlearned weights (utils.weights'
    copy_weights of `params`), `start` the customized ones (loaded when a screen runs); `collect(candidates, desc,
    **kw)` the run's loss measurement; `before`: a BeforeLosses (--before_losses on-demand) or None, then stage 1's
    per-timestep losses in `cache_dir` are read."""

    unet: torch.nn.Module
    scheduler: Any
    measurement: Any  # utils.losses.LossMeasurement
    collect: Callable
    params: Dict[str, torch.nn.Parameter]
    start: Dict[str, torch.Tensor]
    weights: List[Dict[str, torch.Tensor]]
    exemplars: Any  # utils.data.ExemplarCandidates
    laion: Any  # utils.data.LaionCandidates
    t_index: np.ndarray
    screen_flips: int
    screen_batch_size: int
    before: Optional["BeforeLosses"] = None
    cache_dir: Optional[Path] = None

    @cached_property
    def deltas(self) -> List[Dict[str, torch.Tensor]]:
        """Each query's weight change, unlearned minus customized."""
        return [{n: w[n] - self.start[n] for n in self.start} for w in self.weights]


def coarse_estimate(i: ScreenInputs) -> Dict[str, np.ndarray]:
    """The exact rise at the screen timesteps, one pass over the candidates per query; with --screen_flips 1 over
    the unflipped rows only (the first half), each value standing for the candidate's flipped row too. The losses
    before: stage 1's cache, or measured now (`i.before`, at the customized weights, which are loaded)."""
    one_flip = i.screen_flips == 1
    if i.before:
        for key, n_rows in (("exemplar", len(i.exemplars)), ("laion", len(i.laion))):
            i.before.ensure(key, np.arange(n_rows // 2 if one_flip else n_rows), i.t_index)
        ex_before_t, laion_before_t = i.before.by_t["exemplar"], i.before.by_t["laion"]
    else:
        from .loss_cache import load_losses_by_timestep

        ex_before_t, laion_before_t = load_losses_by_timestep(i.cache_dir)
    out = {"exemplar": [], "laion": []}
    for w in i.weights:
        with loaded(i.params, w):
            for key, candidates, by_t in (("exemplar", i.exemplars, ex_before_t), ("laion", i.laion, laion_before_t)):
                rows = np.arange(len(by_t) // 2 if one_flip else len(by_t))
                after = i.collect(candidates, f"coarse screen ({key})", rows=rows, timestep_index=i.t_index,
                                  per_timestep=True)
                rise = (after.astype(np.float64) - by_t[rows][:, i.t_index]).mean(axis=1)
                out[key].append(np.concatenate([rise, rise]) if one_flip else rise)
    return {k: np.stack(v, axis=1) for k, v in out.items()}


def first_order_estimate(i: ScreenInputs) -> Dict[str, np.ndarray]:
    """The directional derivative of every row's loss along each query's weight change (`first_order_screen`)."""
    m = i.measurement
    kw = dict(batch_size=m.batch_size, time_samples=m.time_samples, seed=m.seed, timestep_index=i.t_index,
              device=m.device, precision=m.precision, chunk=i.screen_batch_size)
    return {"exemplar": first_order_screen(i.unet, i.scheduler, i.exemplars, i.deltas, **kw),
            "laion": first_order_screen(i.unet, i.scheduler, i.laion, i.deltas, **kw)}


def caption_estimate(i: ScreenInputs) -> Dict[str, np.ndarray]:
    """The caption-side size of each query's K/V change (`caption_screen`): no UNet pass."""
    return caption_screen(i.deltas, i.exemplars.text_embedding, len(i.exemplars),
                          i.laion.text_embeddings[:i.laion.subset_size])


@dataclass(frozen=True)
class Screen:
    """One --screen: the estimates it re-scores the tops of (the first ranks what is not re-scored), the UNet passes
    it makes over the screened rows for a model of q queries (the cost it is charged), and the flags it takes."""

    estimates: Tuple[Callable[[ScreenInputs], Dict[str, np.ndarray]], ...]
    passes: Callable[[int], int]
    one_flip: bool  # --screen_flips 1 may halve its passes
    keep_top: bool  # --keep_top may follow its order (one screen)
    linear_only: bool  # needs nn.Linear weights (--weight_selection cross-attn-kv or cross-attn)


# Adding a screen: its estimate above and one entry here, and its test; the flag's choices, the checks of its flags,
# its cost and the scoring follow from the entry.
SCREENS: Dict[str, Screen] = {
    "coarse": Screen((coarse_estimate,), lambda q: q, one_flip=True, keep_top=True, linear_only=False),
    "first-order": Screen((first_order_estimate,), lambda q: 3, one_flip=False, keep_top=True, linear_only=True),
    "caption": Screen((caption_estimate,), lambda q: 0, one_flip=False, keep_top=True, linear_only=False),
    "coarse+caption": Screen((coarse_estimate, caption_estimate), lambda q: q, one_flip=True, keep_top=False,
                             linear_only=False),
}

