"""Every flag of both stages, declared once as typed, frozen dataclasses (one per concern), and the three things
derived from them: the script's flags, the record written beside each output, and the check that decides
whether a finished output may be reused (docs/method.md, section 10).

A field's default and help text live in its `metadata`; `compared=False` marks the few fields that only say
where files are or how much memory to use, and so do not change a result. Everything else is compared: a field
added to a class is a flag, is recorded and decides reuse without anyone listing it anywhere.
"""
import argparse
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import List, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import torch

from .errors import InputError
from .losses import LossMeasurement, validate_batch_plan
from .precision import check_device, resolve_precision
from .ranking import RANKINGS
from .screening import SCREENS
from .unlearning import LAION_400M, STOP_RULES
from .weights import WEIGHT_SELECTIONS

LINEAR_SELECTIONS = ("cross-attn-kv", "cross-attn")  # only nn.Linear weights and biases


def setting(default, help: str, *, choices=None, compared: bool = True, required: bool = False):
    """A dataclass field that is also a flag: its default, help text and choices; `compared=False` for a field
    that cannot change a result (a path, a memory budget)."""
    meta = {"help": help, "choices": choices, "compared": compared, "required": required}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- both stages ----

@dataclass(frozen=True)
class CommonSettings:
    """The task, the data, the base model and what both stages' losses are measured with."""

    task_json: str = setting(None, "task file: a JSON list of queries (see tasks/)", compared=False, required=True)
    result_dir: str = setting("results", "where orig_loss/ and influence/ are written", compared=False)
    sd_version: str = setting("CompVis/stable-diffusion-v1-4", "base model: a Hugging Face id or a local diffusers "
                              "folder (fingerprinted in the loss cache)", compared=False)
    dataroot: str = setting("data/abc", "AbC data folder (layout in README)", compared=False)
    laion_subset_size: int = setting(100_000, "number of LAION images used as candidates (each also flipped)")
    vae_batch_size: int = setting(20, "images per VAE encoding batch", compared=False)
    seed: int = setting(0, "loss batch b draws its noise from seed + b; also seeds VAE samples and unlearning")
    precision: str = setting("auto", "UNet precision (utils/precision.py); auto = bf16 on CUDA, fp32 on the CPU; "
                             "recorded with the loss cache, so both stages must resolve to the same; fp32 "
                             "reproduces the authors' numerics", choices=["auto", "fp32", "bf16", "fp16"])
    compile: bool = setting(False, "torch.compile the UNet for loss tracking")


@dataclass(frozen=True)
class Execution:
    """Where and whether to run: not settings of a result, so neither recorded nor compared."""

    device: str = setting(default_device, "torch device (default: cuda when available, else cpu)")
    overwrite: bool = setting(False, "recompute outputs that already exist (default: skip finished "
                                     "models/queries)")


# ---- stage 1 ----

@dataclass(frozen=True)
class CacheSettings:
    """Stage 1's loss measurement (the authors' flag names)."""

    batch_size: int = setting(200, "loss batch size B (candidate-timestep pairs); must match stage 2's "
                                   "--loss_batch_size")
    time_samples: int = setting(10, "timesteps T per candidate; must match stage 2's --loss_time_samples")


# ---- stage 2 ----

@dataclass(frozen=True)
class UnlearningSettings:
    """The Fisher-preconditioned ascent (unlearn.py)."""

    fisher_path: Optional[str] = setting(None, "Fisher file (default: <dataroot>/sd_fisher.pt; with --preconditioner "
                                               "ekfac or kfac <dataroot>/sd_ekfac.safetensors)", compared=False)
    fisher_floor: Optional[float] = setting(None, "clamp Fisher entries (eigenvalues with ekfac / kfac) to at least "
                                                  "this value (default: zero or negative entries are an error; "
                                                  "non-finite ones always are)")
    fisher_dataset_size: int = setting(LAION_400M, "N in the update lr * grad / (F * N): the pretraining-set size "
                                                   "(LAION-400M)")
    weight_selection: str = setting("cross-attn-kv", "which UNet parameters unlearning updates",
                                    choices=list(WEIGHT_SELECTIONS))
    unlearn_lr: float = setting(0.1, "unlearning step size")
    unlearn_steps: int = setting(100, "number of unlearning steps")
    unlearn_batch_size: int = setting(16, "query copies per micro-batch")
    unlearn_grad_accum_steps: int = setting(10, "micro-batches per step")


