"""Issue 31's first probe: ideas for an attribution that predicts the counterfactual, scored on its truth.

    python -m benchmarks.counterfactual_ideas --split val    # benchmarks/results/mini_abc/counterfactual_ideas_val.md
                                                             # and .png: every idea against the issue's target

A probe, not a flag: it scores ideas on the counterfactual table's truth and queries (benchmarks/counterfactual_scoring.py,
docs/counterfactual.md) before any of them is worth a flag of compute_influence.py. It reads that table's runs
(results/mini_abc/image_<split>, made by `python -m benchmarks.counterfactual --split <split>`) and adds:

* **exemplar unlearning**, the counterfactual's own direction: AbU unlearns the *query* and measures how much each
  exemplar's loss rises; leave-one-out removes an *exemplar* and measures the query. Here each exemplar of a model
  is unlearned in turn (AbU's Fisher-preconditioned ascent on the exemplar under the model's training caption,
  utils.unlearning.QueryUnlearner, the customized weights restored after each), and every query's loss under its
  own prompt is measured before and after it (both flips, T shared (t, noise) draws): the score of (query,
  exemplar) is the rise. One unlearning per exemplar serves all of a model's queries. Two schedules: the
  stopping rule of the table's runs ("stop rule") and five small steps (lr 0.02, "gentle");
* **the relative rise**, one of AbU's own knobs: each exemplar's loss rise over its loss before unlearning, from the
  table's runs (their after-losses and stage-1 caches);
* **peer contrasts of every row**: the score minus its mean over the prompt's samples no label chose;
* **blends** z(s) + lambda z(s - peers' mean), z over the model's exemplars: a query's whole ordering and its
  image's part in one score (a tie goes to the whole ordering);
* **the gradient family** at the customized model (GradientIdeas): each exemplar's gradient of its training loss
  (its own caption, both flips, 64 grid timesteps) and each query's gradient of the loss the truth measures (its
  latent samples, T, noise and batch plan exactly), w.r.t. the cross-attention K/V weights; scored as g_q . g_j
  (no preconditioner), g_q . F^-1 g_j (the one-step natural-gradient score, unnormalised), the same on the lower
  half of the timesteps, at other noise draws, with D-TRAK's squared-output gradients, TRAK's kernel
  phi_q^T (Phi^T Phi + lambda I)^-1 phi_j on Fisher-whitened gradients sketched to 2,048 dimensions, and
  g_q . F^-1 g_j with EK-FAC's F (utils.kfac: the K-FAC influence functions of diffusion models);
* **AbU's knobs** (--knobs): the stopping rule checked at every step instead of every 5, its target at x2 instead
  of x1.5, every weight unlearned instead of the cross-attention K/V (its own Fisher, sd_fisher_all.pt of the
  builder's derive stage), the preconditioner (none, EK-FAC, K-FAC: sd_ekfac.safetensors of the derive stage; the
  same with K-FAC-reduce's factors, sd_ekfac_reduce.safetensors) and
  the timesteps the loss rise reads (below t = 500), each a run of compute_influence.py on the table's queries
  (results/mini_abc/image_<split>/).

The exemplar-unlearning losses and the gradient scores are cached per model (and schedule) under
<runs>/exemplar_unlearning/ (atomic, reused; --overwrite measures again; gradient scores cached without one of
GradientIdeas.IDEAS are measured again).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.counterfactual_scoring import (BASELINES, CONTROL, N_LAION, STOP, Base, ceiling_rows,
                                               exemplar_scores, fmt, look_rows, representatives, score_rows, slug)
from benchmarks.runner import (BENCH, COLOURS, REPO, TUNED, abu_flags, canvas, check_all_timestep_losses, common_flags,
                               run, timed, tuned_sizing)
from data.mini_abc_build.counterfactual import OUT_DIR, CounterfactualConfig
from utils.io import atomic_write, load_json, load_npy
from utils.layout import EXEMPLAR_LOSS, ResultsLayout
from utils.metrics import fold_flips
from utils.ranking import standardize
from utils.tasks import load_tasks

SCHEDULES = {"stop rule": STOP, "gentle": ["--stop_rule", "none", "--unlearn_steps", "5", "--unlearn_lr", "0.02"]}
COLUMNS = [("LOO", "LOO"), ("LOO, image-specific", "LOO, image-specific"), ("LDS", "LDS"),
           ("LDS, image-specific", "LDS, image-specific"), ("across samples", "across samples"),
           ("look Spearman", "look, per prompt"), ("look pair AUC", "look pair AUC")]
LAMBDAS = (0.5, 1.0, 2.0)
# AbU's own knobs, each a run of compute_influence.py on the table's task file, its stage-1 cache and sizing. The
# tuned stopping rule checks every 5 steps and 98 of the 108 validation queries are past x1.5 at the first check
# (docs/counterfactual.md), so a lower target changes almost nothing: the knobs are how often it checks (every
# step: it stops at the first step past x1.5) and a higher target (x2: 5, 10 or more steps)
KNOBS = {"AbU, stop rule checked every step": ("abu_stop_every_1", STOP[:-1] + ["1"]),
         "AbU, stop target 2": ("abu_stop_target_2", [f if f != str(TUNED["stop_target"]) else "2.0" for f in STOP]),
         # which weights it unlearns: the K/V read only the prompt's tokens (their gradient lies in the span of the
         # caption's embeddings), every weight also reads the picture; the all-weights Fisher and N of the
         # comparison's ablation (docs/mini_abc.md)
         "AbU, all weights, stop rule": ("abu_all_weights_stop_rule", STOP + [
             "--weight_selection", "all", "--fisher_path", str(BENCH / "abc" / "sd_fisher_all.pt"),
             "--fisher_dataset_size", str(int(TUNED["all_weights_n"]))]),
         # the preconditioner, at the tuned lr and N: none (the plain ascent at the comparison's tuned lr), EK-FAC
         # (the Fisher in K-FAC's eigenbasis, refitted: its steps move the query's loss as the diagonal's do) and
         # K-FAC (its eigenvalues c_i a_j are smaller and its steps larger: x1.7 to x3 after one step on three
         # validation queries, so its stopping rule checks every step)
         "AbU, no preconditioner, stop rule": ("abu_no_preconditioner_stop_rule", STOP + [
             "--preconditioner", "none", "--unlearn_lr", str(TUNED["sgd_lr"])]),
         "AbU, EK-FAC, stop rule": ("abu_ekfac_stop_rule", STOP + ["--preconditioner", "ekfac"]),
         "AbU, K-FAC, stop rule checked every step": ("abu_kfac_stop_every_1", STOP[:-1] + ["1", "--preconditioner",
                                                                                          "kfac"]),
         # EK-FAC in K-FAC-reduce's bases (sd_ekfac_reduce.safetensors of the derive stage), the variant for layers
         # whose token outputs the loss mixes, as attention mixes the K/V's; its Lambda sums to the diagonal's, so
         # its rule is checked as EK-FAC's. K-FAC-reduce's own eigenvalues are refused for the keys (utils.kfac's
         # check_kfac_scale: their G is zero up to rounding)
         "AbU, EK-FAC-reduce, stop rule": ("abu_ekfac_reduce_stop_rule", STOP + [
             "--preconditioner", "ekfac", "--fisher_path", str(BENCH / "abc" / "sd_ekfac_reduce.safetensors")]),
         # the timesteps the rise reads: below t = 500, where the truth's signal check found the image's part (the
         # table's T = 3 grid: t = 0 and 333 of 0, 333, 666); the same unlearning as the stop rule's
         "AbU, stop rule, rise below t = 500": ("abu_stop_rule_below_t500", STOP + ["--influence_timesteps_below",
                                                                                    "500"])}


class ExemplarUnlearning:
    """Unlearns each exemplar of a counterfactual base and measures its queries' losses (see the module doc)."""

    def __init__(self, schedule: list, time_samples: int):
        from utils.models import load_base_model
        from utils.settings import InfluenceSettings, parse_settings
        from utils.unlearning import QueryUnlearner
        from utils.weights import PristineWeights

        flags = (["--task_json", "unused"] + common_flags(BENCH, N_LAION) + abu_flags(tuned_sizing())
                 + ["--device", "cpu"] + schedule)
        self.settings = parse_settings(InfluenceSettings, "", flags)
        self.dataroot, self.time_samples = BENCH / "abc", time_samples
        self.model = load_base_model(str(BENCH / "sd-mini"), "cpu")
        self.pristine = PristineWeights(self.model.unet)
        measurement = self.settings.measurement()
        collect = lambda c, desc, **kw: measurement.collect(self.model.unet, self.model.scheduler, c, desc, **kw)  # noqa
        self.unlearner = QueryUnlearner(self.settings, self.model, self.dataroot, collect, self.pristine)

    def query_losses(self, queries) -> np.ndarray:
        """[n queries] mean loss over both flips and the T draws (the same draws at every call)."""
        from utils.losses import collect_losses

        loss = collect_losses(self.model.unet, self.model.scheduler, queries, batch_size=8 * self.time_samples,
                              time_samples=self.time_samples, seed=0, desc="query losses")
        n = len(loss) // 2
        return 0.5 * (loss[:n] + loss[n:])

    def effects(self, spec: dict) -> dict:
        """{"before" [n queries], "after" [n exemplars, n queries], "steps" [n exemplars], "forwards" (UNet
        forward-equivalents, backward = 2)} for one base of the counterfactual plan."""
        import torch

        from utils.customization import apply_customization
        from utils.data import ExemplarCandidates, load_exemplar_images
        from utils.encoders import encode_images, encode_prompt
        from utils.tasks import Task
        from utils.weights import restored

        m = self.model
        apply_customization(m, self.pristine, self.dataroot / spec["model_path"])
        try:
            images = load_exemplar_images([self.dataroot / q["path"] for q in spec["queries"]], m.resolution)
            latents = encode_images(m.vae, images, torch.Generator().manual_seed(0), batch_size=64)
            text = {p: encode_prompt(m.tokenizer, m.text_encoder, p).cpu() for p in {q["prompt"] for q in spec["queries"]}}
            queries = ExemplarCandidates(latents, torch.cat([text[q["prompt"]] for q in spec["queries"]]))
            before, after, steps, forwards = self.query_losses(queries), [], [], 0.0
            for path in spec["exemplars"]:
                exemplar = Task(synth_image_path=path, prompt=spec["train_prompt"], test_case=spec["test_case"],
                                test_case_ind=0, model_path=spec["model_path"], train_prompt=spec["train_prompt"])
                with restored(self.unlearner.params):
                    unlearned = self.unlearner.unlearn(exemplar, None)
                    after.append(self.query_losses(queries))
                steps.append(len(unlearned["history"]))
                forwards += sum(self.unlearner.cost(unlearned).values())  # its steps and the exemplar's own loss
        finally:
            self.pristine.restore()
        n_rows = 2 * len(spec["queries"]) * self.time_samples
        return {"before": before, "after": np.stack(after), "steps": np.array(steps),
                "forwards": forwards + (len(steps) + 1) * n_rows}


