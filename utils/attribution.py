"""Stage 2's method (docs/method.md, sections 4-5): one run over a task file's queries, routed unit by unit.

compute_influence.py checks everything with `preflight` (and the finished queries with `check_finished_queries`
and `check_finished_inputs`), builds one `Attributor` per run and hands it each unit of work (`work_units`: a query,
or all of a model's queries). The parts:

* utils/unlearning.py, `QueryUnlearner`: the query's inputs and controls, unlearning with the stopping rule, its cost;
* here, exact scoring: every candidate re-measured after unlearning (`attribute_query`), or with a --ranking that
  needs a control or peers, a model's queries measured, checkpointed and composed (`attribute_model_ranked`,
  utils/ranking.py's RANKINGS);
* utils/two_stage.py, `TwoStageScorer`: screen (utils/screening.py's SCREENS) and re-score;
* here, `write_outputs`: what a query leaves, influence.pkl last.

Which weights the UNet holds is always a `with`: `customized(model)` loads a model and brings the base back,
utils.weights.restored / loaded put the customized weights back after unlearning or a measurement.
"""
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from tqdm.auto import tqdm

from .customization import apply_customization, check_customized_model, customization_fingerprint
from .data import ExemplarCandidates, laion_image_paths
from .encoders import encode_prompt
from .errors import InputError
from .fingerprints import changed_inputs
from .io import load_pickle, save_npy, save_pickle
from .layout import EXEMPLAR_LOSS, LAION_LOSS, VISUALIZATION, ResultsLayout
from .loss_cache import RUN_STAGE_1, cache_fingerprint, cache_is_complete, check_loss_cache, loss_settings, \
    read_loss_cache, read_losses_at_timesteps
from .losses import grid_timesteps_below
from .metrics import influence_and_rank, rank_candidates
from .precision import loss_unet
from .ranking import RANKINGS, compose, query_parts
from .settings import InfluenceSettings, changed_settings, record
from .tasks import exemplar_paths, tasks_by_model
from .transforms import load_rgb
from .two_stage import ModelCandidates, TwoStageScorer, check_finite
from .unlearning import QueryUnlearner, fisher_fingerprint
from .visualize import save_top_k_figure
from .weights import PristineWeights, restored


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


def input_provenance(task, base, laion, dataroot: Path, layout: ResultsLayout, on_demand: bool,
                     fisher: Optional[str]) -> dict:
    """What a query's numbers were computed from, by fingerprint: the base model, the customized model, the candidate
    arrays, the Fisher file unlearning reads (`fisher`: utils.unlearning.fisher_fingerprint) and the stage-1 cache
    subtracted from (None with --before_losses on-demand, which reads none).
    Recorded in influence.pkl and in measured.pkl, compared before either is reused."""
    cache = layout.loss_cache(task)
    return {"base_model": base.fingerprint,
            "customized_model": customization_fingerprint(Path(dataroot) / task.model_path),
            "laion_arrays": laion.fingerprint(), "fisher": fisher,
            "loss_cache": None if on_demand or not cache_is_complete(cache) else cache_fingerprint(cache)}


def preflight(settings: InfluenceSettings, dataroot: Path, todo, laion, base, layout: ResultsLayout) -> dict:
    """Check every query's image and every model's loss cache before hours of unlearning, not at query 37.
    Returns {model_path: ModelInputs}."""
    checked, on_demand = {}, settings.screening.before_losses == "on-demand"
    fisher = fisher_fingerprint(settings, dataroot)
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
                    task, base, laion, dataroot, layout, on_demand=True, fisher=fisher))
                continue
            expected = loss_settings(task, base, laion, dataroot, 2 * len(ex_paths), settings.measurement())
            cached = check_loss_cache(layout.loss_cache(task), expected, remedy)
            checked[task.model_path] = ModelInputs(ex_paths, cached, input_provenance(task, base, laion, dataroot,
                                                                                      layout, False, fisher))
    return checked


