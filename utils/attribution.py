"""Stage 2's method (docs/method.md, sections 4-5): a query's inputs, unlearning it with the stopping rule and the
controls, exact and two-stage scoring of every candidate, and what is written for each query.

compute_influence.py checks everything with `preflight`, builds one `Attributor` per run, and calls
`attribute_query` (exact) or `attribute_model_two_stage` (all of a model's queries at once) per unit of work.
"""
import sys
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from unlearn import unlearn

from .customization import CONCEPT_TOKEN, apply_customization, check_customized_model, customization_fingerprint
from .data import ExemplarCandidates, LaionCandidates, encode_exemplars
from .fingerprints import changed_inputs
from .encoders import encode_images, encode_prompt
from .errors import InputError
from .fisher import load_fisher
from .io import load_pickle, save_npy, save_pickle
from .layout import EXEMPLAR_LOSS, LAION_LOSS, VISUALIZATION, ResultsLayout
from .loss_cache import (RUN_STAGE_1, cache_fingerprint, cache_is_complete, check_loss_cache,
                         load_losses_by_timestep, loss_settings, read_loss_cache)
from .losses import check_finite_losses
from .metrics import fold_flips, influence_and_rank, rank_candidates
from .precision import loss_unet
from .ranking import NEEDS_CONTROL, compose, query_parts
from .screening import (BeforeLosses, caption_screen, could_enter_top, first_order_screen, rescore_rows,
                        screen_timesteps)
from .settings import InfluenceSettings, changed_settings, record
from .tasks import exemplar_paths
from .transforms import load_image_tensor, load_rgb
from .data import laion_image_paths
from .visualize import save_top_k_figure
from .weights import PristineWeights, select_parameter_names


def check_finished_queries(settings: InfluenceSettings, layout: ResultsLayout, finished) -> None:
    """A finished query is skipped, not redone: refuse to skip one made with other settings (names each)."""
    for task in finished:
        recorded = finished_result(layout, task).get("settings", {})
        diffs = changed_settings(recorded, *settings.result)
        if diffs:
            raise InputError(f"{layout.influence_file(task)} is a finished result made with other settings:\n  "
                             + "\n  ".join(diffs) + "\nPass --overwrite to recompute it, or give this variant its own "
                             "--result_dir (with --loss_cache_dir to share stage 1).")


def check_finished_inputs(layout: ResultsLayout, finished, provenance) -> None:
    """Nor one made from other inputs than `provenance(task)` gives now (another base or customized model, other
    candidate arrays, another stage-1 cache); each difference is named. Results older than these records are reused
    with one warning line."""
    unrecorded = 0
    for task in finished:
        result = finished_result(layout, task)
        if "provenance" not in result:
            unrecorded += 1
            continue
        stale = changed_inputs(result["provenance"], provenance(task))
        if stale:
            raise InputError(f"{layout.influence_file(task)} is a finished result made from other inputs than this "
                             f"run's:\n  " + "\n  ".join(stale) + "\nIts numbers belong to the old ones: pass "
                             "--overwrite to recompute it (after stage 1, if the model or candidates changed).")
    if unrecorded:
        print(f"warning: {unrecorded} finished result(s) in {layout.result_dir} predate the record of the inputs "
              "they were made from (base and customized model, candidates, stage-1 cache) and are reused as they "
              "are; --overwrite remakes them", file=sys.stderr)


def finished_result(layout: ResultsLayout, task) -> dict:
    result = load_pickle(layout.influence_file(task), "finished result", remedy="delete it, or pass --overwrite")
    return result if isinstance(result, dict) else {}


def input_provenance(task, base, laion, dataroot: Path, layout: ResultsLayout, on_demand: bool) -> dict:
    """What a query's numbers were computed from, by fingerprint: the base model, the customized model, the candidate
    arrays, and the stage-1 cache subtracted from (None with --before_losses on-demand, which reads none).
    Recorded in influence.pkl and in measured.pkl, compared before either is reused."""
    cache = layout.loss_cache(task)
    return {"base_model": base.fingerprint,
            "customized_model": customization_fingerprint(Path(dataroot) / task.model_path),
            "laion_arrays": laion.fingerprint(),
            "loss_cache": None if on_demand or not cache_is_complete(cache) else cache_fingerprint(cache)}


