"""Unlearning one synthesized image (docs/method.md, section 4): the Fisher-preconditioned ascent, and the query
unlearner that stage 2 (utils/attribution.py) and the unlearn.py tool share: the query's inputs and controls, the
stopping rule, and what unlearning costs.

Each step accumulates the gradient of the query's loss over `grad_accum_steps` micro-batches, then
moves every selected parameter p UP it: p += lr * grad / (F_p * N) / grad_accum_steps, in float64
(with a Kronecker-factored F, utils.kfac, F^-1 grad is taken in its eigenbasis).
That is a Newton step of max_theta L(z; theta) - (N / 2) sum F (theta - theta0)^2 (elastic weight
consolidation): forget z while staying close to the pretrained weights in the Fisher metric.
Which parameters move is the caller's choice (utils.weights.WEIGHT_SELECTIONS).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .customization import CONCEPT_TOKEN
from .data import ExemplarCandidates
from .encoders import encode_images, encode_prompt
from .faults import checkpoint
from .fingerprints import file_fingerprint
from .fisher import load_fisher
from .kfac import EKFAC_FILE, KRONECKER_PRECONDITIONERS, KroneckerEigenFisher, load_kronecker_fisher
from .losses import check_finite_losses, training_target
from .precision import FP16_LOSS_SCALE, autocast
from .transforms import load_image_tensor
from .weights import select_parameter_names

LAION_400M = 400_000_000  # N, the pretraining-set size the authors hard-code


def query_diffusion_loss(unet, scheduler, latents, text, generator: torch.Generator,
                         precision: str = "fp32") -> torch.Tensor:
    """Loss of one micro-batch: fresh noise and distinct timesteps (a random permutation's first B), against the
    model's own training target (utils.losses.training_target)."""
    bs = latents.shape[0]
    num_train_timesteps = scheduler.config.num_train_timesteps
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
    timesteps = torch.randperm(num_train_timesteps, generator=generator)[:bs].to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with autocast(latents.device, precision):
        pred = unet(noisy, timesteps, text, return_dict=False)[0]
    return F.mse_loss(pred.float(), training_target(scheduler, latents, noise, timesteps).float())


@torch.no_grad()
def fisher_preconditioned_step(params: Dict[str, torch.nn.Parameter], fisher: Dict[str, torch.Tensor],
                               lr: float, dataset_size: int, grad_accum_steps: int) -> None:
    """p += lr * F_p^-1 grad / N / grad_accum_steps, computed in float64, for each parameter with a gradient; F_p
    is a diagonal (a tensor of p's shape: grad / F_p) or a utils.kfac.KroneckerEigenFisher (its solve)."""
    for name, p in params.items():
        if p.grad is None:
            continue
        f = fisher[name]
        solved = f.solve(p.grad) if isinstance(f, KroneckerEigenFisher) else p.grad.double() / f
        update = lr * solved / dataset_size / grad_accum_steps
        p.add_(update.to(p.dtype))


def unlearn(unet, scheduler, latents: torch.Tensor, text: torch.Tensor, params: Dict[str, torch.nn.Parameter],
            fisher: Dict[str, torch.Tensor], steps: int = 100, grad_accum_steps: int = 10, lr: float = 0.1,
            dataset_size: int = LAION_400M, generator: torch.Generator = None, progress: bool = True,
            precision: str = "fp32", should_stop: Optional[Callable[[int], bool]] = None) -> List[float]:
    """Run the unlearning loop in place on `params` (the only parameters that get gradients).

    The UNet's forward runs at `precision` (utils.precision); the update stays float64. `should_stop(done)`, asked
    before each step with the number of steps done (0 before the first), ends the loop early when it returns
    True (a per-query stopping rule); the paper's schedule has none. Returns the mean query loss of each step
    taken, measured before that step's update: its length is the number of steps taken.
    """
    scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    trainable = set(params)
    for n, p in unet.named_parameters():
        p.requires_grad_(n in trainable)
    history = []
    try:
        for done in tqdm(range(steps), desc="unlearning", unit="step", disable=not progress, leave=False):
            if should_stop is not None and should_stop(done):
                break
            for p in params.values():
                p.grad = None
            total = 0.0
            for _ in range(grad_accum_steps):
                loss = query_diffusion_loss(unet, scheduler, latents, text, generator, precision)
                (loss * scale).backward()
                total += loss.item()
            fisher_preconditioned_step(params, fisher, lr / scale, dataset_size, grad_accum_steps)
            history.append(total / grad_accum_steps)
            checkpoint("unlearning-step")
    finally:
        for p in unet.parameters():
            p.grad = None
            p.requires_grad_(False)
    return history


def unlearning_setup(settings, base, dataroot: Path):
    """The parameters unlearning moves, their preconditioner F and the N of p += lr * grad / (F * N) / accum
    (settings: utils.settings.InfluenceSettings or UnlearnToolSettings)."""
    u = settings.unlearning
    names = set(select_parameter_names(base.unet, u.weight_selection))
    params = {n: p for n, p in base.unet.named_parameters() if n in names}
    preconditioner = settings.ablation.preconditioner
    if preconditioner == "none":  # F = 1, N = 1: the step is lr * grad / accum
        return params, {n: torch.ones_like(p, dtype=torch.float64) for n, p in params.items()}, 1
    if preconditioner in KRONECKER_PRECONDITIONERS:
        fisher = load_kronecker_fisher(fisher_file(settings, dataroot), params, preconditioner,
                                       u.fisher_floor, settings.execution.device)
        return params, fisher, u.fisher_dataset_size
    fisher = load_fisher(fisher_file(settings, dataroot), params, u.fisher_floor, settings.execution.device)
    return params, fisher, u.fisher_dataset_size


def fisher_file(settings, dataroot: Path) -> Optional[Path]:
    """The Fisher file unlearning reads: --fisher_path, or the dataroot's default for the --preconditioner
    (sd_fisher.pt, or EKFAC_FILE for ekfac / kfac); None with --preconditioner none."""
    preconditioner, path = settings.ablation.preconditioner, settings.unlearning.fisher_path
    if preconditioner == "none":
        return None
    return Path(path) if path else Path(dataroot) / (EKFAC_FILE if preconditioner in KRONECKER_PRECONDITIONERS
                                                     else "sd_fisher.pt")


def fisher_fingerprint(settings, dataroot: Path) -> Optional[str]:
    """files_fingerprint of `fisher_file` (once per file and process), recorded in a result's provenance: another
    Fisher under the same flags (--fisher_path names a K-FAC-reduce file instead of K-FAC-expand's, a rebuilt file)
    makes another result. None without a file, or when it is missing (its loader names it)."""
    path = fisher_file(settings, dataroot)
    return None if path is None else file_fingerprint(path)


@dataclass(frozen=True)
class StopRule:
    """One --stop_rule: whether it checks before the first step, whether a check measures the reference rows (the
    first --stop_reference LAION rows) as well as the query, and when it is reached. `reached(check, target,
    before, reference_rise)` may add what it computed to the check's record."""

    check_at_start: bool
    reads_reference: bool
    reached: Callable[[dict, float, float, Optional[float]], bool]


def _collateral_reached(check: dict, target: float, before: float, reference_rise: float) -> bool:
    check["collateral"] = reference_rise / max(check["query_loss"] - before, 1e-12)
    return check["collateral"] >= target


STOP_RULES: Dict[str, StopRule] = {
    # the query's own loss has reached --stop_target times its loss before
    "rise": StopRule(True, False, lambda check, target, before, reference_rise: check["query_ratio"] >= target),
    # the reference rows' mean rise has reached --stop_target times the query's own rise (nothing moved at step 0)
    "collateral": StopRule(False, True, _collateral_reached),
}


class QueryUnlearner:
    """Unlearns one query (or its noise-image control) in place on the customized UNet, with the stage-2 settings.

    `collect(candidates, desc, **kw)` measures losses (utils.losses.LossMeasurement.collect on the loss UNet);
    `reference` holds the candidates whose first rows the collateral stopping rule reads (the LAION subset);
    `pristine` (utils.weights.PristineWeights) learns which parameters unlearning moves, so the base comes back.
    """

    def __init__(self, settings, base, dataroot: Path, collect, pristine, reference=None):
        self.settings, self.base, self.dataroot, self.collect = settings, base, Path(dataroot), collect
        self.pristine, self.reference = pristine, reference
        self.params, self.fisher, self.dataset_size = unlearning_setup(settings, base, dataroot)
        self.time_samples = settings.measurement().time_samples

    def inputs(self, task, generator: torch.Generator, noise_image: bool = False):
        """The query's latent [unlearn_batch_size, C, h, w] (one VAE sample, repeated) and its prompt's text
        embedding [unlearn_batch_size, 77, D]; with `noise_image` (or --noise_image) seeded Gaussian noise of the
        latent's shape stands for the image (the prompt-only control); with --drop_concept_token the prompt loses
        its <new1>."""
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

    def unlearn(self, task, reference_before: Optional[np.ndarray], noise_image: bool = False) -> dict:
        """Unlearn the query in place; {"query_loss": (before, after) under fixed noise, "history": each step's
        loss, and with a stopping rule "stop": its record}. `reference_before`: the LAION rows' losses before
        unlearning (the collateral rule reads its reference rows'; None otherwise). Raises InputError when the
        query's loss before unlearning is not finite."""
        u, stopping = self.settings.unlearning, self.settings.stopping
        generator = torch.Generator().manual_seed(self.settings.common.seed)
        latents, text = self.inputs(task, generator, noise_image)
        query = ExemplarCandidates(latents[:1].cpu(), text[:1].cpu())
        before = self.collect(query, "query loss")
        check_finite_losses(before, f"{task.synth_image_path}: the query's loss before unlearning",
                            self.settings.common.precision, "the customized UNet overflows on the query: with fp16 "
                            "try --precision bf16 or fp32; at fp32 the model's weights are damaged")
        self.pristine.protect(self.params)
        checks = []
        should_stop = self.stopping_rule(query, float(before[0]), reference_before, checks)
        history = unlearn(self.base.unet, self.base.scheduler, latents, text, self.params, self.fisher,
                          steps=u.unlearn_steps, grad_accum_steps=u.unlearn_grad_accum_steps, lr=u.unlearn_lr,
                          dataset_size=self.dataset_size, generator=generator, precision=self.settings.common.precision,
                          should_stop=should_stop)
        after = self.collect(query, "query loss")
        out = {"query_loss": (float(before[0]), float(after[0])), "history": np.asarray(history)}
        if should_stop is not None:
            out["stop"] = {"rule": stopping.stop_rule, "target": stopping.stop_target, "steps_taken": len(history),
                           "stopped_early": len(history) < u.unlearn_steps, "checks": checks,
                           "reference_rows": self.reference_rows()}
        return out

    def reference_rows(self) -> int:
        return min(self.settings.stopping.stop_reference, len(self.reference) if self.reference is not None else 0)

    def stopping_rule(self, query, before: float, reference_before, checks: list):
        """The --stop_rule (STOP_RULES) as unlearn's should_stop(done), or None. Each check measures the query's own
        loss under its fixed noise (T forwards; a rule that reads the reference rows adds theirs) and is appended to
        `checks`."""
        setting = self.settings.stopping
        if setting.stop_rule == "none":
            return None
        rule, reference = STOP_RULES[setting.stop_rule], np.arange(self.reference_rows())

        def should_stop(done: int) -> bool:
            if done % setting.stop_every or (done == 0 and not rule.check_at_start):
                return False
            loss = float(self.collect(query, "stopping check")[0])
            check = {"step": done, "query_loss": loss, "query_ratio": loss / before}
            reference_rise = None
            if rule.reads_reference:
                reference_rise = float((self.collect(self.reference, "stopping check", rows=reference)
                                        .astype(np.float64) - reference_before[reference]).mean())
            stop = rule.reached(check, setting.stop_target, before, reference_rise)
            checks.append(check)
            return stop

        return should_stop

    def cost(self, unlearned: dict) -> dict:
        """UNet forward-equivalents of unlearning a query (the steps it took), of measuring its own loss twice and
        of the stopping rule's checks (backward = 2 forwards)."""
        u, t = self.settings.unlearning, self.time_samples
        steps = len(unlearned["history"])
        cost = {"unlearning": 3 * steps * u.unlearn_grad_accum_steps * u.unlearn_batch_size, "query loss": 2 * t}
        if "stop" in unlearned:
            rule = STOP_RULES[self.settings.stopping.stop_rule]
            per_check = 1 + (unlearned["stop"]["reference_rows"] if rule.reads_reference else 0)
            cost["stopping checks"] = len(unlearned["stop"]["checks"]) * per_check * t
        return cost
