"""Stage 2: unlearn each synthesized query, re-measure the candidates' losses, rank them by loss increase.

    python compute_influence.py --task_json tasks/demo_task.json

For each query of the task file, writes <result_dir>/influence/<synth path without 'synth/'>/ with
exemplar_loss.npy and laion_loss.npy (after unlearning), visualization.jpg (query + top 10) and, last,
influence.pkl (influence, rank, n_exemplar, query_loss, settings). Needs stage 1's cache of the query's
model, made with the same settings (checked for every query before the first one is unlearned).
"""
import argparse
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from unlearn import LAION_400M, unlearn
from utils.cli import add_common_args, check_dataroot, run
from utils.data import ExemplarCandidates, LaionCandidates
from utils.fisher import load_fisher
from utils.host_memory import bound_heap_growth
from utils.io import InputError, check_writable, claim, finished_since, save_npy, save_pickle
from utils.layout import EXEMPLAR_LOSS, LAION_LOSS, VISUALIZATION, ResultsLayout
from utils.loss_cache import check_loss_cache, load_loss_cache, load_losses_by_timestep, loss_settings
from utils.losses import collect_losses, validate_batch_layout
from utils.metrics import fold_flips, influence_and_rank, rank_candidates
from utils.models import (CONCEPT_TOKEN, WEIGHT_SELECTIONS, PristineWeights, apply_customization,
                          check_candidates_fit, encode_images, encode_prompt, load_base_model, select_parameter_names)
from utils.processes import process_share
from utils.screening import SCREENS, first_order_screen, rescore_rows, scatter_rows, screen_timesteps
from utils.speed import configure_unet, loss_tracker, resolve_precision
from utils.tasks import exemplar_paths, load_tasks, tasks_by_model
from utils.transforms import load_image_tensor, load_rgb
from utils.visualize import laion_image_paths, save_top_k_figure


# the settings that decide a query's result: a finished query is skipped only when they match this run's
RESULT_SETTINGS = ("seed", "laion_subset_size", "precision", "compile", "fisher_dataset_size", "fisher_floor",
                   "weight_selection", "unlearn_lr", "unlearn_steps", "unlearn_batch_size", "unlearn_grad_accum_steps",
                   "loss_batch_size", "loss_time_samples", "preconditioner", "drop_concept_token",
                   "unscaled_synth_latent", "noise_image", "mode", "stop_rule")