def preflight(settings: InfluenceSettings, dataroot: Path, todo, laion, base, layout: ResultsLayout) -> dict:
    """Check every query's image and every model's loss cache before hours of unlearning, not at query 37.
    Returns {model_path: ModelInputs}."""
    checked, on_demand = {}, settings.screening.before_losses == "on-demand"
    remedy = RUN_STAGE_1 + (
        ", or skip stage 1 with --before_losses on-demand" if settings.screening.mode == "two-stage" else "")
    for task in todo:
        load_rgb(dataroot / task.synth_image_path)  # exists and reads as an image (or says which file does not)
        check_customized_model(dataroot / task.model_path, [task.prompt, task.train_prompt],
                               f"query {task.synth_image_path}", base.tokenizer)
        if task.model_path not in checked:
            ex_paths = exemplar_paths(dataroot, task)
            if on_demand:  # no stage-1 cache to check; stage 2 encodes the exemplars itself
                for path in ex_paths:
                    load_rgb(path)
                checked[task.model_path] = ModelInputs(ex_paths, None, input_provenance(
                    task, base, laion, dataroot, layout, on_demand=True))
                continue
            expected = loss_settings(task, base, laion, dataroot, 2 * len(ex_paths), settings.measurement())
            cached = check_loss_cache(layout.loss_cache(task), expected, remedy)
            checked[task.model_path] = ModelInputs(ex_paths, cached, input_provenance(task, base, laion, dataroot,
                                                                                      layout, on_demand=False))
    return checked


class ModelInputs(NamedTuple):
    """What preflight found for one model: its exemplar images, its stage-1 cache's settings (None when the losses
    before unlearning are measured on demand) and the fingerprints of its inputs (`input_provenance`)."""

    exemplar_paths: list
    cache: Optional[dict]
    provenance: dict


def unlearning_setup(settings: InfluenceSettings, base, dataroot: Path):
    """The parameters unlearning moves, their preconditioner F and the N of p += lr * grad / (F * N) / accum."""
    u = settings.unlearning
    names = set(select_parameter_names(base.unet, u.weight_selection))
    params = {n: p for n, p in base.unet.named_parameters() if n in names}
    if settings.ablation.preconditioner == "none":  # F = 1, N = 1: the step is lr * grad / accum
        return params, {n: torch.ones_like(p, dtype=torch.float64) for n, p in params.items()}, 1
    fisher = load_fisher(u.fisher_path or dataroot / "sd_fisher.pt", params, u.fisher_floor,
                         settings.execution.device)
    return params, fisher, u.fisher_dataset_size


def copy_weights(params: dict) -> dict:
    """{name: a detached copy} of the parameters unlearning moves (load_weights puts them back)."""
    return {n: p.detach().clone() for n, p in params.items()}


@torch.no_grad()
def load_weights(params: dict, values: dict) -> None:
    for n, p in params.items():
        p.copy_(values[n])


def check_finite(task, precision: str, **measured) -> None:
    """Stop before writing a query whose losses after unlearning hold NaN or inf (utils.losses.check_finite_losses)."""
    for name, losses in measured.items():
        check_finite_losses(losses, f"{task.synth_image_path}: {name} after unlearning", precision,
                            "unlearning diverged: lower --unlearn_lr, raise --fisher_floor (tiny Fisher entries), "
                            "or with fp16 use --precision bf16 or fp32")


