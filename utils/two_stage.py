"""Two-stage scoring of one model's queries (docs/method.md, section 9; the screens are utils/screening.py's SCREENS):
unlearn each query, screen every candidate for all of them at once, re-score each query's top exactly, rank.

Read top to bottom: `score_model` is the whole flow; `before_on_demand` replaces stage 1's cache with the few losses
the flow reads (--before_losses on-demand); `rescore` is the re-scoring rule (a fixed top, or --keep_top's budget).
Which weights are loaded is always the `with` around a measurement (utils.weights.loaded / restored): the
customized ones outside, a query's unlearned ones inside.
"""
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import encode_exemplars
from .losses import check_finite_losses
from .metrics import fold_flips, influence_and_rank, rank_candidates
from .screening import SCREENS, BeforeLosses, ScreenInputs, could_enter_top, rescore_rows, screen_timesteps
from .weights import copy_weights, loaded, restored


@dataclass
class ModelCandidates:
    """A model's candidates and their losses before unlearning: exemplar and LAION rows [rows] (NaN where a
    BeforeLosses has not measured them yet: it fills them in place) and the exemplars as loss-loop candidates."""

    ex_before: np.ndarray
    laion_before: np.ndarray
    exemplars: object  # utils.data.ExemplarCandidates
    # the LAION rows' mean over all T when the befores above read fewer timesteps (--influence_timesteps_below):
    # what the collateral stopping rule compares its full-T checks with
    laion_before_all_t: Optional[np.ndarray] = None


def check_finite(task, precision: str, **measured) -> None:
    """Stop before writing a query whose losses after unlearning hold NaN or inf (utils.losses.check_finite_losses)."""
    for name, losses in measured.items():
        check_finite_losses(losses, f"{task.synth_image_path}: {name} after unlearning", precision,
                            "unlearning diverged: lower --unlearn_lr, raise --fisher_floor (tiny Fisher entries), "
                            "or with fp16 use --precision bf16 or fp32")