TWO_STAGE_SETTINGS = ("screen", "screen_time_samples", "rescore_top")  # the screen's batch size is memory only
LINEAR_SELECTIONS = ("cross-attn-kv", "cross-attn")  # only nn.Linear weights and biases
STOP_SETTINGS = ("stop_target", "stop_every", "stop_reference")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--fisher_path", default=None, help="diagonal Fisher file (default: <dataroot>/sd_fisher.pt)")
    parser.add_argument("--fisher_floor", type=float, default=None,
                        help="clamp Fisher entries to at least this value (default: zero entries are an error)")
    parser.add_argument("--fisher_dataset_size", type=int, default=LAION_400M,
                        help="N in the update lr * grad / (F * N): the pretraining-set size (LAION-400M)")
    parser.add_argument("--weight_selection", default="cross-attn-kv", choices=list(WEIGHT_SELECTIONS),
                        help="which UNet parameters unlearning updates")
    parser.add_argument("--unlearn_lr", type=float, default=0.1, help="unlearning step size")
    parser.add_argument("--unlearn_steps", type=int, default=100, help="number of unlearning steps")
    parser.add_argument("--unlearn_batch_size", type=int, default=16, help="query copies per micro-batch")
    parser.add_argument("--unlearn_grad_accum_steps", type=int, default=10, help="micro-batches per step")
    parser.add_argument("--loss_batch_size", type=int, default=200, help="must equal stage 1's --batch_size")
    parser.add_argument("--loss_time_samples", type=int, default=10, help="must equal stage 1's --time_samples")
    parser.add_argument("--loss_cache_dir", default=None,
                        help="stage-1 caches to subtract from (default: <result_dir>/orig_loss); lets several "
                             "variants, each with its own --result_dir, share one stage 1")
    parser.add_argument("--preconditioner", default="fisher", choices=["fisher", "none"],
                        help="'none' is the paper's plain-gradient-ascent ablation: p += lr * grad / accum")
    parser.add_argument("--drop_concept_token", action="store_true",
                        help="ablation: unlearn the query under its prompt with '<new1>' removed")
    parser.add_argument("--mode", default="exact", choices=["exact", "two-stage"],
                        help="exact: re-measure every candidate after unlearning (the paper); two-stage: screen every "
                             "candidate cheaply, re-measure only the top --rescore_top (utils/screening.py)")
    parser.add_argument("--screen", default="coarse", choices=list(SCREENS),
                        help="two-stage: the estimate of each candidate's loss rise (utils/screening.py)")
    parser.add_argument("--screen_time_samples", type=int, default=1,
                        help="two-stage: grid timesteps the screen measures (of --loss_time_samples)")
    parser.add_argument("--rescore_top", type=int, default=5000,
                        help="two-stage: candidates re-measured exactly per query; the rest are ranked by the screen "
                             "(default: 5%% of AbC's 100K, the fraction chosen on mini-AbC's validation split, "
                             "docs/performance.md)")
    parser.add_argument("--screen_batch_size", type=int, default=16,
                        help="two-stage, first-order: rows per forward + backward pass (memory only; the noise "
                             "follows --loss_batch_size's layout)")
    parser.add_argument("--stop_rule", default="none", choices=["none", "rise", "collateral"],
                        help="a per-query stopping rule, checked every --stop_every steps (default none: the paper's "
                             "fixed schedule): rise stops when the query's own loss reaches --stop_target times its "
                             "loss before; collateral when the mean loss rise of --stop_reference pretraining "
                             "candidates reaches --stop_target times the query's rise")
    parser.add_argument("--stop_target", type=float, default=2.0, help="the stopping rule's target")
    parser.add_argument("--stop_every", type=int, default=5, help="steps between two checks of the stopping rule")
    parser.add_argument("--stop_reference", type=int, default=32,
                        help="collateral rule: the first N LAION candidate rows serve as the reference set")
    parser.add_argument("--noise_image", action="store_true",
                        help="control: unlearn pure Gaussian noise in latent space (seeded) instead of the query's "
                             "image, under its prompt: what the prompt alone retrieves")
    parser.add_argument("--unscaled_synth_latent", action="store_true",
                        help="reproduce the authors' release: unlearn the query's VAE latent WITHOUT the "
                             "scaling factor (default: scaled, like every training candidate)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def validate_flags(args) -> None:
    """Refuse flag values that would fail (or silently do something else) hours into a run."""
    if args.mode == "two-stage":
        if not 1 <= args.screen_time_samples <= args.loss_time_samples:
            raise InputError(f"--screen_time_samples must be between 1 and --loss_time_samples "
                             f"({args.loss_time_samples}), got {args.screen_time_samples}")
        if args.rescore_top < 1 or args.screen_batch_size < 1:
            raise InputError(f"--rescore_top and --screen_batch_size must be at least 1, got {args.rescore_top} "
                             f"and {args.screen_batch_size}")
        if args.screen == "first-order" and args.weight_selection not in LINEAR_SELECTIONS:
            raise InputError(f"--screen first-order needs nn.Linear weights; --weight_selection "
                             f"{args.weight_selection} includes others: use --screen coarse")
    if args.stop_rule != "none" and (args.stop_every < 1 or args.stop_reference < 1 or args.stop_target <= 0):
        raise InputError("--stop_every and --stop_reference must be at least 1 and --stop_target positive")


def check_finished_queries(args, layout, finished) -> None:
    """A finished query is skipped, not redone: refuse to skip one made with other settings (names each)."""
    parser = build_parser()
    keys = RESULT_SETTINGS + (TWO_STAGE_SETTINGS if args.mode == "two-stage" else ()) + \
        (STOP_SETTINGS if args.stop_rule != "none" else ())
    for task in finished:
        try:
            recorded = pickle.loads(layout.influence_file(task).read_bytes()).get("settings", {})
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError) as e:
            raise InputError(f"cannot read the finished result {layout.influence_file(task)} ({e}); delete it, or "
                             f"pass --overwrite") from e
        diffs = [f"{k}: result has {recorded.get(k, parser.get_default(k))!r}, this run uses {getattr(args, k)!r}"
                 for k in keys if recorded.get(k, parser.get_default(k)) != getattr(args, k)]
        if diffs:
            raise InputError(f"{layout.influence_file(task)} is a finished result made with other settings:\n  "
                             + "\n  ".join(diffs) + "\nPass --overwrite to recompute it, or give this variant its own "
                             "--result_dir (with --loss_cache_dir to share stage 1).")