@dataclass(frozen=True)
class MeasurementSettings:
    """Stage 2's loss measurement: must equal the stage-1 cache's (checked against its settings.json)."""

    loss_batch_size: int = setting(200, "must equal stage 1's --batch_size")
    loss_time_samples: int = setting(10, "must equal stage 1's --time_samples")
    loss_cache_dir: Optional[str] = setting(None, "stage-1 caches to subtract from (default: "
                                                  "<result_dir>/orig_loss); lets several variants, each with its "
                                                  "own --result_dir, share one stage 1", compared=False)


@dataclass(frozen=True)
class AblationSettings:
    """The update's preconditioner (the paper's, its plain-ascent ablation, the Kronecker-factored ones) and the
    paper's ablation of the query's prompt."""

    preconditioner: str = setting("fisher", "the update's F: the diagonal Fisher (the paper); 'ekfac' / 'kfac' the "
                                            "Kronecker-factored Fisher of compute_fisher.py --kind ekfac, with "
                                            "EK-FAC's or K-FAC's eigenvalues (same lr and N); 'none' the paper's "
                                            "plain-gradient-ascent ablation: p += lr * grad / accum",
                                  choices=["fisher", "ekfac", "kfac", "none"])
    drop_concept_token: bool = setting(False, "ablation: unlearn the query under its prompt with '<new1>' removed")


@dataclass(frozen=True)
class ScreeningSettings:
    """Exact or two-stage scoring (utils/screening.py)."""

    mode: str = setting("exact", "exact: re-measure every candidate after unlearning (the paper); two-stage: "
                                 "screen every candidate cheaply, re-measure only the top --rescore_top "
                                 "(utils/screening.py)", choices=["exact", "two-stage"])
    screen: str = setting("coarse", "two-stage: the estimate of each candidate's loss rise (utils/screening.py): "
                                    "coarse, first-order, caption (no UNet pass), or coarse+caption (re-score the "
                                    "union of both tops)", choices=list(SCREENS))
    screen_time_samples: int = setting(1, "two-stage: grid timesteps the screen measures (of "
                                          "--loss_time_samples)")
    rescore_top: int = setting(5000, "two-stage: candidates re-measured exactly per query (with --keep_top, at "
                                     "most); the rest are ranked by the screen (default: 5%% of AbC's 100K, the "
                                     "fraction chosen on mini-AbC's validation split, docs/performance.md)")
    keep_top: int = setting(0, "two-stage: 0 re-scores the screen's top --rescore_top; K > 0 re-scores in the "
                               "screen's order until no candidate left could enter the exact top K by the screen "
                               "calibrated on the re-scored ones (utils/screening.py), at most --rescore_top")
    keep_margin: float = setting(2.0, "two-stage, --keep_top: standard deviations of the calibrated screen's "
                                      "residuals a candidate may lie below the top K and still be re-scored")
    before_losses: str = setting("cache", "two-stage: cache reads every candidate's loss before unlearning from "
                                          "stage 1 (compute_training_loss.py); on-demand skips stage 1 and measures "
                                          "only what the screen and the re-scoring read (utils/screening.py)",
                                 choices=["cache", "on-demand"])
    screen_batch_size: int = setting(16, "two-stage, first-order: rows per forward + backward pass (memory only; "
                                         "the noise follows --loss_batch_size's layout)", compared=False)
    screen_flips: int = setting(2, "two-stage, coarse screens: 2 screens both flips of each candidate; 1 only the "
                                   "unflipped image, its value standing for both (half the screen's passes; the "
                                   "re-scored candidates are measured with both flips)", choices=[1, 2])

    def idle(self) -> Tuple[str, ...]:
        """Fields that do not act in this configuration: the screen's, when scoring is exact."""
        screen = ("screen", "screen_time_samples", "rescore_top", "screen_flips", "keep_top", "keep_margin",
                  "before_losses")
        return (() if self.keep_top else ("keep_margin",)) if self.mode == "two-stage" else screen