class TwoStageScorer:
    """Two-stage AbU for the queries of one model, with the run's parts (`run`: utils.attribution.Attributor): its
    settings, base model, LAION candidates, query unlearner (utils.unlearning.QueryUnlearner) and loss measurement
    (`collect`), a model's stage-1 candidates (`cached`, `cache_dir`), its exemplar images (`exemplar_paths`), and
    the writer of a query's outputs (`write_outputs`)."""

    def __init__(self, run):
        self.run, self.settings, self.laion, self.unlearner = run, run.settings, run.laion, run.unlearner
        self.screening, self.time_samples = run.settings.screening, run.measurement.time_samples

    def score_model(self, tasks) -> None:
        """Unlearn each query, screen every candidate for all of them (--screen), re-score each query's top exactly
        (--rescore_top, or --keep_top's budget), rank by the exact influence then the screen, write. The customized
        model is loaded (utils.customization.apply_customization) and stays so."""
        screening, task0, params = self.screening, tasks[0], self.unlearner.params
        before = self.before_on_demand(task0) if screening.before_losses == "on-demand" else None
        c = ModelCandidates(before.mean["exemplar"], before.mean["laion"], before.sets["exemplar"]) if before \
            else self.run.cached(task0)
        start = copy_weights(params)  # the customized weights, theta_0
        unlearned, weights = [], []
        for task in tasks:
            with restored(params):
                unlearned.append(self.unlearner.unlearn(task, c.laion_before))
                weights.append(copy_weights(params))
        t_index = screen_timesteps(self.time_samples, screening.screen_time_samples)
        screen = SCREENS[screening.screen]
        inputs = ScreenInputs(self.run.base.unet, self.run.base.scheduler, self.run.measurement, self.run.collect,
                              params, start, weights, c.exemplars, self.laion, t_index, screening.screen_flips,
                              screening.screen_batch_size, before, None if before else self.run.cache_dir(task0))
        screens = [estimate(inputs) for estimate in screen.estimates]
        screened_rows = (len(c.ex_before) + len(c.laion_before)) * screening.screen_flips // 2
        model_screen_cost = screened_rows * len(t_index) * screen.passes(len(tasks))  # caption: no UNet pass
        model_before_cost = before.forwards if before else 0  # the screen's timesteps, the stopping rule's rows
        n_candidates = (len(c.ex_before) + len(c.laion_before)) // 2
        if screening.keep_top >= n_candidates:
            tqdm.write(f"warning: --keep_top {screening.keep_top} is at least the {n_candidates} candidates of "
                       f"{task0.model_path}: every candidate is re-scored (exact AbU, at more than its cost); lower "
                       "--keep_top")
        for q, task in enumerate(tasks):
            folded = [np.concatenate([fold_flips(s["exemplar"][:, q]), fold_flips(s["laion"][:, q])]) for s in screens]
            ranked_by = folded[0]  # ranks what is not re-scored
            spent_before = before.forwards if before else 0
            with loaded(params, weights[q]):
                ex_after, laion_after, top, capped = self.rescore(task, folded, c, before, start)
            influence, rank = influence_and_rank(c.ex_before, ex_after, c.laion_before, laion_after, screen=ranked_by)
            cost = {**self.unlearner.cost(unlearned[q]), "screen": model_screen_cost / len(tasks),
                    "re-scoring": 2 * len(top) * self.time_samples}  # both flips of each
            if before:  # the model's share, and the re-scored candidates no earlier query had measured
                cost["losses before (on demand)"] = model_before_cost / len(tasks) + before.forwards - spent_before
            tqdm.write(f"{task.synth_image_path}: re-scored {len(top)} of {n_candidates} candidates" + (
                f"; the cap --rescore_top {screening.rescore_top} stopped --keep_top {screening.keep_top} before "
                "its top was settled: raise --rescore_top for this query" if capped else ""))
            self.run.write_outputs(task, ex_after, laion_after, influence, rank, unlearned[q], {
                "forward_equivalents": cost, "screen": ranked_by, "rescored": int(len(top)), "rescore_capped": capped,
                "screen_timesteps": t_index.tolist()})

    def before_on_demand(self, task) -> BeforeLosses:
        """--before_losses on-demand: the model's exemplars encoded as stage 1 encodes them, and a BeforeLosses over
        them and the LAION rows, measured at the customized weights (loaded now); the collateral stopping rule's
        reference rows are measured at once, since unlearning moves the weights."""
        common = self.settings.common
        exemplars = encode_exemplars(self.run.base, self.run.exemplar_paths(task), task.train_prompt,
                                     common.vae_batch_size, torch.Generator().manual_seed(common.seed))
        before = BeforeLosses(lambda candidates, desc, rows, steps: self.run.collect(
            candidates, desc, rows=rows, timestep_index=steps, per_timestep=True),
            {"exemplar": exemplars, "laion": self.laion}, self.time_samples)
        if self.settings.stopping.stop_rule == "collateral":
            before.ensure("laion", np.arange(self.unlearner.reference_rows()))
        return before

    def rescore(self, task, folded: List[np.ndarray], c: ModelCandidates, before: Optional[BeforeLosses],
                start) -> tuple:
        """Re-measure candidates exactly at the query's unlearned weights (loaded): the screen's top --rescore_top
        (the union over the screens of `folded`, each [candidates]), or with --keep_top in the first screen's order
        until none left could enter the exact top K (utils.screening.could_enter_top), at most --rescore_top. With a
        BeforeLosses, the losses before of the chosen rows are measured first, at the customized weights `start`.
        Returns the after-losses [rows] (NaN where not re-scored), the candidates re-scored, and whether --keep_top's
        rule wanted more than the cap allowed."""
        screening, n_ex, params = self.screening, len(c.ex_before) // 2, self.unlearner.params
        ex_after = np.full(len(c.ex_before), np.nan, np.float32)
        laion_after = np.full(len(c.laion_before), np.nan, np.float32)

        def measure(chosen):
            rows = {"exemplar": rescore_rows(chosen[chosen < n_ex], n_ex),
                    "laion": rescore_rows(chosen[chosen >= n_ex] - n_ex, len(c.laion_before) // 2)}
            if before:
                with loaded(params, start):
                    for key in rows:
                        before.ensure(key, rows[key])
            for key, name, candidates, after in (("exemplar", "exemplars", c.exemplars, ex_after),
                                                 ("laion", "LAION", self.laion, laion_after)):
                if len(rows[key]):
                    after[rows[key]] = self.run.collect(candidates, f"re-scored {name}", rows=rows[key])
                    check_finite(task, self.settings.common.precision, **{name: after[rows[key]]})

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
            influence, _ = influence_and_rank(c.ex_before, ex_after, c.laion_before, laion_after)
            if not could_enter_top(screen[following], screen[order[:done]], influence[order[:done]], k,
                                   screening.keep_margin).any():
                break
            if done == cap:  # the rule wants more than --rescore_top allows
                return ex_after, laion_after, order[:done], True
            measure(following)
            done += len(following)
        return ex_after, laion_after, order[:done], False