class Attributor:
    """What every query of a run shares: the settings, the base model, the candidates and the outputs' places.

    Losses are measured with `loss_unet` (torch.compile'd with --compile); unlearning runs the eager UNet, whose
    parameters the compiled module shares.
    """

    def __init__(self, settings: InfluenceSettings, base, laion: LaionCandidates, dataroot: Path,
                 layout: ResultsLayout, models: dict):
        self.settings, self.base, self.laion, self.dataroot, self.layout = settings, base, laion, dataroot, layout
        self.models = models  # from preflight: {model_path: ModelInputs}
        self.measurement = settings.measurement()
        self.loss_unet = loss_unet(base.unet, settings.common.compile)
        self.pristine = PristineWeights(base.unet)
        self.params, self.fisher, self.dataset_size = unlearning_setup(settings, base, dataroot)
        self.laion_paths = laion_image_paths(dataroot, laion.total)

    def collect(self, candidates, desc: str, **kw) -> np.ndarray:
        return self.measurement.collect(self.loss_unet, self.base.scheduler, candidates, desc, **kw)

    # ---- the query ----

    def query_inputs(self, task, generator, noise_image: bool = False):
        """The query's latent repeated unlearn_batch_size times, and its prompt's text embedding likewise; with
        `noise_image` (or --noise_image), seeded Gaussian noise stands for the image."""
        s, base = self.settings, self.base
        device = s.execution.device
        image = load_image_tensor(self.dataroot / task.synth_image_path, base.resolution).unsqueeze(0)
        latent = encode_images(base.vae, image, generator, scale=not s.control.unscaled_synth_latent).to(device)
        if s.control.noise_image or noise_image:  # the control: a latent of the same shape that holds no image at all
            latent = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(device)
        prompt = task.prompt
        if s.ablation.drop_concept_token:
            prompt = " ".join(prompt.replace(CONCEPT_TOKEN, " ").split())
        text = encode_prompt(base.tokenizer, base.text_encoder, prompt)
        n = s.unlearning.unlearn_batch_size
        return latent.expand(n, -1, -1, -1).contiguous(), text.expand(n, -1, -1).contiguous()

    def unlearn_query(self, task, laion_before: np.ndarray, noise_image: bool = False) -> dict:
        """Unlearn the query (or its noise-image control) in place on the customized UNet; its own loss before and
        after, under fixed noise."""
        u, stopping = self.settings.unlearning, self.settings.stopping
        generator = torch.Generator().manual_seed(self.settings.common.seed)
        latents, text = self.query_inputs(task, generator, noise_image)
        query = ExemplarCandidates(latents[:1].cpu(), text[:1].cpu())
        before = self.collect(query, "query loss")
        check_finite_losses(before, f"{task.synth_image_path}: the query's loss before unlearning",
                            self.measurement.precision, "the customized UNet overflows on the query: with fp16 try "
                            "--precision bf16 or fp32; at fp32 the model's weights are damaged")
        self.pristine.protect(self.params)
        checks = []
        should_stop = self.stopping_rule(query, float(before[0]), laion_before, checks)
        history = unlearn(self.base.unet, self.base.scheduler, latents, text, self.params, self.fisher,
                          steps=u.unlearn_steps, grad_accum_steps=u.unlearn_grad_accum_steps, lr=u.unlearn_lr,
                          dataset_size=self.dataset_size, generator=generator, precision=self.settings.common.precision,
                          should_stop=should_stop)
        after = self.collect(query, "query loss")
        out = {"query_loss": (float(before[0]), float(after[0])), "history": np.asarray(history)}
        if should_stop is not None:
            out["stop"] = {"rule": stopping.stop_rule, "target": stopping.stop_target, "steps_taken": len(history),
                           "stopped_early": len(history) < u.unlearn_steps, "checks": checks,
                           "reference_rows": min(stopping.stop_reference, len(self.laion))}
        return out

    def stopping_rule(self, query, before: float, laion_before: np.ndarray, checks: list):
        """The --stop_rule as unlearn's should_stop(done), or None. Each check measures the query's own loss under
        its fixed noise (T forwards; the collateral rule adds its reference rows) and is appended to `checks`."""
        rule = self.settings.stopping
        if rule.stop_rule == "none":
            return None
        reference = np.arange(min(rule.stop_reference, len(self.laion)))

        def should_stop(done: int) -> bool:
            if done % rule.stop_every:
                return False
            if rule.stop_rule == "collateral" and done == 0:
                return False  # nothing has moved yet: no collateral to measure
            loss = float(self.collect(query, "stopping check")[0])
            check = {"step": done, "query_loss": loss, "query_ratio": loss / before}
            if rule.stop_rule == "rise":
                stop = check["query_ratio"] >= rule.stop_target
            else:  # collateral: the reference candidates' mean rise against the query's own
                rise = self.collect(self.laion, "stopping check", rows=reference).astype(np.float64) \
                    - laion_before[reference]
                check["collateral"] = float(rise.mean()) / max(loss - before, 1e-12)
                stop = check["collateral"] >= rule.stop_target
            checks.append(check)
            return stop

        return should_stop

    def finished_influences(self, tasks) -> dict:
        """{synth path: the loss-rise influence} of peers an earlier run of these settings finished."""
        out = {}
        for t in tasks:
            result = load_pickle(self.layout.influence_file(t), "finished peer",
                                 remedy="rerun its model's queries with --overwrite")
            stale = changed_inputs(result.get("provenance", self.models[t.model_path].provenance),
                                   self.models[t.model_path].provenance)
            if stale:
                raise InputError(f"the peer {self.layout.influence_file(t)} that a contrast reads was made from other "
                                 "inputs than this run's:\n  " + "\n  ".join(stale) +
                                 "\nRerun its model's queries with --overwrite")
            out[t.synth_image_path] = result.get("parts", {}).get("influence", result["influence"])
        return out

    def unlearning_cost(self, unlearned: dict) -> dict:
        """UNet forward-equivalents of unlearning a query (the steps it took), of measuring its own loss twice and
        of the stopping rule's checks (backward = 2 forwards)."""
        u, t = self.settings.unlearning, self.measurement.time_samples
        steps = len(unlearned["history"])
        cost = {"unlearning": 3 * steps * u.unlearn_grad_accum_steps * u.unlearn_batch_size, "query loss": 2 * t}
        if "stop" in unlearned:
            per_check = 1 + (unlearned["stop"]["reference_rows"] if self.settings.stopping.stop_rule == "collateral"
                             else 0)
            cost["stopping checks"] = len(unlearned["stop"]["checks"]) * per_check * t
        return cost

    # ---- the model's candidates ----

    def model_inputs(self, task):
        """The stage-1 cache of the task's model (checked by preflight) and its exemplars as candidates."""
        ex_before, laion_before, ex_latents = read_loss_cache(self.layout.loss_cache(task),
                                                              self.models[task.model_path].cache)
        text = encode_prompt(self.base.tokenizer, self.base.text_encoder, task.train_prompt).cpu()
        return ex_before, laion_before, ExemplarCandidates(ex_latents, text)

    def measure_query(self, task, inputs, noise_image: bool = False) -> dict:
        """Exact AbU's measurement of one query (or of its noise-image control) on the customized weights, which it
        leaves unlearned: {"influence" [candidates], "ex_after", "laion_after" [rows], "unlearned", "cost"}.
        `inputs`: model_inputs' (exemplar losses before, LAION losses before, exemplars)."""
        ex_before, laion_before, exemplars = inputs
        what = "noise control's " if noise_image else ""
        unlearned = self.unlearn_query(task, laion_before, noise_image)
        ex_after = self.collect(exemplars, f"{what}exemplar losses")
        laion_after = self.collect(self.laion, f"{what}LAION losses")
        check_finite(task, self.measurement.precision, **{f"{what}exemplar": ex_after, f"{what}LAION": laion_after})
        influence, _ = influence_and_rank(ex_before, ex_after, laion_before, laion_after)
        rows = len(ex_after) + len(laion_after)
        cost = {**self.unlearning_cost(unlearned), "loss tracking": rows * self.measurement.time_samples}
        return {"influence": influence, "ex_after": ex_after, "laion_after": laion_after, "unlearned": unlearned,
                "cost": cost}

    def attribute_query(self, task) -> None:
        """Exact AbU: customize, unlearn the query, re-measure every candidate, rank, write the query's outputs."""
        apply_customization(self.base, self.pristine, self.dataroot / task.model_path)
        m = self.measure_query(task, self.model_inputs(task))
        self.pristine.restore()
        rank = rank_candidates(m["influence"], len(m["ex_after"]) // 2)
        self.write_outputs(task, m["ex_after"], m["laion_after"], m["influence"], rank, m["unlearned"],
                           {"forward_equivalents": m["cost"]})

    def attribute_model_ranked(self, tasks, peers: dict) -> None:
        """Exact AbU with --ranking other than the paper's (utils/ranking.py) for the queries of one model: measure
        each query (and, for control-corrected, one noise-image control per distinct prompt), checkpointing each in
        its folder; then compose each query's score from its parts and its peers' (finished peers are read from
        their influence.pkl) and write."""
        r = self.settings.ranking
        apply_customization(self.base, self.pristine, self.dataroot / tasks[0].model_path)
        inputs = self.model_inputs(tasks[0])
        start = copy_weights(self.params)  # the customized weights
        measured, controls = {}, {}
        for task in tqdm(tasks, desc=f"queries of {tasks[0].model_path}", unit="query"):
            m = self.load_checkpoint(task)
            if m is None:
                m = self.measure_query(task, inputs)
                load_weights(self.params, start)
                if r.ranking in NEEDS_CONTROL and task.prompt in controls:  # same prompt, same noise: same control
                    m["control"], m["cost"]["noise control"] = controls[task.prompt], 0
                elif r.ranking in NEEDS_CONTROL:
                    c = self.measure_query(task, inputs, noise_image=True)
                    load_weights(self.params, start)
                    m["control"], m["cost"]["noise control"] = c["influence"], sum(c["cost"].values())
                save_pickle(self.layout.checkpoint_file(task), {"settings": record(*self.settings.result),
                                                                "provenance": self.models[task.model_path].provenance,
                                                                **m})
            if "control" in m:
                controls.setdefault(task.prompt, m["control"])
            measured[task.synth_image_path] = m
        self.pristine.restore()
        influences = {p: m["influence"] for p, m in measured.items()}
        for task in tasks:
            m, group = measured[task.synth_image_path], peers.get(task.synth_image_path)
            if group is not None:
                influences.update(self.finished_influences([t for t in group if t.synth_image_path not in influences]))
            parts = query_parts(m["influence"], m.get("control"),
                                None if group is None else {t.synth_image_path: influences[t.synth_image_path]
                                                            for t in group})
            n_exemplar = len(m["ex_after"]) // 2
            score = compose(parts, r.ranking, n_exemplar)
            rank = rank_candidates(score, n_exemplar)
            self.write_outputs(task, m["ex_after"], m["laion_after"], score, rank, m["unlearned"],
                               {"forward_equivalents": m["cost"], "ranking": r.ranking, "parts": parts})
            self.layout.checkpoint_file(task).unlink(missing_ok=True)

    def load_checkpoint(self, task):
        """A query's measurement saved by an interrupted run with these settings, or None."""
        path = self.layout.checkpoint_file(task)
        if self.settings.execution.overwrite or not path.is_file():
            return None
        saved = load_pickle(path, "checkpoint", remedy="delete it")
        if changed_settings(saved.pop("settings", {}), *self.settings.result):
            return None
        stale = changed_inputs(saved.pop("provenance", {}), self.models[task.model_path].provenance)
        if stale:
            tqdm.write(f"{task.synth_image_path}: the checkpoint {path} was measured from other inputs ("
                       + "; ".join(stale) + "): measuring again")
            return None
        tqdm.write(f"{task.synth_image_path}: measured by an earlier run, read from {path}")
        return saved

    def attribute_model_two_stage(self, tasks) -> None:
        """Two-stage AbU for the queries of one model (utils/screening.py): unlearn each, screen every candidate
        for all of them, re-score each query's top (--rescore_top, or --keep_top's budget) exactly, rank, write."""
        screening, task0 = self.settings.screening, tasks[0]
        apply_customization(self.base, self.pristine, self.dataroot / task0.model_path)
        before = self.before_on_demand(task0) if screening.before_losses == "on-demand" else None
        ex_before, laion_before, exemplars = (before.mean["exemplar"], before.mean["laion"], before.sets["exemplar"]) \
            if before else self.model_inputs(task0)  # on demand: NaN until measured, filled in place
        start = copy_weights(self.params)  # the customized weights, theta_0
        unlearned, weights = [], []
        for task in tasks:
            unlearned.append(self.unlearn_query(task, laion_before))
            weights.append(copy_weights(self.params))
            load_weights(self.params, start)
        t_index = screen_timesteps(self.measurement.time_samples, screening.screen_time_samples)
        screens = self.screen_model(task0, exemplars, start, weights, t_index, before)
        screened_rows = (len(ex_before) + len(laion_before)) * screening.screen_flips // 2
        passes = {"coarse": len(tasks), "first-order": 3, "caption": 0, "coarse+caption": len(tasks)}
        model_screen_cost = screened_rows * len(t_index) * passes[screening.screen]  # the caption screen: no UNet pass
        model_before_cost = before.forwards if before else 0  # the screen's timesteps, the stopping rule's rows
        n_candidates = (len(ex_before) + len(laion_before)) // 2
        if screening.keep_top >= n_candidates:
            tqdm.write(f"warning: --keep_top {screening.keep_top} is at least the {n_candidates} candidates of "
                       f"{task0.model_path}: every candidate is re-scored (exact AbU, at more than its cost); lower "
                       "--keep_top")
        for q, task in enumerate(tasks):
            folded = [np.concatenate([fold_flips(s["exemplar"][:, q]), fold_flips(s["laion"][:, q])]) for s in screens]
            screen = folded[0]  # ranks what is not re-scored
            spent_before = before.forwards if before else 0
            load_weights(self.params, weights[q])
            ex_after, laion_after, top, capped = self.rescore(task, folded, exemplars, ex_before, laion_before,
                                                              (before, start, weights[q]))
            load_weights(self.params, start)
            influence, rank = influence_and_rank(ex_before, ex_after, laion_before, laion_after, screen=screen)
            cost = {**self.unlearning_cost(unlearned[q]), "screen": model_screen_cost / len(tasks),
                    "re-scoring": 2 * len(top) * self.measurement.time_samples}  # both flips of each
            if before:  # the model's share, and the re-scored candidates no earlier query had measured
                cost["losses before (on demand)"] = model_before_cost / len(tasks) + before.forwards - spent_before
            tqdm.write(f"{task.synth_image_path}: re-scored {len(top)} of {n_candidates} candidates" + (
                f"; the cap --rescore_top {screening.rescore_top} stopped --keep_top {screening.keep_top} before "
                "its top was settled: raise --rescore_top for this query" if capped else ""))
            self.write_outputs(task, ex_after, laion_after, influence, rank, unlearned[q], {
                "forward_equivalents": cost, "screen": screen, "rescored": int(len(top)), "rescore_capped": capped,
                "screen_timesteps": t_index.tolist()})
        self.pristine.restore()

    def before_on_demand(self, task) -> BeforeLosses:
        """--before_losses on-demand: the model's exemplars encoded as stage 1 encodes them, and a BeforeLosses over
        them and the LAION rows, measured at the customized weights (loaded now); the collateral stopping rule's
        reference rows are measured at once, since unlearning moves the weights."""
        common = self.settings.common
        exemplars = encode_exemplars(self.base, self.models[task.model_path].exemplar_paths, task.train_prompt,
                                     common.vae_batch_size, torch.Generator().manual_seed(common.seed))
        before = BeforeLosses(lambda candidates, desc, rows, steps: self.collect(
            candidates, desc, rows=rows, timestep_index=steps, per_timestep=True),
            {"exemplar": exemplars, "laion": self.laion}, self.measurement.time_samples)
        if self.settings.stopping.stop_rule == "collateral":
            before.ensure("laion", np.arange(min(self.settings.stopping.stop_reference, len(self.laion))))
        return before

    def rescore(self, task, folded, exemplars, ex_before, laion_before, on_demand) -> tuple:
        """Re-measure candidates exactly at the query's unlearned weights (already loaded): the screen's top
        --rescore_top (the union over the screens of `folded`, each [candidates]), or with --keep_top in the first
        screen's order until none left could enter the exact top K (utils.screening.could_enter_top), at most
        --rescore_top. `on_demand`: (BeforeLosses or None, the customized weights, the query's unlearned weights);
        with a BeforeLosses, the losses before of the chosen rows are measured first, at the customized weights.
        Returns the after-losses [rows] (NaN where not re-scored), the candidates re-scored, and whether --keep_top's
        rule wanted more than the cap allowed."""
        screening, n_ex = self.settings.screening, len(ex_before) // 2
        before, start, unlearned_weights = on_demand
        ex_after = np.full(len(ex_before), np.nan, np.float32)
        laion_after = np.full(len(laion_before), np.nan, np.float32)

        def measure(chosen):
            rows = {"exemplar": rescore_rows(chosen[chosen < n_ex], n_ex),
                    "laion": rescore_rows(chosen[chosen >= n_ex] - n_ex, len(laion_before) // 2)}
            if before:
                load_weights(self.params, start)
                for key in rows:
                    before.ensure(key, rows[key])
                load_weights(self.params, unlearned_weights)
            for key, name, candidates, after in (("exemplar", "exemplars", exemplars, ex_after),
                                                 ("laion", "LAION", self.laion, laion_after)):
                if len(rows[key]):
                    after[rows[key]] = self.collect(candidates, f"re-scored {name}", rows=rows[key])
                    check_finite(task, self.measurement.precision, **{name: after[rows[key]]})

        if not screening.keep_top:
            tops = [rank_candidates(f, n_ex)[:screening.rescore_top] for f in folded]
            top = tops[0] if len(tops) == 1 else np.unique(np.concatenate(tops))  # a union: each screen's top M
            measure(top)
            return ex_after, laion_after, top, False
        screen, k = folded[0], screening.keep_top
        order = rank_candidates(screen, n_ex)
        cap = min(screening.rescore_top, len(order))
        done = min(k, cap)
        measure(order[:done])
        step = max(1, k // 10)
        while done < len(order):  # K/10 more at a time (up to the cap), while one of them could still enter the top K
            following = order[done:min(done + step, cap) if done < cap else done + step]
            influence, _ = influence_and_rank(ex_before, ex_after, laion_before, laion_after)
            if not could_enter_top(screen[following], screen[order[:done]], influence[order[:done]], k,
                                   screening.keep_margin).any():
                break
            if done == cap:  # the rule wants more than --rescore_top allows
                return ex_after, laion_after, order[:done], True
            measure(following)
            done += len(following)
        return ex_after, laion_after, order[:done], False

    def screen_model(self, task, exemplars, start, weights, t_index, before=None) -> list:
        """The screens of --screen, each {"exemplar": [rows, Q], "laion": [rows, Q]}: every row's estimated loss
        rise (or, for the caption screen, a score that orders rows alike) for each query; the first ranks the rest.
        `before`: a BeforeLosses (--before_losses on-demand) for the coarse screen, else stage 1's cache."""
        m, kind = self.measurement, self.settings.screening.screen
        deltas = [{n: w[n] - start[n] for n in start} for w in weights]
        screens = []
        if kind == "first-order":
            kw = dict(batch_size=m.batch_size, time_samples=m.time_samples, seed=m.seed, timestep_index=t_index,
                      device=m.device, precision=m.precision, chunk=self.settings.screening.screen_batch_size)
            screens.append({"exemplar": first_order_screen(self.base.unet, self.base.scheduler, exemplars, deltas, **kw),
                            "laion": first_order_screen(self.base.unet, self.base.scheduler, self.laion, deltas, **kw)})
        if kind in ("coarse", "coarse+caption"):
            screens.append(self.coarse_screen(task, exemplars, start, weights, t_index, before))
        if kind in ("caption", "coarse+caption"):
            screens.append(caption_screen(deltas, exemplars.text_embedding, len(exemplars),
                                          self.laion.text_embeddings[:self.laion.subset_size]))
        return screens

    def coarse_screen(self, task, exemplars, start, weights, t_index, before=None) -> dict:
        """The exact rise at the screen timesteps, one pass over the candidates per query; with --screen_flips 1 over
        the unflipped rows only (the first half), each value standing for the candidate's flipped row too. The
        losses before: stage 1's cache, or measured now (`before`, a BeforeLosses; the customized weights are
        loaded)."""
        one_flip = self.settings.screening.screen_flips == 1
        if before:
            for key, n_rows in (("exemplar", len(exemplars)), ("laion", len(self.laion))):
                before.ensure(key, np.arange(n_rows // 2 if one_flip else n_rows), t_index)
            ex_before_t, laion_before_t = before.by_t["exemplar"], before.by_t["laion"]
        else:
            ex_before_t, laion_before_t = load_losses_by_timestep(self.layout.loss_cache(task))
        out = {"exemplar": [], "laion": []}
        for w in weights:
            load_weights(self.params, w)
            for key, candidates, by_t in (("exemplar", exemplars, ex_before_t), ("laion", self.laion, laion_before_t)):
                rows = np.arange(len(by_t) // 2 if one_flip else len(by_t))
                after = self.collect(candidates, f"coarse screen ({key})", rows=rows, timestep_index=t_index,
                                     per_timestep=True)
                rise = (after.astype(np.float64) - by_t[rows][:, t_index]).mean(axis=1)
                out[key].append(np.concatenate([rise, rise]) if one_flip else rise)
            load_weights(self.params, start)
        return {k: np.stack(v, axis=1) for k, v in out.items()}

    # ---- the outputs ----

    def write_outputs(self, task, ex_after, laion_after, influence, rank, unlearned: dict, extra: dict) -> None:
        """The query's after-losses, picture and, last, influence.pkl (with the settings that made it)."""
        ex_paths = self.models[task.model_path].exemplar_paths
        out_dir = self.layout.query_dir(task)
        save_npy(out_dir / EXEMPLAR_LOSS, ex_after)
        save_npy(out_dir / LAION_LOSS, laion_after)
        save_top_k_figure(out_dir / VISUALIZATION, self.dataroot / task.synth_image_path, influence, rank,
                          ex_paths, self.laion_paths)
        settings = record(*self.settings.result)
        save_pickle(self.layout.influence_file(task), {  # written last: its presence marks a finished query
            "influence": influence, "rank": rank, "n_exemplar": len(ex_paths), "query_loss": unlearned["query_loss"],
            "unlearn_loss_history": unlearned["history"], "unlearn_steps_taken": len(unlearned["history"]),
            "stop": unlearned.get("stop"), "settings": settings, "task": asdict(task), "mode": settings["mode"],
            "provenance": self.models[task.model_path].provenance, **extra})
        ranks = sorted(int(i) + 1 for i in np.flatnonzero(rank < len(ex_paths)))
        before, after = unlearned["query_loss"]
        tqdm.write(f"{task.synth_image_path}: query loss {before:.4f} -> {after:.4f}; "
                   f"exemplars at ranks {ranks} of {len(rank)} -> {out_dir}")
