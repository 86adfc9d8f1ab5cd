"""Attribution baselines that need no unlearning, one function each behind `BASELINES`: each takes the run's
`BaselineInputs` and a list of tasks and returns {query key: influence over the model's exemplars, then the
LAION candidates}, flips folded (the max of a candidate's two rows) as compute_influence.py folds them.

random: a seeded random score per candidate (the chance level of every metric).
pixel: cosine similarity of the query's pixels and each candidate's, at the model's resolution.
vae: cosine similarity of VAE latents; the query's latent is its VAE posterior mean, the candidates'
     are the cached stage-1 exemplar latents and the LAION latents (so run compute_training_loss.py first).
gradient: gradient similarity in the spirit of TRAK / D-TRAK, on the weights AbU unlearns. For the
     customized model, each candidate's gradient of its stage-1 loss (the same T timesteps and seeded noise
     as the cache, read from its settings.json) w.r.t. the cross-attention K/V weights, and the query's
     likewise under its prompt; score = cosine of the two after whitening by the diagonal Fisher
     (g / sqrt(F)), i.e. g_q^T F^-1 g_i normalized. No unlearning, one backward pass per candidate batch.
"""
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from tqdm.auto import tqdm

from .customization import apply_customization
from .data import ExemplarCandidates, LaionCandidates, load_exemplar_images
from .encoders import encode_images, encode_prompt
from .errors import InputError
from .fisher import load_fisher
from .io import load_json, load_npy
from .layout import EXEMPLAR_LATENTS, SETTINGS, ResultsLayout
from .losses import noised_batches, per_row_loss
from .metrics import fold_flips
from .models import load_base_model
from .per_sample_grads import PerSampleLinearGrads
from .settings import BaselineSettings
from .tasks import Task, exemplar_paths, tasks_by_model
from .transforms import load_image_tensor
from .data import laion_image_paths
from .weights import PristineWeights, select_parameter_names

STAGE1_FIRST = "run compute_training_loss.py first (--loss_cache_dir)"


@dataclass
class BaselineInputs:
    """What every baseline of a run may read; the base model is loaded (on the CPU) on first use."""

    settings: BaselineSettings
    dataroot: Path
    laion: LaionCandidates
    layout: ResultsLayout

    @cached_property
    def base(self):
        return load_base_model(self.settings.sd_version, "cpu")

    def exemplar_latents(self, task: Task) -> torch.Tensor:
        """The model's exemplar latents from its stage-1 cache [2E, 4, h, w] (unflipped, then flipped)."""
        path = self.layout.loss_cache(task) / EXEMPLAR_LATENTS
        return torch.from_numpy(load_npy(path, "stage-1 exemplar latents", remedy=STAGE1_FIRST))


def cosine_to_rows(query: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
    """[rows]: the cosine similarity of `query` (any shape) and each row of `rows` [rows, ...], in float64."""
    q = query.reshape(1, -1).double()
    r = rows.reshape(len(rows), -1).double()
    return torch.nn.functional.cosine_similarity(q, r).numpy()


def folded_cosines(query: torch.Tensor, exemplar_rows: torch.Tensor, laion_rows: torch.Tensor) -> np.ndarray:
    return np.concatenate([fold_flips(cosine_to_rows(query, exemplar_rows)), fold_flips(cosine_to_rows(query, laion_rows))])


def random_influence(inputs: BaselineInputs, tasks: List[Task]) -> Dict[str, np.ndarray]:
    """A uniform score per candidate, seeded by --seed and the query's path (the same on every rerun)."""
    out = {}
    for task in tasks:
        rng = np.random.default_rng([inputs.settings.seed, zlib.crc32(task.synth_image_path.encode())])
        out[task.query_key] = rng.random(len(exemplar_paths(inputs.dataroot, task)) + inputs.laion.subset_size)
    return out


def pixel_influence(inputs: BaselineInputs, tasks: List[Task]) -> Dict[str, np.ndarray]:
    """Cosine of pixels in [-1, 1] at the model's resolution (LAION rows: unflipped images, then flipped)."""
    resolution = inputs.base.resolution
    laion_rows = load_exemplar_images(laion_image_paths(inputs.dataroot, inputs.laion.total)[:inputs.laion.subset_size],
                                      resolution)
    out = {}
    for task in tqdm(tasks, desc="pixel", unit="query"):
        query = load_image_tensor(inputs.dataroot / task.synth_image_path, resolution)
        exemplar_rows = load_exemplar_images(exemplar_paths(inputs.dataroot, task), resolution)
        out[task.query_key] = folded_cosines(query, exemplar_rows, laion_rows)
    return out


def vae_influence(inputs: BaselineInputs, tasks: List[Task]) -> Dict[str, np.ndarray]:
    """Cosine of scaled VAE latents: the query's posterior mean against the candidates' cached samples."""
    laion, vae = inputs.laion, inputs.base.vae
    laion_rows = torch.cat([laion.batch(s, s + 1024)[0] for s in range(0, len(laion), 1024)])
    out = {}
    for task in tqdm(tasks, desc="vae", unit="query"):
        image = load_image_tensor(inputs.dataroot / task.synth_image_path, inputs.base.resolution).unsqueeze(0)
        with torch.no_grad():
            query = vae.encode(image).latent_dist.mean[0] * vae.config.scaling_factor
        out[task.query_key] = folded_cosines(query, inputs.exemplar_latents(task), laion_rows)
    return out


GRADIENT_OUTPUTS = ("loss", "square")  # what a row's gradient is taken of (D-TRAK's loss choices, two of them)


def row_output(unet, scheduler, latents, noise, timesteps, text, output: str = "loss") -> torch.Tensor:
    """[rows]: "loss", each row's diffusion training loss (utils.losses.per_row_loss); "square", the mean square of
    the UNet's prediction, ||eps_theta(x_t, t)||^2 / d, the output D-TRAK (Zheng et al. 2024) found its gradients
    attribute best with."""
    if output == "loss":
        return per_row_loss(unet, scheduler, latents, noise, timesteps, text)
    if output == "square":
        pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, text, return_dict=False)[0]
        return pred.float().pow(2).mean(dim=(1, 2, 3))
    raise ValueError(f"unknown gradient output {output!r}; one of {GRADIENT_OUTPUTS}")