@dataclass(frozen=True)
class StoppingSettings:
    """A per-query stopping rule (docs/method.md, section 4)."""

    stop_rule: str = setting("none", "a per-query stopping rule, checked every --stop_every steps (default none: "
                                     "the paper's fixed schedule): rise stops when the query's own loss reaches "
                                     "--stop_target times its loss before; collateral when the mean loss rise of "
                                     "--stop_reference pretraining candidates reaches --stop_target times the "
                                     "query's rise", choices=["none", *STOP_RULES])
    stop_target: float = setting(2.0, "the stopping rule's target")
    stop_every: int = setting(5, "steps between two checks of the stopping rule")
    stop_reference: int = setting(32, "collateral rule: the first N LAION candidate rows serve as the reference set")

    def idle(self) -> Tuple[str, ...]:
        return ("stop_target", "stop_every", "stop_reference") if self.stop_rule == "none" else ()


@dataclass(frozen=True)
class ControlSettings:
    """What stands for the query's image: the image itself, or a control."""

    noise_image: bool = setting(False, "control: unlearn pure Gaussian noise in latent space (seeded) instead of "
                                       "the query's image, under its prompt: what the prompt alone retrieves")
    unscaled_synth_latent: bool = setting(False, "reproduce the authors' release: unlearn the query's VAE latent "
                                                 "WITHOUT the scaling factor (default: scaled, like every training "
                                                 "candidate)")


@dataclass(frozen=True)
class RankingSettings:
    """What the candidates are ranked by (utils/ranking.py, docs/method.md section 11)."""

    ranking: str = setting("influence", "influence: the loss rise (the paper); control-corrected: minus a noise-image "
                                        "control's under the same prompt (one more unlearning per distinct prompt); "
                                        "model-contrast: minus the mean of the model's other queries' (needs 2+ "
                                        "queries of each model); combined: the exemplars' and pretraining images' "
                                        "places from the influence, each block ordered by the model-contrast term; "
                                        "blended: combined's places, each block ordered by z(influence) + z(model-"
                                        "contrast term) (influences standardised per query but for 'influence')",
                          choices=list(RANKINGS))
    contrast_with: str = setting("prompt", "model-contrast / combined / blended: the peers subtracted, the model's other "
                                           "queries (model) or the other samples of the query's prompt (prompt; the "
                                           "model's other queries when it has none)", choices=["prompt", "model"])
    influence_timesteps_below: Optional[int] = setting(None, "the loss rise reads only the grid timesteps t < this "
                                                             "one (before and after unlearning; the stage-1 cache "
                                                             "keeps every timestep's loss), and measures only those "
                                                             "after unlearning; default: all T (the paper)")

    def idle(self) -> Tuple[str, ...]:
        return () if RANKINGS[self.ranking].needs_peers else ("contrast_with",)


# ---- compute_baselines.py ----