class GradientIdeas:
    """The gradient family on the counterfactual's own question (see the module doc): per base, each exemplar's and
    each query's gradient w.r.t. the cross-attention K/V weights at the customized model, and scores of (query,
    exemplar) built from them."""

    EXEMPLAR_T = 64  # grid timesteps of an exemplar row's gradient (both flips, its own training caption)
    PROJECTION = 2048  # TRAK's random projection: rows of a seeded Gaussian sketch of the P K/V weights
    DAMPING = 0.1  # the kernel's damping, times the mean of its diagonal
    IDEAS = ("gradient dot", "gradient, Fisher", "gradient, Fisher, lower half of t", "gradient, Fisher, other draws",
             "gradient, Fisher, square output", "TRAK kernel (Fisher-whitened)", "gradient, EK-FAC")

    def __init__(self):
        import torch

        from utils.fisher import load_fisher
        from utils.kfac import EKFAC_FILE, load_kronecker_fisher
        from utils.models import load_base_model
        from utils.weights import PristineWeights, select_parameter_names

        self.model = load_base_model(str(BENCH / "sd-mini"), "cpu")
        self.pristine = PristineWeights(self.model.unet)
        self.names = select_parameter_names(self.model.unet, "cross-attn-kv")  # what AbU unlearns, Custom Diffusion trains
        params = dict(self.model.unet.named_parameters())
        fisher = load_fisher(BENCH / "abc" / "sd_fisher.pt", {n: params[n] for n in self.names})
        self.inv_fisher = torch.cat([fisher[n].reciprocal().flatten() for n in self.names]).float()
        self.ekfac = load_kronecker_fisher(BENCH / "abc" / EKFAC_FILE, {n: params[n] for n in self.names})
        self.truth = CounterfactualConfig()

    def gradients(self, candidates, time_samples: int, seed: int, output: str, bands: int = 1):
        from utils.baselines import mean_row_gradients

        batch = 2 * time_samples  # two rows a batch: a query's or an exemplar's two flips share one
        g = mean_row_gradients(self.model.unet, self.model.scheduler, self.names, candidates, batch, time_samples,
                               seed, f"{output} gradients", output=output, bands=bands)
        n = len(g) // 2
        return 0.5 * (g[:n] + g[n:])  # [n, bands, P]: the two flips folded, as the truth folds their losses

    def sketch(self, g):
        """[n, P] -> [n, PROJECTION]: g R with R [P, PROJECTION] seeded Gaussian / sqrt(PROJECTION), made in row
        blocks (never held whole)."""
        import torch

        gen, out = torch.Generator().manual_seed(0), 0
        for s in range(0, g.shape[1], 8192):
            block = torch.randn(min(8192, g.shape[1] - s), self.PROJECTION, generator=gen) / self.PROJECTION ** 0.5
            out = out + g[:, s:s + 8192].double() @ block.double()
        return out

    def ekfac_solve(self, g):
        """[n, P] -> [n, P]: F^-1 g with EK-FAC's F, weight by weight (the flat layout: `names` order, row-major)."""
        import torch

        out, start = [], 0
        for n in self.names:
            f = self.ekfac[n]
            shape = f.eigvals.shape
            block = g[:, start:start + shape.numel()].reshape(len(g), *shape)
            out.append(f.solve(block).flatten(1))
            start += shape.numel()
        return torch.cat(out, dim=1)

    def kernel_scores(self, q, ex):
        """[n queries, n exemplars]: TRAK's phi_q^T (Phi^T Phi + lambda I)^-1 phi_j with Phi the exemplars' sketched,
        Fisher-whitened gradients, by Woodbury: (phi_q Phi^T)(Phi Phi^T + lambda I)^-1."""
        import torch

        w = self.inv_fisher.sqrt()
        phi_q, phi = self.sketch(q * w), self.sketch(ex * w)
        gram = phi @ phi.T
        damping = self.DAMPING * gram.diagonal().mean()
        return (phi_q @ phi.T @ torch.linalg.inv(gram + damping * torch.eye(len(gram), dtype=gram.dtype))).numpy()

    def scores(self, spec: dict) -> dict:
        """{idea: [n queries, n exemplars]} and "forwards" (UNet forward-equivalents of one idea's gradients on the
        model, backward = 2) for one base of the counterfactual plan. "lower half of t": the query's gradient over the
        lower half of the truth's grid timesteps (t <= 441 of 0..889), where the signal check found the image."""
        import torch

        from utils.customization import apply_customization
        from utils.data import ExemplarCandidates, load_exemplar_images
        from utils.encoders import encode_images, encode_prompt

        m, truth = self.model, self.truth
        apply_customization(m, self.pristine, BENCH / "abc" / spec["model_path"])
        try:
            text = lambda prompts: torch.cat([encode_prompt(m.tokenizer, m.text_encoder, p).cpu()  # noqa: E731
                                              for p in prompts])
            paths = lambda ps: load_exemplar_images([BENCH / "abc" / p for p in ps], m.resolution)  # noqa: E731
            # the queries exactly as the truth measures them: its latent samples, T, noise seed and batch plan
            q_latents = encode_images(m.vae, paths([q["path"] for q in spec["queries"]]),
                                      torch.Generator().manual_seed(truth.latent_seed), batch_size=64)
            queries = ExemplarCandidates(q_latents, text([q["prompt"] for q in spec["queries"]]))
            ex_latents = encode_images(m.vae, paths(spec["exemplars"]), torch.Generator().manual_seed(0), batch_size=64)
            exemplars = ExemplarCandidates(ex_latents, text(spec["captions"]))
            assert truth.loss_batch_size == 2 * truth.time_samples  # the batch plan `gradients` reproduces
            q = {"loss": self.gradients(queries, truth.time_samples, truth.loss_seed, "loss", bands=2),
                 "other draws": self.gradients(queries, truth.time_samples, truth.loss_seed + 1, "loss"),
                 "square": self.gradients(queries, truth.time_samples, truth.loss_seed + 1, "square")}
            ex = {o: self.gradients(exemplars, self.EXEMPLAR_T, 0, o)[:, 0] for o in ("loss", "square")}
        finally:
            self.pristine.restore()
        whole, low, f = q["loss"].mean(1), q["loss"][:, 0], self.inv_fisher
        n_q, n_ex = len(spec["queries"]), len(spec["exemplars"])
        # one idea's: its query and exemplar gradients (2 flips; a backward is 2 forwards)
        forwards = 3 * 2 * (n_q * truth.time_samples + n_ex * self.EXEMPLAR_T)
        return {"gradient dot": (whole @ ex["loss"].T).numpy(),
                "gradient, Fisher": (whole @ (ex["loss"] * f).T).numpy(),
                "gradient, Fisher, lower half of t": (low @ (ex["loss"] * f).T).numpy(),
                "gradient, Fisher, other draws": (q["other draws"][:, 0] @ (ex["loss"] * f).T).numpy(),
                "gradient, Fisher, square output": (q["square"][:, 0] @ (ex["square"] * f).T).numpy(),
                "TRAK kernel (Fisher-whitened)": self.kernel_scores(whole, ex["loss"]),
                "gradient, EK-FAC": (whole.double() @ self.ekfac_solve(ex["loss"]).T).numpy(),
                "forwards": np.array(forwards)}