def mean_row_gradients(unet, scheduler, names, candidates, batch_size: int, time_samples: int, seed: int, desc: str,
                       first_batch: int = 0, output: str = "loss", bands: int = 1) -> torch.Tensor:
    """[rows, bands, P] float32: each candidate row's gradient of `row_output` w.r.t. the `names` weights (P entries,
    in `names` order), averaged over the batch plan's T grid timesteps, split into `bands` runs of consecutive
    timesteps (band 0 the lowest t). The noise is the batch plan's (docs/method.md, section 3): `candidates`
    starting at batch `first_batch` of a run with this batch size and seed get that run's noise (batch b is seeded
    with seed + b), so a cache's own draws are reproduced from its settings."""
    out = []
    params = dict(unet.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    try:
        for n, latents, timesteps, text, noise in noised_batches(scheduler, candidates, batch_size, time_samples,
                                                                 seed + first_batch, desc=desc):
            per_sample = PerSampleLinearGrads(unet, names, dtype=torch.float32)
            with torch.enable_grad():
                # sum over rows: each row's gradient is then its own; mean over a candidate's T rows below
                row_output(unet, scheduler, latents, noise, timesteps, text, output).sum().backward()
            per_sample.remove()
            g = per_sample.flat().view(n, time_samples, -1)
            out.append(torch.stack([b.mean(1) for b in g.tensor_split(bands, dim=1)], dim=1))
            for n_ in names:
                params[n_].grad = None
    finally:
        for n in names:
            params[n].requires_grad_(False)
    return torch.cat(out)


def whitened_unit_gradients(base, names, inv_sqrt_fisher, candidates, settings, desc,
                            first_batch: int = 0) -> torch.Tensor:
    """[rows, P]: each candidate row's gradient of its mean loss over the cache's T timesteps w.r.t. the
    `names` weights, divided by sqrt(F) and scaled to unit length. `candidates` starting at batch
    `first_batch` of the cache's batch plan get the cache's noise (batch b is seeded with seed + b)."""
    g = mean_row_gradients(base.unet, base.scheduler, names, candidates, settings["batch_size"],
                           settings["time_samples"], settings["seed"], desc, first_batch)[:, 0] * inv_sqrt_fisher
    return torch.nn.functional.normalize(g.double(), dim=1).float()


class RowSlice:
    """Rows start..stop-1 of a candidate set (same `batch` interface)."""

    def __init__(self, candidates, start: int, stop: int):
        self.candidates, self.start, self.stop = candidates, start, min(stop, len(candidates))

    def __len__(self) -> int:
        return self.stop - self.start

    def batch(self, start: int, stop: int):
        return self.candidates.batch(self.start + start, self.start + min(stop, len(self)))


def gradient_influence(inputs: BaselineInputs, tasks: List[Task]) -> Dict[str, np.ndarray]:
    """Fisher-whitened gradient cosine on the cross-attention K/V, one pass over the candidates per model."""
    base, laion, dataroot = inputs.base, inputs.laion, inputs.dataroot
    pristine = PristineWeights(base.unet)
    names = select_parameter_names(base.unet, "cross-attn-kv")  # the weights AbU unlearns
    params = {n: p for n, p in base.unet.named_parameters() if n in names}
    fisher = load_fisher(baseline_fisher_file(inputs.settings, dataroot), params)
    inv_sqrt_fisher = torch.cat([fisher[n].rsqrt().flatten() for n in names]).float()
    influences = {}
    for model_path, model_tasks in tasks_by_model(tasks).items():
        cache = inputs.layout.loss_cache(model_tasks[0])
        if not (cache / SETTINGS).is_file():
            raise InputError(f"{cache / SETTINGS} not found: run compute_training_loss.py first (--loss_cache_dir)")
        settings = load_json(cache / SETTINGS, "loss-cache settings")
        apply_customization(base, pristine, dataroot / model_path)
        queries = []
        for task in model_tasks:  # the query's latent is drawn as compute_influence.py draws it
            image = load_image_tensor(dataroot / task.synth_image_path, base.resolution).unsqueeze(0)
            latent = encode_images(base.vae, image, torch.Generator().manual_seed(settings["seed"]))
            queries.append(ExemplarCandidates(latent, encode_prompt(base.tokenizer, base.text_encoder, task.prompt)))
        q = torch.cat([whitened_unit_gradients(base, names, inv_sqrt_fisher, c, settings, "query gradient")
                       for c in queries])
        exemplars = ExemplarCandidates(torch.from_numpy(load_npy(cache / EXEMPLAR_LATENTS, "stage-1 exemplar latents",
                                                                 remedy=STAGE1_FIRST)),
                                       encode_prompt(base.tokenizer, base.text_encoder, model_tasks[0].train_prompt))
        ex_scores = whitened_unit_gradients(base, names, inv_sqrt_fisher, exemplars, settings,
                                            "exemplar gradients") @ q.T
        per_batch = settings["batch_size"] // settings["time_samples"]
        chunk = 50 * per_batch  # streamed: the [rows, P] gradients of all LAION rows are never held at once
        laion_scores = torch.cat([
            whitened_unit_gradients(base, names, inv_sqrt_fisher, RowSlice(laion, s, s + chunk), settings,
                                    "LAION gradients", first_batch=s // per_batch) @ q.T
            for s in tqdm(range(0, len(laion), chunk), desc="LAION chunks", leave=False)])
        for j, task in enumerate(model_tasks):
            influences[task.query_key] = np.concatenate([fold_flips(ex_scores[:, j].double().numpy()),
                                                         fold_flips(laion_scores[:, j].double().numpy())])
        pristine.restore()
    return influences


BASELINES: Dict[str, Callable[[BaselineInputs, List[Task]], Dict[str, np.ndarray]]] = {
    "random": random_influence, "pixel": pixel_influence, "vae": vae_influence, "gradient": gradient_influence}
# the inputs each baseline's numbers come from, by the fingerprints of utils.attribution.input_provenance (random
# reads none; pixel reads the images themselves, which no fingerprint covers)
READS = {"random": (), "pixel": (), "vae": ("base_model", "laion_arrays", "loss_cache"),
         "gradient": ("base_model", "customized_model", "laion_arrays", "loss_cache", "fisher")}


def baseline_fisher_file(settings: BaselineSettings, dataroot: Path) -> Path:
    """The diagonal Fisher the gradient baseline whitens with: --fisher_path, or <dataroot>/sd_fisher.pt."""
    return Path(settings.fisher_path) if settings.fisher_path else Path(dataroot) / "sd_fisher.pt"


def baseline_provenance(inputs: BaselineInputs, task: Task) -> dict:
    """The fingerprints of what `inputs.settings.method` reads for `task`'s model (READS), recorded beside its result
    and compared before a finished one is reused."""
    from .customization import customization_fingerprint
    from .loss_cache import cache_fingerprint, cache_is_complete
    from .fingerprints import file_fingerprint

    reads, cache = READS[inputs.settings.method], inputs.layout.loss_cache(task)
    fisher = baseline_fisher_file(inputs.settings, inputs.dataroot)
    current = {"base_model": lambda: inputs.base.fingerprint,
               "customized_model": lambda: customization_fingerprint(inputs.dataroot / task.model_path),
               "laion_arrays": inputs.laion.fingerprint,
               "loss_cache": lambda: cache_fingerprint(cache) if cache_is_complete(cache) else None,
               "fisher": lambda: file_fingerprint(fisher)}
    return {k: current[k]() for k in reads}