@dataclass(frozen=True)
class BaselineSettings:
    """The baselines that need no unlearning (utils/baselines.py); they run on the CPU. Recorded in each result and
    compared before a finished one is reused, like the stages'."""

    method: str = setting(None, "the baseline (utils/baselines.py)", choices=["random", "pixel", "vae", "gradient"],
                          required=True)
    task_json: str = setting(None, "task file: a JSON list of queries (see tasks/)", required=True, compared=False)
    result_dir: str = setting(None, "this method's own results folder", required=True, compared=False)
    loss_cache_dir: Optional[str] = setting(None, "stage-1 caches (default <result_dir>/orig_loss); vae reads their "
                                                  "exemplar latents, gradient their settings (B, T, seed: the same "
                                                  "noise as the cache) and exemplar latents", compared=False)
    sd_version: str = setting("CompVis/stable-diffusion-v1-4", "base model: a Hugging Face id or a local diffusers "
                                                              "folder (its fingerprint is recorded)", compared=False)
    dataroot: str = setting("data/abc", "AbC data folder (layout in README)", compared=False)
    laion_subset_size: int = setting(100_000, "number of LAION images used as candidates (each also flipped)")
    seed: int = setting(0, "seeds the random baseline")
    fisher_path: Optional[str] = setting(None, "gradient: diagonal Fisher (default: <dataroot>/sd_fisher.pt)",
                                         compared=False)
    overwrite: bool = setting(False, "recompute queries that already have results", compared=False)

    def idle(self) -> Tuple[str, ...]:
        return () if self.method == "random" else ("seed",)


def field_default(f):
    """A settings field's default (its default_factory's value for one made at run time, like --device's)."""
    return f.default_factory() if f.default is MISSING else f.default


def _flag_type(hint):
    """int / float / str / bool from a field's type hint (Optional[X] -> X)."""
    if get_origin(hint) is Union:
        hint = next(a for a in get_args(hint) if a is not type(None))
    return hint


def add_flags(parser: argparse.ArgumentParser, *classes: type) -> None:
    """One --flag per field of each class, in declaration order, with the field's default, help and choices."""
    for cls in classes:
        hints = get_type_hints(cls)
        group = parser.add_argument_group(cls.__name__, cls.__doc__)
        for f in fields(cls):
            meta, typ = f.metadata, _flag_type(hints[f.name])
            default = field_default(f)
            if typ is bool:
                assert default is False, f"{cls.__name__}.{f.name}: a boolean setting is a switch, off by default"
                group.add_argument(f"--{f.name}", action="store_true", help=meta["help"])
            else:
                group.add_argument(f"--{f.name}", type=typ, default=default, choices=meta["choices"],
                                   required=meta["required"], help=meta["help"])


def from_flags(cls: type, namespace: argparse.Namespace):
    """The `cls` instance that a parsed namespace (from add_flags) holds."""
    return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})


def record(*settings) -> dict:
    """The flat {field: value} of the given settings, in declaration order: what is written beside an output."""
    out = {}
    for s in settings:
        out.update(asdict(s))
    return out


def changed_settings(recorded: dict, *settings) -> List[str]:
    """'name: result has X, this run uses Y' for every compared field that acts in this run and differs from the
    record (a field the record lacks counts as its default: it was written before the field existed)."""
    diffs = []
    for s in settings:
        idle = s.idle() if hasattr(s, "idle") else ()
        for f in fields(s):
            if not f.metadata["compared"] or f.name in idle:
                continue
            was, now = recorded.get(f.name, field_default(f)), getattr(s, f.name)
            if was != now:
                diffs.append(f"{f.name}: result has {was!r}, this run uses {now!r}")
    return diffs


# ---- the settings of each stage, parsed and checked in one place ----

@dataclass(frozen=True)
class TrainingLossSettings:
    """Everything compute_training_loss.py is run with."""

    common: CommonSettings
    cache: CacheSettings
    execution: Execution

    def measurement(self) -> LossMeasurement:
        return LossMeasurement(self.cache.batch_size, self.cache.time_samples, self.common.seed, self.common.precision,
                               self.common.compile, self.execution.device)