def cached_measurement(path: Path, spec: dict, measure, label: str, overwrite: bool) -> dict:
    """{name: array} that `measure()` returns for one base, saved at `path` with the base's query paths (atomic) and
    read from there when present; a file measured on other queries than the plan's is refused."""
    queries = [q["path"] for q in spec["queries"]]
    if overwrite or not path.is_file():
        started = time.time()
        got = measure()
        atomic_write(path, lambda f: np.savez(f, **got, queries=np.array(queries), seconds=time.time() - started))
        print(f"{spec['name']} ({label}): {time.time() - started:.0f} s -> {path}", flush=True)
    with np.load(path) as z:
        if list(z["queries"]) != queries:
            raise RuntimeError(f"{path} was measured on other queries than the plan's {spec['name']}: pass --overwrite")
        return {k: z[k] for k in z.files if k not in ("queries", "seconds")}


def cached_gradient_scores(folder: Path, spec: dict, probe, overwrite: bool) -> dict:
    def measure():  # idea names hold spaces: stored under underscored keys, the names beside them
        got = probe().scores(spec)
        return {**{k.replace(" ", "_"): v for k, v in got.items()}, "names": np.array(list(got))}

    path = folder / f"{spec['name']}__gradients.npz"
    if path.is_file() and not overwrite:  # a cache from before an idea was added is measured again
        with np.load(path) as cached:
            overwrite = set(cached["names"]) - {"forwards"} != set(GradientIdeas.IDEAS)
    z = cached_measurement(path, spec, measure, "gradients", overwrite)
    return {k: z[k.replace(" ", "_")] for k in z["names"]}