def query_inputs(base, dataroot, task, args, generator):
    """The query's latent repeated unlearn_batch_size times, and its prompt's text embedding likewise."""
    image = load_image_tensor(dataroot / task.synth_image_path, base.resolution).unsqueeze(0)
    latent = encode_images(base.vae, image, generator, scale=not args.unscaled_synth_latent).to(args.device)
    if args.noise_image:  # the control: a latent of the same shape that holds no image at all
        latent = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(args.device)
    prompt = task.prompt
    if args.drop_concept_token:
        prompt = " ".join(prompt.replace(CONCEPT_TOKEN, " ").split())
    text = encode_prompt(base.tokenizer, base.text_encoder, prompt)
    n = args.unlearn_batch_size
    return latent.expand(n, -1, -1, -1).contiguous(), text.expand(n, -1, -1).contiguous()


def expected_settings(args, base, laion, dataroot, task, n_exemplars: int):
    """The settings stage 1 must have used for this query's model (utils/loss_cache.py)."""
    return loss_settings(task, base, laion, dataroot, 2 * n_exemplars, batch_size=args.loss_batch_size,
                         time_samples=args.loss_time_samples, seed=args.seed, precision=args.precision,
                         compiled=args.compile, device=args.device)


def preflight(args, dataroot, todo, laion, base, layout):
    """Check every query's image and loss cache before hours of unlearning, not at query 37.
    Returns {model_path: its exemplar paths}."""
    checked = {}
    for task in todo:
        load_rgb(dataroot / task.synth_image_path)  # exists and reads as an image (or says which file does not)
        if task.model_path not in checked:
            ex_paths = exemplar_paths(dataroot, task)
            check_loss_cache(layout.loss_cache(task), expected_settings(args, base, laion, dataroot, task, len(ex_paths)))
            checked[task.model_path] = ex_paths
    return checked


def unlearning_setup(args, base, dataroot):
    """The parameters unlearning moves, their preconditioner F and the N of p += lr * grad / (F * N) / accum."""
    names = set(select_parameter_names(base.unet, args.weight_selection))
    params = {n: p for n, p in base.unet.named_parameters() if n in names}
    if args.preconditioner == "none":  # F = 1, N = 1: the step is lr * grad / accum
        return params, {n: torch.ones_like(p, dtype=torch.float64) for n, p in params.items()}, 1
    fisher = load_fisher(args.fisher_path or dataroot / "sd_fisher.pt", params, args.fisher_floor, args.device)
    return params, fisher, args.fisher_dataset_size


@dataclass
class Context:
    """What every query of a run shares."""

    args: argparse.Namespace
    base: object
    tracker: torch.nn.Module  # measures losses (torch.compile'd with --compile); unlearning runs the eager UNet
    pristine: PristineWeights
    params: dict
    fisher: dict
    dataset_size: int
    laion: LaionCandidates
    dataroot: Path
    layout: ResultsLayout
    laion_paths: list
    exemplars_of: dict

    def collect(self, candidates, desc, **kw):
        a = self.args
        return collect_losses(self.tracker, self.base.scheduler, candidates, batch_size=a.loss_batch_size,
                              time_samples=a.loss_time_samples, seed=a.seed, device=a.device, precision=a.precision,
                              desc=desc, **kw)