@dataclass(frozen=True)
class InfluenceSettings:
    """Everything compute_influence.py is run with; `result` lists the parts that decide a query's result."""

    common: CommonSettings
    unlearning: UnlearningSettings
    loss: MeasurementSettings
    ablation: AblationSettings
    screening: ScreeningSettings
    stopping: StoppingSettings
    control: ControlSettings
    ranking: RankingSettings
    execution: Execution

    @property
    def result(self) -> tuple:
        """The settings recorded in influence.pkl and compared before a finished query is reused."""
        return (self.common, self.unlearning, self.loss, self.ablation, self.screening, self.stopping,
                self.control, self.ranking)

    def measurement(self) -> LossMeasurement:
        m = self.loss
        return LossMeasurement(m.loss_batch_size, m.loss_time_samples, self.common.seed, self.common.precision,
                               self.common.compile, self.execution.device)


@dataclass(frozen=True)
class ToolSettings:
    """unlearn.py: which query, where the unlearned model goes, and the samples that show what it forgot."""

    query: str = setting(None, "the query to unlearn: its synth_image_path in the task file", compared=False,
                         required=True)
    out: str = setting(None, "folder for the unlearned model (diffusers' Custom Diffusion form), unlearned.json and "
                             "samples.png", compared=False, required=True)
    samples: int = setting(0, "also sample the query's prompt (and another prompt of the model) at this many seeds "
                              "with the original and the unlearned model, side by side in samples.png")
    sample_steps: int = setting(50, "DDIM steps of each sample")
    guidance_scale: float = setting(7.5, "classifier-free guidance of the samples (7.5: Stable Diffusion's default)")
    sample_seed: int = setting(0, "sample i starts from the noise of a generator seeded with sample_seed + i")


@dataclass(frozen=True)
class UnlearnToolSettings:
    """Everything unlearn.py is run with: stage 2's unlearning flags (the same query, settings and seeds unlearn to
    the same weights as compute_influence.py), and the tool's own."""

    common: CommonSettings
    unlearning: UnlearningSettings
    loss: MeasurementSettings
    ablation: AblationSettings
    stopping: StoppingSettings
    control: ControlSettings
    tool: ToolSettings
    execution: Execution

    @property
    def result(self) -> tuple:
        return (self.common, self.unlearning, self.loss, self.ablation, self.stopping, self.control, self.tool)

    def measurement(self) -> LossMeasurement:
        m = self.loss
        return LossMeasurement(m.loss_batch_size, m.loss_time_samples, self.common.seed, self.common.precision,
                               self.common.compile, self.execution.device)