def cached_effects(folder: Path, spec: dict, schedule: str, probe, overwrite: bool) -> dict:
    return cached_measurement(folder / f"{spec['name']}__{slug(schedule)}.npz", spec,
                              lambda: probe(schedule).effects(spec), schedule, overwrite)


def knob_runs(root: Path, knobs: list) -> None:
    """Run (or resume: finished queries are skipped) each chosen knob of KNOBS on the table's queries."""
    flags = abu_flags(tuned_sizing()) + common_flags(BENCH, N_LAION) + ["--device", "cpu"]
    for name in knobs:
        folder, extra = KNOBS[name]
        cmd = (["compute_influence.py", "--task_json", root / "counterfactual_tasks.json", "--result_dir",
                root / folder, "--loss_cache_dir", root / "orig_loss"] + flags + extra)
        ok, _ = timed(root / folder, "influence.pkl", lambda: run(cmd))
        if not ok:
            sys.exit(f"{' '.join(map(str, cmd))} failed")


def relative_rise(base: Base, folder: Path, cache: Path) -> np.ndarray:
    """[n queries, n exemplars]: (after - before) / before per exemplar row, flips folded as the influence folds
    them (utils.metrics.fold_flips), from a run's after-losses and its stage-1 cache."""
    layout = ResultsLayout(folder, cache)
    before = load_npy(layout.loss_cache(base.tasks[0]) / EXEMPLAR_LOSS, "stage-1 exemplar losses").astype(np.float64)
    out = []
    for task in base.tasks:  # one model: one stage-1 cache
        check_all_timestep_losses(layout, task)
        after = load_npy(layout.query_dir(task) / EXEMPLAR_LOSS, "exemplar losses after unlearning")
        out.append(fold_flips((after - before) / before)[:base.n_exemplar])
    return np.array(out)


