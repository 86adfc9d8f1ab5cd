"""Stage 1: the diffusion loss of every training candidate under the customized model, before unlearning.

    python compute_training_loss.py --task_json tasks/demo_task.json

For each distinct model of the task file, writes <result_dir>/orig_loss/<model>/ with exemplar_loss.npy,
laion_loss.npy (each row's mean over the T timesteps), the same per timestep (*_loss_by_t.npy),
exemplar_latents.npy (the VAE samples, reused by stage 2) and, last, settings.json: what made the losses
(utils/loss_cache.py). A finished cache is skipped, after checking it was made with this
run's settings; --overwrite recomputes it.
"""
import time

import torch
from tqdm.auto import tqdm

from utils.claims import claim, finished_since
from utils.cli import check_dataroot, run
from utils.customization import apply_customization, check_customized_model
from utils.data import LaionCandidates, encode_exemplars
from utils.host_memory import configure_heap
from utils.io import check_writable
from utils.layout import SETTINGS, ResultsLayout
from utils.loss_cache import cache_is_complete, check_loss_cache, loss_settings, save_loss_cache
from utils.losses import check_finite_losses
from utils.models import check_candidates_fit, load_base_model
from utils.precision import configure_unet, loss_unet
from utils.processes import process_share
from utils.settings import TrainingLossSettings, parse_settings, with_device
from utils.tasks import exemplar_paths, load_tasks, unique_models
from utils.weights import PristineWeights


def main(argv=None):
    settings = parse_settings(TrainingLossSettings, __doc__, argv)
    common, overwrite = settings.common, settings.execution.overwrite
    configure_heap()  # host memory that follows the batch size, not the number of candidates

    # checks up front: the folders, the task file, the candidates, the finished caches' settings
    dataroot = check_dataroot(common.dataroot)
    check_writable(common.result_dir)
    layout = ResultsLayout(common.result_dir)
    models = unique_models(load_tasks(common.task_json))
    laion = LaionCandidates(dataroot, common.laion_subset_size)
    todo = [t for t in models if overwrite or not cache_is_complete(layout.loss_cache(t))]
    todo_here, device, rank, world = process_share(todo, settings.execution.device)
    settings = with_device(settings, device)
    measurement = settings.measurement()
    print(f"{len(models)} model(s) in {common.task_json}; {len(models) - len(todo)} already cached, {len(todo)} to do"
          + (f"; process {rank} of {world} takes {len(todo_here)}" if world > 1 else ""))
    base = load_base_model(common.sd_version, device)
    check_candidates_fit(base, laion.latents.shape, laion.text_embeddings.shape[-1], dataroot)
    for task in models:  # a finished cache made with other settings is an error here, not at stage 2
        check_customized_model(dataroot / task.model_path, [task.train_prompt], f"task file {common.task_json}",
                               base.tokenizer)
        if task not in todo:
            n_rows = 2 * len(exemplar_paths(dataroot, task))
            check_loss_cache(layout.loss_cache(task), loss_settings(task, base, laion, dataroot, n_rows, measurement))
    if not todo_here:
        return

    configure_unet(base.unet, device, common.precision)
    unet, pristine = loss_unet(base.unet, common.compile), PristineWeights(base.unet)
    started = time.time()
    for task in tqdm(todo_here, desc="models", unit="model"):
        with claim(layout.cache_claim(task), f"the loss cache of {task.model_path}") as mine:
            cache = layout.loss_cache(task)  # finished, or with --overwrite finished by a sibling during this run
            done = cache_is_complete(cache) and finished_since(cache / SETTINGS, started, overwrite)
            if mine and not done:
                cache_model(settings, task, base, unet, pristine, laion, dataroot, cache)


def cache_model(settings: TrainingLossSettings, task, base, unet, pristine, laion, dataroot, cache_dir) -> None:
    """Customize the base model as `task`'s model, measure its exemplars' and the LAION rows' losses, save."""
    loaded = apply_customization(base, pristine, dataroot / task.model_path)
    generator = torch.Generator().manual_seed(settings.common.seed)
    exemplars = encode_exemplars(base, exemplar_paths(dataroot, task), task.train_prompt,
                                 settings.common.vae_batch_size, generator)
    measurement = settings.measurement()
    exemplar_by_t = measurement.collect(unet, base.scheduler, exemplars, "exemplar losses", per_timestep=True)
    laion_by_t = measurement.collect(unet, base.scheduler, laion, "LAION losses", per_timestep=True)
    remedy = (f"the customized UNet overflows: with fp16 try --precision bf16 or fp32; at fp32 the model's weights "
              f"({task.model_path}) are damaged or far off the base's: train or download it again")
    check_finite_losses(exemplar_by_t, f"{task.model_path}: exemplar losses", settings.common.precision, remedy)
    check_finite_losses(laion_by_t, f"{task.model_path}: LAION losses", settings.common.precision, remedy)
    save_loss_cache(cache_dir, exemplar_by_t, laion_by_t, exemplars.latents.numpy(),
                    loss_settings(task, base, laion, dataroot, len(exemplars), measurement), settings.common.sd_version)
    tqdm.write(f"{task.model_path}: {len(loaded)} customized tensors, {len(exemplars) // 2} exemplars, "
               f"mean loss exemplar {exemplar_by_t.mean():.4f} / LAION {laion_by_t.mean():.4f} -> {cache_dir}")


if __name__ == "__main__":
    run(main)