def parser_for(stage: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(parser, *(f.type for f in fields(stage)))
    return parser


def parse_settings(stage: type, description: str, argv=None):
    """The stage's settings from the command line, with --precision resolved for the device (recorded resolved),
    checked before any work (InputError naming the flag)."""
    namespace = parser_for(stage, description).parse_args(argv)
    parts = {f.name: from_flags(f.type, namespace) for f in fields(stage)}
    device = check_device(parts["execution"].device)
    parts["common"] = replace(parts["common"], precision=resolve_precision(parts["common"].precision, device))
    settings = stage(**parts)
    check_settings(settings)
    warn_idle(settings)
    return settings


def warn_idle(settings) -> None:
    """One warning line per flag set away from its default where its switch is off (the groups' idle()), e.g.
    --keep_top without --mode two-stage: it does nothing, and is not compared when a finished output is reused."""
    for f in fields(settings):
        group = getattr(settings, f.name)
        idle = group.idle() if hasattr(group, "idle") else ()
        for g in fields(group):
            if g.name in idle and getattr(group, g.name) != field_default(g):
                print(f"warning: --{g.name} does nothing in this configuration (see --help for the flag it goes with); "
                      "ignored", file=sys.stderr)


def check_settings(settings) -> None:
    """Refuse flag values that would fail, or silently do something else, hours into a run."""
    m = settings.measurement()
    validate_batch_plan(m.batch_size, m.time_samples)
    if isinstance(settings, UnlearnToolSettings):
        check_stopping(settings.stopping)
        if settings.tool.samples < 0 or settings.tool.sample_steps < 1:
            raise InputError(f"--samples must be at least 0 and --sample_steps at least 1, got {settings.tool.samples} "
                             f"and {settings.tool.sample_steps}")
        return
    if not isinstance(settings, InfluenceSettings):
        return
    screening, stopping = settings.screening, settings.stopping
    if screening.mode == "two-stage":
        if not 1 <= screening.screen_time_samples <= m.time_samples:
            raise InputError(f"--screen_time_samples must be between 1 and --loss_time_samples ({m.time_samples}), "
                             f"got {screening.screen_time_samples}")
        if screening.rescore_top < 1 or screening.screen_batch_size < 1:
            raise InputError(f"--rescore_top and --screen_batch_size must be at least 1, got "
                             f"{screening.rescore_top} and {screening.screen_batch_size}: leave them out for the "
                             "defaults (5000 and 16)")
        screen = SCREENS[screening.screen]
        if screening.screen_flips == 1 and not screen.one_flip:
            raise InputError(f"--screen_flips 1 applies to the coarse screens; --screen {screening.screen} "
                             + ("scores both flips of a candidate alike already" if screening.screen == "caption"
                                else "measures both flips") + ": drop --screen_flips or use --screen coarse")
        if screening.keep_top < 0 or screening.keep_margin < 0:
            raise InputError(f"--keep_top and --keep_margin cannot be negative, got {screening.keep_top} and "
                             f"{screening.keep_margin}: --keep_top 0 re-scores a fixed --rescore_top, K > 0 keeps the "
                             "top K; --keep_margin 2 is the validated margin")
        if screening.keep_top > screening.rescore_top:
            raise InputError(f"--keep_top {screening.keep_top} keeps more candidates than --rescore_top "
                             f"{screening.rescore_top} may re-score: raise --rescore_top or lower --keep_top")
        if screening.keep_top and not screen.keep_top:
            raise InputError(f"--keep_top follows one screen; --screen {screening.screen} re-scores the union of "
                             "fixed tops: use --screen coarse with --keep_top, or drop --keep_top")
        if screen.linear_only and settings.unlearning.weight_selection not in LINEAR_SELECTIONS:
            raise InputError(f"--screen {screening.screen} needs nn.Linear weights; --weight_selection "
                             f"{settings.unlearning.weight_selection} includes others: use --screen coarse")
    if screening.mode == "exact" and screening.before_losses == "on-demand":
        raise InputError("--before_losses on-demand is a two-stage option: exact AbU reads every candidate's loss "
                         "before unlearning; run compute_training_loss.py first, or add --mode two-stage")
    below = settings.ranking.influence_timesteps_below
    if below is not None and below < 1:
        raise InputError(f"--influence_timesteps_below {below} leaves no timestep (the grid starts at t = 0): give a "
                         "timestep above 0, or leave the flag out to read all T")
    if below is not None and screening.mode == "two-stage":
        raise InputError("--influence_timesteps_below is exact-mode only for now (the two-stage screen has its own "
                         "--screen_time_samples): drop --mode two-stage, or the flag")
    if screening.mode == "two-stage" and settings.ranking.ranking != "influence":
        raise InputError(f"--ranking {settings.ranking.ranking} is exact-mode only for now: drop --mode two-stage "
                         "(docs/method.md section 11 says how the two-stage screen could share the control's pass)")
    check_stopping(stopping)


def check_stopping(stopping: StoppingSettings) -> None:
    if stopping.stop_rule != "none" and (stopping.stop_every < 1 or stopping.stop_reference < 1
                                         or stopping.stop_target <= 0):
        raise InputError("--stop_every and --stop_reference must be at least 1 and --stop_target positive")


def with_device(settings, device: str):
    """The same settings on another device (a process of `accelerate launch` takes its own GPU)."""
    return replace(settings, execution=replace(settings.execution, device=device))