def peer_contrast(base: Base, scores: np.ndarray) -> np.ndarray:
    """[n queries, n exemplars]: each query's scores minus their mean over its unselected peers."""
    return np.stack([s - scores[p].mean(axis=0) if p else s for s, p in zip(scores, base.unselected_peers)])


def z_exemplars(scores: np.ndarray) -> np.ndarray:
    """[n queries, n exemplars]: each query's scores standardised over the model's exemplars (utils.ranking's
    standardize, row by row: a constant row becomes zeros)."""
    return np.array([standardize(row) for row in scores])


def ideas(base: Base, root: Path, reps: dict, effects: dict, gradients: dict) -> dict:
    """{idea: ([n queries, n exemplars] scores, cost per query in UNet forward-equivalents or NaN)}."""
    runs = {"AbU (the paper)": exemplar_scores(base, root, "abu", "influence"),
            "AbU, stop rule": exemplar_scores(base, root, "abu_stop_rule", "influence"),
            "AbU, stop rule, control-corrected": exemplar_scores(base, root, "abu_stop_rule", "control-corrected",
                                                                 CONTROL["AbU, stop rule"], reps)}
    out = {name: (s, cost) for name, (s, _, cost) in runs.items()}
    for name, (folder, _) in KNOBS.items():  # the knobs that were run, on the bases their runs cover whole
        layout = ResultsLayout(root / folder, root / "orig_loss")
        if all(layout.influence_file(t).is_file() for t in base.tasks):
            s, _, cost = exemplar_scores(base, root, folder, "influence")
            out[name] = (s, cost)
    for name, folder in (("AbU (the paper)", "abu"), ("AbU, stop rule", "abu_stop_rule")):
        out[f"{name}, relative rise"] = (relative_rise(base, root / folder, root / "orig_loss"), out[name][1])
    for name in BASELINES:
        if (root / slug(name)).is_dir():
            out[name] = (exemplar_scores(base, root, slug(name), "influence")[0], float("nan"))
    for schedule, e in effects.items():
        out[f"exemplar unlearning, {schedule}"] = ((e["after"] - e["before"][None]).T, e["forwards"] / len(base.tasks))
    for name, scores in gradients.items():
        if name != "forwards":
            out[name] = (scores, float(gradients["forwards"]) / len(base.tasks))
    for name, (s, cost) in list(out.items()):
        out[f"{name} - peers"] = (peer_contrast(base, s), cost)
    first_round = ("AbU (the paper)", "AbU, stop rule")
    for name in (*first_round, *(k for k in KNOBS if k in out)):
        s, cost = out[name]
        whole, image = z_exemplars(s), z_exemplars(peer_contrast(base, s))
        for lam in LAMBDAS if name in first_round else (1.0,):  # a knob's blend at the first round's lambda
            # 1e-6 more of the whole: a tie (two exemplars, lambda 1) goes to the whole ordering
            out[f"z({name}) + {lam:g} z(its - peers)"] = ((1 + 1e-6) * whole + lam * image, cost)
    return out