def main(argv=None):
    args = parse_args(argv)
    args.precision = resolve_precision(args.precision, args.device)  # 'auto' -> the device's; recorded resolved
    bound_heap_growth()  # host memory that follows the batch size, not the number of candidates
    validate_batch_layout(args.loss_batch_size, args.loss_time_samples)
    validate_flags(args)
    dataroot = check_dataroot(args.dataroot)
    check_writable(args.result_dir)
    layout = ResultsLayout(args.result_dir, args.loss_cache_dir)
    tasks = load_tasks(args.task_json)
    todo = [t for t in tasks if args.overwrite or not layout.influence_file(t).is_file()]
    check_finished_queries(args, layout, [t for t in tasks if t not in todo])
    # two-stage screens all of a model's queries in one pass: processes share models, not queries
    units = [[t] for t in todo] if args.mode == "exact" else list(tasks_by_model(todo).values())
    units, args.device, rank, world = process_share(units, args.device)
    print(f"{len(tasks)} query(ies) in {args.task_json}; {len(tasks) - len(todo)} done, {len(todo)} to do"
          + (f"; process {rank} of {world} takes {sum(map(len, units))}" if world > 1 else ""))
    if not units:
        return
    laion = LaionCandidates(dataroot, args.laion_subset_size)
    base = load_base_model(args.sd_version, args.device)
    check_candidates_fit(base, laion.latents.shape, laion.text_embeddings.shape[-1], dataroot)
    exemplars_of = preflight(args, dataroot, [t for u in units for t in u], laion, base, layout)
    configure_unet(base.unet, args.device, args.precision)
    params, fisher, dataset_size = unlearning_setup(args, base, dataroot)
    ctx = Context(args, base, loss_tracker(base.unet, args.compile), PristineWeights(base.unet), params, fisher,
                  dataset_size, laion, dataroot, layout, laion_image_paths(dataroot), exemplars_of)
    started = time.time()
    for unit in tqdm(units, desc="queries" if args.mode == "exact" else "models", unit="unit"):
        lock = layout.query_claim(unit[0]) if args.mode == "exact" else layout.model_claim(unit[0])
        what = f"query {unit[0].synth_image_path}" if args.mode == "exact" else f"the queries of {unit[0].model_path}"
        with claim(lock, what) as mine:  # another process started on the same task file may hold it
            unit = [t for t in unit if not finished_since(layout.influence_file(t), started, args.overwrite)] \
                if mine else []
            if unit and args.mode == "exact":
                attribute_query(ctx, unit[0])
            elif unit:
                attribute_model_two_stage(ctx, unit)


def unlearn_query(ctx: Context, task, laion_before: np.ndarray) -> dict:
    """Unlearn the query in place on the customized UNet; its own loss before and after, under fixed noise."""
    args = ctx.args
    generator = torch.Generator().manual_seed(args.seed)
    latents, text = query_inputs(ctx.base, ctx.dataroot, task, args, generator)
    query = ExemplarCandidates(latents[:1].cpu(), text[:1].cpu())
    before = ctx.collect(query, "query loss")
    ctx.pristine.protect(ctx.params)
    checks = []
    should_stop = stopping_rule(ctx, query, float(before[0]), laion_before, checks)
    history = unlearn(ctx.base.unet, ctx.base.scheduler, latents, text, ctx.params, ctx.fisher,
                      steps=args.unlearn_steps, grad_accum_steps=args.unlearn_grad_accum_steps, lr=args.unlearn_lr,
                      dataset_size=ctx.dataset_size, generator=generator, precision=args.precision,
                      should_stop=should_stop)
    after = ctx.collect(query, "query loss")
    out = {"query_loss": (float(before[0]), float(after[0])), "history": np.asarray(history)}
    if should_stop is not None:
        out["stop"] = {"rule": args.stop_rule, "target": args.stop_target, "steps_taken": len(history),
                       "stopped_early": len(history) < args.unlearn_steps, "checks": checks,
                       "reference_rows": min(args.stop_reference, len(ctx.laion))}
    return out


def stopping_rule(ctx: Context, query, before: float, laion_before: np.ndarray, checks: list):
    """The --stop_rule as unlearn's should_stop(done), or None. Each check measures the query's own loss under
    its fixed noise (T forwards; the collateral rule adds its reference rows) and is appended to `checks`."""
    args = ctx.args
    if args.stop_rule == "none":
        return None
    reference = np.arange(min(args.stop_reference, len(ctx.laion)))

    def should_stop(done: int) -> bool:
        if done % args.stop_every:
            return False
        if args.stop_rule == "collateral" and done == 0:
            return False  # nothing has moved yet: no collateral to measure
        loss = float(ctx.collect(query, "stopping check")[0])
        check = {"step": done, "query_loss": loss, "query_ratio": loss / before}
        if args.stop_rule == "rise":
            stop = check["query_ratio"] >= args.stop_target
        else:  # collateral: the reference candidates' mean rise against the query's own
            rise = ctx.collect(ctx.laion, "stopping check", rows=reference).astype(np.float64) - laion_before[reference]
            check["collateral"] = float(rise.mean()) / max(loss - before, 1e-12)
            stop = check["collateral"] >= args.stop_target
        checks.append(check)
        return stop

    return should_stop


