"""Stage 2: unlearn each synthesized query, re-measure the candidates' losses, rank them by loss increase.

    python compute_influence.py --task_json tasks/demo_task.json

For each query of the task file, writes <result_dir>/influence/<synth path without 'synth/'>/ with
exemplar_loss.npy and laion_loss.npy (after unlearning), visualization.jpg (query + top 10) and, last,
influence.pkl (influence, rank, n_exemplar, query_loss, settings). Needs stage 1's cache of the query's
model, made with the same settings (checked for every query before the first one is unlearned), except with
--mode two-stage --before_losses on-demand, which measures the few losses before unlearning it reads itself.
--ranking picks what the candidates are ranked by (utils/ranking.py): the paper's loss rise by default, or a
ranking that removes the prompt's part (then `influence` is that ranking's score and `parts` what it is made of).
The flags are declared in utils/settings.py, the method is utils/attribution.py.
"""
import time
from functools import cache

from tqdm.auto import tqdm

from utils.attribution import (Attributor, check_finished_inputs, check_finished_queries, input_provenance,
                               preflight, work_units)
from utils.claims import claim, finished_since
from utils.cli import check_dataroot, run
from utils.data import LaionCandidates
from utils.host_memory import configure_heap
from utils.io import check_writable
from utils.layout import ResultsLayout
from utils.models import check_candidates_fit, load_base_model
from utils.precision import configure_unet
from utils.processes import process_share
from utils.ranking import RANKINGS, peers_of
from utils.settings import InfluenceSettings, parse_settings, with_device
from utils.tasks import load_tasks
from utils.unlearning import fisher_fingerprint


def main(argv=None):
    settings = parse_settings(InfluenceSettings, __doc__, argv)
    common, overwrite = settings.common, settings.execution.overwrite
    configure_heap()  # host memory that follows the batch size, not the number of candidates

    # checks up front: the folders, the task file
    dataroot = check_dataroot(common.dataroot)
    check_writable(common.result_dir)
    layout = ResultsLayout(common.result_dir, settings.loss.loss_cache_dir)
    tasks = load_tasks(common.task_json)
    todo = [t for t in tasks if overwrite or not layout.influence_file(t).is_file()]
    finished = [t for t in tasks if t not in todo]
    check_finished_queries(settings, layout, finished)
    peers = peers_of(tasks, settings.ranking.contrast_with) if RANKINGS[settings.ranking.ranking].needs_peers else {}

    # two-stage screens all of a model's queries in one pass, and a contrast needs them all: processes then share
    # models, not queries
    units, per_query = work_units(settings, todo)
    units, device, rank, world = process_share(units, settings.execution.device)
    settings = with_device(settings, device)

    # the finished queries' inputs (base and customized model, candidates, Fisher, stage-1 cache), before they are
    # skipped
    laion = LaionCandidates(dataroot, common.laion_subset_size)
    base = load_base_model(common.sd_version, device)
    on_demand, fisher = settings.screening.before_losses == "on-demand", fisher_fingerprint(settings, dataroot)
    provenance = cache(lambda model_path: input_provenance(next(t for t in tasks if t.model_path == model_path), base,
                                                            laion, dataroot, layout, on_demand, fisher))
    check_finished_inputs(layout, finished, lambda t: provenance(t.model_path))
    for t in finished:  # a checkpoint left by a run killed after the result it fed was written
        layout.checkpoint_file(t).unlink(missing_ok=True)
    print(f"{len(tasks)} query(ies) in {common.task_json}; {len(tasks) - len(todo)} done, {len(todo)} to do"
          + (f"; process {rank} of {world} takes {sum(map(len, units))}" if world > 1 else ""))
    if not units:
        return

    # the candidates, checked against every query's image and loss cache before any unlearning
    check_candidates_fit(base, laion.latents.shape, laion.text_embeddings.shape[-1], dataroot)
    models = preflight(settings, dataroot, [t for u in units for t in u], laion, base, layout)
    configure_unet(base.unet, device, common.precision)
    attributor = Attributor(settings, base, laion, dataroot, layout, models)

    started = time.time()
    for unit in tqdm(units, desc="queries" if per_query else "models", unit="unit"):
        lock = layout.query_claim(unit[0]) if per_query else layout.model_claim(unit[0])
        what = f"query {unit[0].synth_image_path}" if per_query else f"the queries of {unit[0].model_path}"
        with claim(lock, what) as mine:  # another process started on the same task file may hold it
            unit = [t for t in unit if not finished_since(layout.influence_file(t), started, overwrite)] \
                if mine else []
            if unit:
                attributor.attribute(unit, peers)


if __name__ == "__main__":
    run(main)