def evaluate(split: str, root: Path, schedules: list, overwrite: bool):
    plan = load_json(BENCH / OUT_DIR / "plan.json", "counterfactual plan")
    tasks = load_tasks(BENCH / "tasks" / f"counterfactual_{split}.json")
    by_path, reps = {t.synth_image_path: t for t in tasks}, representatives(tasks)
    probes = {}  # one loaded model per schedule, made on first need (a rerun with every model cached loads none)

    def gradient_probe() -> GradientIdeas:
        if "gradients" not in probes:
            probes["gradients"] = GradientIdeas()
        return probes["gradients"]

    def probe(schedule: str) -> ExemplarUnlearning:
        if schedule not in probes:
            probes[schedule] = ExemplarUnlearning(SCHEDULES[schedule], 32)
        return probes[schedule]

    rows, costs = {}, {}
    for spec in (b for b in plan["bases"] if b["split"] == split):
        base = Base(spec, by_path, BENCH)
        if base.effects is None and base.looks_truth is None:
            continue
        effects = {s: cached_effects(root / "exemplar_unlearning", spec, s, probe, overwrite) for s in schedules}
        gradients = cached_gradient_scores(root / "exemplar_unlearning", spec, gradient_probe, overwrite)
        ceiling = ceiling_rows(base) or {}
        for metric, values in ceiling.items():
            rows.setdefault((base.kind, "*ceiling*", metric), []).extend(values.tolist())
        for name, (scores, cost) in ideas(base, root, reps, effects, gradients).items():
            got = {**score_rows(base, scores), **look_rows(base, scores)}
            for metric, values in got.items():
                rows.setdefault((base.kind, name, metric), []).extend(np.asarray(values, float).tolist())
            costs.setdefault(name, []).append(cost)
    return rows, {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in costs.items()}