def model_inputs(ctx: Context, task):
    """The stage-1 cache of the task's model (checked) and its exemplars as candidates."""
    ex_paths = ctx.exemplars_of[task.model_path]
    expected = expected_settings(ctx.args, ctx.base, ctx.laion, ctx.dataroot, task, len(ex_paths))
    ex_before, laion_before, ex_latents, _ = load_loss_cache(ctx.layout.loss_cache(task), expected)
    exemplars = ExemplarCandidates(ex_latents, encode_prompt(ctx.base.tokenizer, ctx.base.text_encoder,
                                                             task.train_prompt).cpu())
    return ex_before, laion_before, exemplars


def attribute_query(ctx: Context, task) -> None:
    """Exact AbU: customize, unlearn the query, re-measure every candidate, rank, write the query's outputs."""
    apply_customization(ctx.base, ctx.pristine, ctx.dataroot / task.model_path)
    ex_before, laion_before, exemplars = model_inputs(ctx, task)
    unlearned = unlearn_query(ctx, task, laion_before)
    ex_after = ctx.collect(exemplars, "exemplar losses")
    laion_after = ctx.collect(ctx.laion, "LAION losses")
    ctx.pristine.restore()
    check_finite(task, ex_after, laion_after)
    influence, rank = influence_and_rank(ex_before, ex_after, laion_before, laion_after)
    rows = len(ex_after) + len(laion_after)
    cost = {**unlearning_cost(ctx.args, unlearned), "loss tracking": rows * ctx.args.loss_time_samples}
    write_outputs(ctx, task, ex_after, laion_after, influence, rank, unlearned, {"forward_equivalents": cost})


def check_finite(task, *measured) -> None:
    if not all(np.isfinite(m).all() for m in measured):
        raise InputError(f"{task.synth_image_path}: losses after unlearning are not finite; the step is too "
                         f"large (lower --unlearn_lr) or the Fisher has tiny entries (--fisher_floor)")


def unlearning_cost(args, unlearned: dict) -> dict:
    """UNet forward-equivalents of unlearning a query (the steps it took), of measuring its own loss twice and
    of the stopping rule's checks (backward = 2 forwards)."""
    steps = len(unlearned["history"])
    cost = {"unlearning": 3 * steps * args.unlearn_grad_accum_steps * args.unlearn_batch_size,
            "query loss": 2 * args.loss_time_samples}
    if "stop" in unlearned:
        per_check = 1 + (unlearned["stop"]["reference_rows"] if args.stop_rule == "collateral" else 0)
        cost["stopping checks"] = len(unlearned["stop"]["checks"]) * per_check * args.loss_time_samples
    return cost


