"""Where every output of the pipeline lives: the one place that spells the results layout.

    <result_dir>/orig_loss/<model_path without models/>/             stage 1, one loss cache per model
        exemplar_loss.npy, laion_loss.npy               each row's loss, the mean over the T timesteps
        exemplar_loss_by_t.npy, laion_loss_by_t.npy     the same per timestep, [rows, T] (two-stage screening)
        exemplar_latents.npy, settings.json (written last)
    <result_dir>/influence/<synth_image_path without synth/>/         stage 2 (and the baselines), one per query
        exemplar_loss.npy, laion_loss.npy, visualization.jpg, influence.pkl (written last); the losses after
                          unlearning, over the T timesteps (with --influence_timesteps_below, those below it)
        measured.pkl      --ranking other than influence: a query's measurement until its peers are measured
    <result_dir>/eval/<task file name>/                               evaluate.py
        per_query.csv, summary.csv, summary.md, index.html (the browsable page, utils/report.py)

The file written last marks a finished output: reruns skip a model or query whose marker exists. While a
process works on one, it holds a claim file beside it (`.claim`, removed when it ends), so two processes
started on the same task file do not do the same work twice (utils.claims.claim).
"""
from pathlib import Path
from typing import Optional

from .tasks import Task

EXEMPLAR_LOSS = "exemplar_loss.npy"
LAION_LOSS = "laion_loss.npy"
EXEMPLAR_LOSS_BY_T = "exemplar_loss_by_t.npy"
LAION_LOSS_BY_T = "laion_loss_by_t.npy"
EXEMPLAR_LATENTS = "exemplar_latents.npy"
SETTINGS = "settings.json"
INFLUENCE = "influence.pkl"
VISUALIZATION = "visualization.jpg"
CHECKPOINT = "measured.pkl"


class ResultsLayout:
    """Paths under one results folder; `loss_cache_root` lets several variants share one stage 1."""

    def __init__(self, result_dir, loss_cache_root: Optional[str] = None):
        self.result_dir = Path(result_dir)
        self.loss_cache_root = Path(loss_cache_root) if loss_cache_root else self.result_dir / "orig_loss"

    def loss_cache(self, task: Task) -> Path:
        """Stage 1's cache of the task's model."""
        return self.loss_cache_root / task.model_key

    def query_dir(self, task: Task) -> Path:
        return self.result_dir / "influence" / task.query_key

    def influence_file(self, task: Task) -> Path:
        """A query's result; its presence marks the query as done."""
        return self.query_dir(task) / INFLUENCE

    def cache_claim(self, task: Task) -> Path:
        return self.loss_cache(task) / ".claim"

    def checkpoint_file(self, task: Task) -> Path:
        """A query's measurement, saved until influence.pkl is written when its ranking waits for its peers'."""
        return self.query_dir(task) / CHECKPOINT

    def query_claim(self, task: Task) -> Path:
        return self.query_dir(task) / ".claim"

    def model_claim(self, task: Task) -> Path:
        """The claim on all of a model's queries (the two-stage mode works on them together)."""
        return self.result_dir / "influence" / ".models" / f"{task.model_key.replace('/', '__')}.claim"

    def eval_dir(self, task_json) -> Path:
        return self.result_dir / "eval" / Path(task_json).stem