def markdown(split: str, rows: dict, costs: dict) -> str:
    kinds = list(dict.fromkeys(k for k, _, _ in rows))
    knobs = [k for k in KNOBS if any(m == k for _, m, _ in rows)]  # the knob runs found (whether named or not)
    # (a knob run stopped part way is scored on the models whose queries it finished: a kind with none of them
    # shows "–" in its row)
    command = f"python -m benchmarks.counterfactual_ideas --split {split}" + (
        " --knobs " + " ".join(f'"{k}"' for k in knobs) if knobs else "")
    lines = [f"`{command}`", "",
             "Ideas for issue 31 on the counterfactual truth (mean ± standard error over queries; look columns over "
             "prompts). `- peers`: minus the mean over the prompt's unselected samples; `z(s) + l z(its - peers)`: "
             "both standardised over the model's exemplars. Cost: UNet forward-equivalents per query.", ""]
    for kind in kinds:
        methods = sorted(dict.fromkeys(m for k, m, _ in rows if k == kind), key=lambda m: m != "*ceiling*")
        lines += [f"**{kind}**", "", "| idea | " + " | ".join(c for _, c in COLUMNS) + " | cost |",
                  "|---" * (len(COLUMNS) + 2) + "|"]
        for m in methods:
            cost = costs.get(m, float("nan"))
            lines.append(f"| {m} | " + " | ".join(fmt(rows.get((kind, m, key), [])) for key, _ in COLUMNS)
                         + f" | {'' if cost != cost else f'{cost:,.0f}'} |")
        lines.append("")
    return "\n".join(lines)


TARGET_AXES = ("LOO, image-specific", "LDS, image-specific")  # the target: half the ceiling of each


def family(name: str) -> tuple:
    """(colour index, shape) of an idea in the target picture: the colour its family (AbU and its knobs, exemplar
    unlearning, the gradient family, a feature baseline), the shape how it is read (alone, minus the peers, blended)."""
    bare = name.split(") + ")[0].removeprefix("z(").removesuffix(" - peers")
    colour = 4 if bare in BASELINES else 2 if bare.startswith("exemplar") else 3 if bare.startswith(
        ("gradient", "TRAK")) else 1
    return colour, "blend" if name.startswith("z(") else "peers" if name.endswith(" - peers") else "alone"


def marker(d, box, colour, shape: str) -> None:
    """An idea's mark in `box`: a dot alone, a ring minus the peers, a square blended (`family`'s shapes)."""
    if shape == "alone":
        d.ellipse(box, fill=colour)
    elif shape == "peers":
        d.ellipse(box, outline=colour, width=2)
    else:
        d.rectangle(box, outline=colour, width=2)


