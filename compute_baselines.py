"""Attribution baselines that need no unlearning, written in compute_influence.py's output format.

    python compute_baselines.py --method vae --task_json ... --result_dir results/mini_abc/vae_cosine

Methods (random, pixel, vae, gradient) are described and implemented in utils/baselines.py, one function each;
candidates, flip folding (max of a candidate's two rows) and ranking (ties against the exemplars) are as in
compute_influence.py. Writes <result_dir>/influence/<query>/influence.pkl for every query without one
(--overwrite: every query).
"""
import argparse
import time
from dataclasses import asdict
from functools import cache

from tqdm.auto import tqdm

from utils.baselines import BASELINES, BaselineInputs, baseline_provenance
from utils.cli import check_dataroot, run
from utils.data import LaionCandidates
from utils.errors import InputError
from utils.fingerprints import changed_inputs
from utils.io import load_pickle, save_pickle
from utils.layout import ResultsLayout
from utils.metrics import rank_candidates
from utils.settings import BaselineSettings, add_flags, changed_settings, from_flags, record
from utils.tasks import exemplar_paths, load_tasks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, BaselineSettings)
    settings = from_flags(BaselineSettings, parser.parse_args(argv))
    dataroot = check_dataroot(settings.dataroot)
    tasks = load_tasks(settings.task_json)
    laion = LaionCandidates(dataroot, settings.laion_subset_size)
    layout = ResultsLayout(settings.result_dir, settings.loss_cache_dir)
    todo = [t for t in tasks if settings.overwrite or not layout.influence_file(t).is_file()]
    inputs = BaselineInputs(settings, dataroot, laion, layout)
    provenance = cache(lambda model_path: baseline_provenance(inputs, next(t for t in tasks if t.model_path == model_path)))
    for task in (t for t in tasks if t not in todo):  # a finished result of other settings or inputs is not skipped
        recorded = load_pickle(layout.influence_file(task), "finished result", remedy="pass --overwrite")
        stale = changed_settings(recorded.get("settings", record(settings)), settings) + changed_inputs(
            recorded.get("provenance", provenance(task.model_path)), provenance(task.model_path))
        if stale:
            raise InputError(f"{layout.influence_file(task)} is a finished {settings.method} result made with other "
                             "settings or inputs than this run's:\n  " + "\n  ".join(stale) +
                             "\nPass --overwrite to recompute it, or give this variant its own --result_dir")

    start = time.time()
    influences = BASELINES[settings.method](inputs, todo)
    for task in tqdm(todo, desc=settings.method, unit="query"):
        n_ex = len(exemplar_paths(dataroot, task))
        influence = influences[task.query_key]
        save_pickle(layout.influence_file(task), {
            "influence": influence, "rank": rank_candidates(influence, n_ex), "n_exemplar": n_ex,
            "method": settings.method, "task": asdict(task), "provenance": provenance(task.model_path),
            "settings": record(settings)})
    print(f"{settings.method}: {len(todo)} of {len(tasks)} queries in {time.time() - start:.1f} s "
          f"-> {settings.result_dir}/influence")


if __name__ == "__main__":
    run(main)