def attribute_model_two_stage(ctx: Context, tasks) -> None:
    """Two-stage AbU for the queries of one model (utils/screening.py): unlearn each, screen every candidate
    for all of them, re-score each query's top --rescore_top candidates exactly, rank, write."""
    args, task0 = ctx.args, tasks[0]
    apply_customization(ctx.base, ctx.pristine, ctx.dataroot / task0.model_path)
    ex_before, laion_before, exemplars = model_inputs(ctx, task0)
    start = {n: p.detach().clone() for n, p in ctx.params.items()}  # the customized weights, theta_0
    unlearned, weights = [], []
    for task in tasks:
        unlearned.append(unlearn_query(ctx, task, laion_before))
        weights.append({n: p.detach().clone() for n, p in ctx.params.items()})
        load_weights(ctx.params, start)
    t_index = screen_timesteps(args.loss_time_samples, args.screen_time_samples)
    screens = screen_model(ctx, task0, exemplars, start, weights, t_index)
    n_rows = len(ex_before) + len(laion_before)
    model_screen_cost = n_rows * len(t_index) * (3 if args.screen == "first-order" else len(tasks))
    for q, task in enumerate(tasks):
        screen = np.concatenate([fold_flips(screens["exemplar"][:, q]), fold_flips(screens["laion"][:, q])])
        n_ex = len(ex_before) // 2
        top = rank_candidates(screen, n_ex)[:args.rescore_top]
        ex_rows, laion_rows = rescore_rows(top[top < n_ex], n_ex), rescore_rows(top[top >= n_ex] - n_ex,
                                                                                  len(laion_before) // 2)
        load_weights(ctx.params, weights[q])
        ex_measured = ctx.collect(exemplars, "re-scored exemplars", rows=ex_rows)
        laion_measured = ctx.collect(ctx.laion, "re-scored LAION", rows=laion_rows)
        load_weights(ctx.params, start)
        check_finite(task, ex_measured, laion_measured)
        ex_after = scatter_rows(ex_measured, ex_rows, len(ex_before))  # float32, NaN where not re-scored
        laion_after = scatter_rows(laion_measured, laion_rows, len(laion_before))
        influence, rank = influence_and_rank(ex_before, ex_after, laion_before, laion_after, screen=screen)
        cost = {**unlearning_cost(args, unlearned[q]), "screen": model_screen_cost / len(tasks),
                "re-scoring": (len(ex_rows) + len(laion_rows)) * args.loss_time_samples}
        write_outputs(ctx, task, ex_after, laion_after, influence, rank, unlearned[q], {
            "forward_equivalents": cost, "screen": screen, "rescored": int(len(top)),
            "screen_timesteps": t_index.tolist()})
    ctx.pristine.restore()


def screen_model(ctx: Context, task, exemplars, start, weights, t_index) -> dict:
    """{"exemplar": [rows, Q], "laion": [rows, Q]}: each row's estimated loss rise for each query."""
    args = ctx.args
    if args.screen == "first-order":
        deltas = [{n: w[n] - start[n] for n in start} for w in weights]
        kw = dict(batch_size=args.loss_batch_size, time_samples=args.loss_time_samples, seed=args.seed,
                  timestep_index=t_index, device=args.device, precision=args.precision, chunk=args.screen_batch_size)
        return {"exemplar": first_order_screen(ctx.base.unet, ctx.base.scheduler, exemplars, deltas, **kw),
                "laion": first_order_screen(ctx.base.unet, ctx.base.scheduler, ctx.laion, deltas, **kw)}
    ex_before_t, laion_before_t = load_losses_by_timestep(ctx.layout.loss_cache(task))
    out = {"exemplar": [], "laion": []}
    for w in weights:  # coarse: the exact rise at the screen timesteps, one pass per query
        load_weights(ctx.params, w)
        for key, candidates, before in (("exemplar", exemplars, ex_before_t), ("laion", ctx.laion, laion_before_t)):
            after = ctx.collect(candidates, f"coarse screen ({key})", timestep_index=t_index, per_timestep=True)
            out[key].append((after.astype(np.float64) - before[:, t_index]).mean(axis=1))
        load_weights(ctx.params, start)
    return {k: np.stack(v, axis=1) for k, v in out.items()}


@torch.no_grad()
def load_weights(params: dict, values: dict) -> None:
    for n, p in params.items():
        p.copy_(values[n])


def write_outputs(ctx: Context, task, ex_after, laion_after, influence, rank, unlearned: dict, extra: dict) -> None:
    """The query's after-losses, picture and, last, influence.pkl."""
    ex_paths = ctx.exemplars_of[task.model_path]
    out_dir = ctx.layout.query_dir(task)
    save_npy(out_dir / EXEMPLAR_LOSS, ex_after)
    save_npy(out_dir / LAION_LOSS, laion_after)
    save_top_k_figure(out_dir / VISUALIZATION, ctx.dataroot / task.synth_image_path, influence, rank,
                      ex_paths, ctx.laion_paths)
    run_settings = {k: v for k, v in vars(ctx.args).items() if k not in ("overwrite", "device")}
    save_pickle(ctx.layout.influence_file(task), {  # written last: its presence marks a finished query
        "influence": influence, "rank": rank, "n_exemplar": len(ex_paths), "query_loss": unlearned["query_loss"],
        "unlearn_loss_history": unlearned["history"], "unlearn_steps_taken": len(unlearned["history"]),
        "stop": unlearned.get("stop"), "settings": run_settings, "task": asdict(task), "mode": ctx.args.mode, **extra})
    ranks = sorted(int(i) + 1 for i in np.flatnonzero(rank < len(ex_paths)))
    before, after = unlearned["query_loss"]
    tqdm.write(f"{task.synth_image_path}: query loss {before:.4f} -> {after:.4f}; "
               f"exemplars at ranks {ranks} of {len(rank)} -> {out_dir}")


if __name__ == "__main__":
    run(main)