def plot_target(rows: dict, path: Path) -> None:
    """Every idea's image-specific LOO (x) against its image-specific LDS (y) on the model kind that has both truths
    (mean over queries), the ceilings dashed and the issue's target region shaded: at least half of each ceiling
    and above every feature baseline on both. An idea whose whole-query LOO falls more than 0.05 below the paper's
    AbU (the target's third condition) is drawn pale. The ideas nearest the region are named."""
    kinds = [k for k in dict.fromkeys(k for k, _, _ in rows)
             if all(rows.get((k, "*ceiling*", a)) for a in TARGET_AXES)]
    if not kinds:
        return
    kind = kinds[0]
    mean = {m: tuple(float(np.mean(rows[(kind, m, a)])) for a in TARGET_AXES)
            for (k, m, metric) in rows if k == kind and metric == TARGET_AXES[0]
            and rows.get((kind, m, TARGET_AXES[1]))}
    ceiling = mean.pop("*ceiling*")
    whole = {m: float(np.mean(rows[(kind, m, "LOO")])) for m in mean if rows.get((kind, m, "LOO"))}
    keeps = lambda m: whole.get(m, -1) >= whole["AbU (the paper)"] - 0.05  # noqa: E731
    pale = lambda c: tuple(int(v + 0.6 * (255 - v)) for v in c)  # noqa: E731
    best_feature = [max(v[i] for m, v in mean.items() if m in BASELINES and m != "random") for i in range(2)]
    corner = [max(c / 2, b) for c, b in zip(ceiling, best_feature)]
    lo, hi = -0.15, max(0.35, max(ceiling) + 0.05)
    size, margin = 560, 60
    shortfall = {m: max(corner[0] - x, 0) + max(corner[1] - y, 0) for m, (x, y) in mean.items()}
    named = [m for m in mean if m in BASELINES and m != "random"] + ["AbU (the paper)"] + \
        [m for m in sorted(shortfall, key=shortfall.get) if m not in BASELINES][:6]
    named = list(dict.fromkeys(n for n in named if n in mean))
    label = lambda m: f"{m} ({mean[m][0]:+.2f}, {mean[m][1]:+.2f}; whole LOO {whole.get(m, float('nan')):+.2f})"  # noqa
    _, probe, font = canvas(1, 1)
    img, d, font = canvas(size + margin + 20 + max(int(probe.textlength(label(m), font=font)) for m in named),
                          size + margin + 38)
    X = lambda v: margin + (v - lo) / (hi - lo) * size  # noqa: E731
    Y = lambda v: 10 + (hi - v) / (hi - lo) * size  # noqa: E731
    d.rectangle([X(corner[0]), Y(hi), X(hi), Y(corner[1])], fill=(222, 240, 222))
    d.rectangle([X(lo), Y(hi), X(hi), Y(lo)], outline="black")
    for v in np.arange(-0.1, hi + 1e-9, 0.1):
        d.text((X(v) - 10, Y(lo) + 4), f"{v:+.1f}", fill="black", font=font)
        d.text((X(lo) - 34, Y(v) - 7), f"{v:+.1f}", fill="black", font=font)
    for z in range(int(Y(hi)), int(Y(lo)), 6):  # zero and the ceilings
        d.point([(X(0), z)], fill=(150, 150, 150))
        d.line([X(ceiling[0]), z, X(ceiling[0]), z + 3], fill=COLOURS[5])
    for z in range(int(X(lo)), int(X(hi)), 6):
        d.point([(z, Y(0))], fill=(150, 150, 150))
        d.line([z, Y(ceiling[1]), z + 3, Y(ceiling[1])], fill=COLOURS[5])
    for m, (x, y) in sorted(mean.items(), key=lambda item: keeps(item[0])):  # the pale ones underneath
        colour, shape = family(m)
        colour = COLOURS[colour] if keeps(m) else pale(COLOURS[colour])
        marker(d, [X(x) - 4, Y(y) - 4, X(x) + 4, Y(y) + 4], colour, shape)
    # the names of the feature baselines, the paper's AbU and the six ideas nearest the region's corner
    for i, m in enumerate(named):
        x, y = mean[m]
        d.line([X(x) + 4, Y(y), size + margin + 6, 20 + 18 * i], fill=(190, 190, 190))
        d.text((size + margin + 10, 13 + 18 * i), label(m), fill="black" if keeps(m) else (120, 120, 120), font=font)
    d.text((X(lo), Y(lo) + 22), f"x: {TARGET_AXES[0]} Spearman;  y: {TARGET_AXES[1]} Spearman;  {kind}; dashed: "
                                "the truth's seed ceiling; green: the target", fill="black", font=font)
    d.text((X(lo), Y(lo) + 38), f"pale: whole-query LOO more than 0.05 below the paper's AbU "
                                f"({whole['AbU (the paper)']:+.2f}), the target's third condition", fill="black",
           font=font)
    legend = [(1, "alone", "AbU and its knobs"), (2, "alone", "exemplar unlearning"), (3, "alone", "gradient family"),
              (4, "alone", "feature baseline"), (0, "peers", "ring: minus the peers"), (0, "blend", "square: blended")]
    for i, (colour, shape, text) in enumerate(legend):
        y = size - 100 + 18 * i
        marker(d, [size + margin + 10, y, size + margin + 20, y + 10], COLOURS[colour], shape)
        d.text((size + margin + 26, y - 2), text, fill="black", font=font)
    atomic_write(path, lambda fh: img.save(fh, format="PNG"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    p.add_argument("--knobs", nargs="*", default=[], choices=list(KNOBS),
                   help="AbU knobs to run on the table's queries first (finished queries are reused); a knob "
                        "run before is scored whether named or not")
    p.add_argument("--overwrite", action="store_true", help="measure the exemplar unlearning and gradients again")
    p.add_argument("--table_dir", default=str(REPO / "benchmarks" / "results" / "mini_abc"))
    args = p.parse_args()
    root = REPO / "results" / "mini_abc" / f"image_{args.split}"
    if not (root / "abu").is_dir():
        sys.exit(f"error: {root}/abu not found: run `python -m benchmarks.counterfactual --split {args.split}` first")
    knob_runs(root, args.knobs)
    rows, costs = evaluate(args.split, root, args.schedules, args.overwrite)
    md = markdown(args.split, rows, costs)
    path = Path(args.table_dir) / f"counterfactual_ideas_{args.split}.md"
    atomic_write(path, lambda f: f.write(md.encode()))
    plot_target(rows, path.with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    main()