class ModelInputs(NamedTuple):
    """What preflight found for one model: its exemplar images, its stage-1 cache's settings (None when the losses
    before unlearning are measured on demand) and the fingerprints of its inputs (`input_provenance`)."""

    exemplar_paths: list
    cache: Optional[dict]
    provenance: dict


def work_units(settings: InfluenceSettings, todo) -> tuple:
    """(units, per_query): each query alone, or each model's queries together when the mode screens them together
    (two-stage) or the ranking reads a control or peers (RANKINGS)."""
    ranking = RANKINGS[settings.ranking.ranking]
    per_query = settings.screening.mode == "exact" and not (ranking.needs_control or ranking.needs_peers)
    return ([[t] for t in todo] if per_query else list(tasks_by_model(todo).values())), per_query


class Attributor:
    """What every unit of a run shares: the settings, the base model, the candidates, the query unlearner, the loss
    measurement and the outputs' places; `attribute` routes a unit to its scorer.

    Losses are measured with `loss_unet` (torch.compile'd with --compile); unlearning runs the eager UNet, whose
    parameters the compiled module shares.
    """

    def __init__(self, settings: InfluenceSettings, base, laion, dataroot: Path, layout: ResultsLayout, models: dict):
        self.settings, self.base, self.laion, self.dataroot, self.layout = settings, base, laion, dataroot, layout
        self.models = models  # from preflight: {model_path: ModelInputs}
        self.measurement = m = settings.measurement()
        # the grid timesteps the loss rise reads (--influence_timesteps_below; all T by default)
        self.influence_timesteps = grid_timesteps_below(base.scheduler, m.batch_size, m.time_samples,
                                                        settings.ranking.influence_timesteps_below)
        self.loss_unet = loss_unet(base.unet, settings.common.compile)
        self.pristine = PristineWeights(base.unet)
        self.unlearner = QueryUnlearner(settings, base, dataroot, self.collect, self.pristine, reference=laion)
        self.laion_paths = laion_image_paths(dataroot, laion.total)
        _, self.per_query = work_units(settings, [])

    def collect(self, candidates, desc: str, **kw) -> np.ndarray:
        return self.measurement.collect(self.loss_unet, self.base.scheduler, candidates, desc, **kw)

    @contextmanager
    def customized(self, model_path: str):
        """The block runs on the customized model of `model_path`; the base model comes back after."""
        apply_customization(self.base, self.pristine, self.dataroot / model_path)
        try:
            yield
        finally:
            self.pristine.restore()

    def attribute(self, unit, peers: dict) -> None:
        """Score a unit of work_units and write its queries' outputs."""
        with self.customized(unit[0].model_path):
            if self.settings.screening.mode == "two-stage":
                TwoStageScorer(self).score_model(unit)
            elif self.per_query:
                self.attribute_query(unit[0])
            else:
                self.attribute_model_ranked(unit, peers)

    # ---- a model's candidates ----

    def exemplar_paths(self, task) -> list:
        return self.models[task.model_path].exemplar_paths

    def cache_dir(self, task) -> Path:
        return self.layout.loss_cache(task)

    def cached(self, task) -> ModelCandidates:
        """The stage-1 cache of the task's model (checked by preflight) and its exemplars as candidates; with
        --influence_timesteps_below, the befores are the means over the grid timesteps the rise reads."""
        cached = self.models[task.model_path].cache
        ex_before, laion_before, ex_latents = read_loss_cache(self.cache_dir(task), cached)
        text = encode_prompt(self.base.tokenizer, self.base.text_encoder, task.train_prompt).cpu()
        exemplars = ExemplarCandidates(ex_latents, text)
        if len(self.influence_timesteps) == self.measurement.time_samples:
            return ModelCandidates(ex_before, laion_before, exemplars)
        return ModelCandidates(*read_losses_at_timesteps(self.cache_dir(task), cached, self.influence_timesteps),
                               exemplars, laion_before_all_t=laion_before)

    # ---- exact scoring ----

    def measure_query(self, task, c: ModelCandidates, noise_image: bool = False) -> dict:
        """Exact AbU's measurement of one query (or of its noise-image control), unlearned in place on the customized
        weights: {"influence" [candidates], "ex_after", "laion_after" [rows], "unlearned", "cost"}."""
        what = "noise control's " if noise_image else ""
        unlearned = self.unlearner.unlearn(task, c.laion_before if c.laion_before_all_t is None
                                           else c.laion_before_all_t, noise_image)
        at = {"timestep_index": self.influence_timesteps}  # the timesteps the befores were averaged over
        ex_after = self.collect(c.exemplars, f"{what}exemplar losses", **at)
        laion_after = self.collect(self.laion, f"{what}LAION losses", **at)
        check_finite(task, self.measurement.precision, **{f"{what}exemplar": ex_after, f"{what}LAION": laion_after})
        influence, _ = influence_and_rank(c.ex_before, ex_after, c.laion_before, laion_after)
        rows = len(ex_after) + len(laion_after)
        cost = {**self.unlearner.cost(unlearned), "loss tracking": rows * len(self.influence_timesteps)}
        return {"influence": influence, "ex_after": ex_after, "laion_after": laion_after, "unlearned": unlearned,
                "cost": cost}

    def attribute_query(self, task) -> None:
        """Exact AbU: unlearn the query, re-measure every candidate, rank, write the query's outputs."""
        m = self.measure_query(task, self.cached(task))
        rank = rank_candidates(m["influence"], len(m["ex_after"]) // 2)
        self.write_outputs(task, m["ex_after"], m["laion_after"], m["influence"], rank, m["unlearned"],
                           {"forward_equivalents": m["cost"]})

    def attribute_model_ranked(self, tasks, peers: dict) -> None:
        """Exact AbU with a --ranking that reads a control or peers (RANKINGS) for the queries of one model: measure
        each query (and, for a control, one noise-image control per distinct prompt), checkpointing each in its
        folder; then compose each query's score from its parts and its peers' (finished peers are read from their
        influence.pkl) and write."""
        name = self.settings.ranking.ranking
        ranking, c = RANKINGS[name], self.cached(tasks[0])
        measured, controls = {}, {}
        for task in tqdm(tasks, desc=f"queries of {tasks[0].model_path}", unit="query"):
            m = self.load_checkpoint(task)
            if m is None:
                with restored(self.unlearner.params):
                    m = self.measure_query(task, c)
                if ranking.needs_control and task.prompt in controls:  # same prompt, same noise: same control
                    m["control"], m["cost"]["noise control"] = controls[task.prompt], 0
                elif ranking.needs_control:
                    with restored(self.unlearner.params):
                        control = self.measure_query(task, c, noise_image=True)
                    m["control"], m["cost"]["noise control"] = control["influence"], sum(control["cost"].values())
                save_pickle(self.layout.checkpoint_file(task), {"settings": record(*self.settings.result),
                                                                "provenance": self.models[task.model_path].provenance,
                                                                **m})
            if "control" in m:
                controls.setdefault(task.prompt, m["control"])
            measured[task.synth_image_path] = m
        influences = {p: m["influence"] for p, m in measured.items()}
        for task in tasks:
            m, group = measured[task.synth_image_path], peers.get(task.synth_image_path)
            if group is not None:
                influences.update(self.finished_influences([t for t in group if t.synth_image_path not in influences]))
            parts = query_parts(m["influence"], m.get("control"),
                                None if group is None else {t.synth_image_path: influences[t.synth_image_path]
                                                            for t in group})
            n_exemplar = len(m["ex_after"]) // 2
            score = compose(parts, name, n_exemplar)
            rank = rank_candidates(score, n_exemplar)
            self.write_outputs(task, m["ex_after"], m["laion_after"], score, rank, m["unlearned"],
                               {"forward_equivalents": m["cost"], "ranking": name, "parts": parts})
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
