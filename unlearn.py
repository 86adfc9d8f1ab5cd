"""Unlearn one synthesized image and save the unlearned model: the paper's own sanity check, as a tool.

    python unlearn.py --task_json tasks/demo_task.json --query synth/imagenet/.../00000.png --out results/unlearned/q0
    python unlearn.py ... --samples 4   # + samples.png: the original and the unlearned model, same seeds

Unlearns the query as compute_influence.py does (the same flags and seeds give stage 2's unlearned weights for it;
the algorithm is utils/unlearning.py), then writes to --out a Custom Diffusion model in the form diffusers' own
trainer writes (`pytorch_custom_diffusion_weights.bin` + the model's `<new1>.bin`), which diffusers
(`pipe.unet.load_attn_procs(out, weight_name=..., _pipeline=pipe)`: without `_pipeline`, diffusers 0.42 installs
nothing, huggingface/diffusers#9320; `pipe.load_textual_inversion(out, weight_name="<new1>.bin")`) and this repo's
scripts load, and `unlearned.json` (the query,
its loss before and after unlearning under stage 2's fixed noise, the steps taken, the settings). With --samples K,
samples.png: the query's prompt sampled at K seeds by the original model and by the unlearned one, then another
prompt of the model (another query's in the task file, else its train_prompt) likewise: after unlearning the model
should no longer make the query while it keeps the rest. A finished --out is skipped unless --overwrite.
"""
import json
from pathlib import Path

import numpy as np

from utils.cli import check_dataroot, run
from utils.customization import apply_customization, check_customized_model, customization_form, save_custom_diffusion
from utils.data import LaionCandidates
from utils.errors import InputError
from utils.io import check_writable, save_json
from utils.models import load_base_model
from utils.precision import loss_unet
from utils.settings import UnlearnToolSettings, parse_settings, record
from utils.tasks import load_tasks, normalized_path
from utils.transforms import load_rgb
from utils.unlearning import QueryUnlearner
from utils.visualize import save_sample_grid
from utils.weights import PristineWeights, restored

RECORD = "unlearned.json"  # written last: marks a finished --out


def main(argv=None):
    settings = parse_settings(UnlearnToolSettings, __doc__, argv)
    common, tool = settings.common, settings.tool
    dataroot, out = check_dataroot(common.dataroot), Path(tool.out)
    tasks = load_tasks(common.task_json)
    task = next((t for t in tasks if t.synth_image_path == normalized_path(tool.query, "--query")), None)
    if task is None:
        raise InputError(f"--query {tool.query} is not a query of {common.task_json} (it has e.g. "
                         f"{tasks[0].synth_image_path}); give its synth_image_path")
    if (out / RECORD).is_file() and not settings.execution.overwrite:
        print(f"{out / RECORD} exists: {task.synth_image_path} was unlearned there; --overwrite to redo it")
        return
    check_writable(out)
    load_rgb(dataroot / task.synth_image_path)
    if settings.unlearning.weight_selection != "cross-attn-kv" or \
            customization_form(dataroot / task.model_path)[0] != "custom-diffusion":
        raise InputError(f"unlearn.py saves a Custom Diffusion model: it needs one ({task.model_path} is "
                         f"{customization_form(dataroot / task.model_path)[0]}) and --weight_selection cross-attn-kv "
                         f"(given {settings.unlearning.weight_selection}); compute_influence.py unlearns the others")

    base = load_base_model(common.sd_version, settings.execution.device)
    other = next((t.prompt for t in tasks if t.model_path == task.model_path and t.prompt != task.prompt),
                 task.train_prompt)
    check_customized_model(dataroot / task.model_path, [task.prompt, task.train_prompt], f"query {task.synth_image_path}",
                           base.tokenizer)
    measurement, pristine = settings.measurement(), PristineWeights(base.unet)
    unet = loss_unet(base.unet, common.compile)
    collect = lambda candidates, desc, **kw: measurement.collect(unet, base.scheduler, candidates, desc, **kw)  # noqa
    laion = LaionCandidates(dataroot, common.laion_subset_size) if settings.stopping.stop_rule == "collateral" else None
    unlearner = QueryUnlearner(settings, base, dataroot, collect, pristine, reference=laion)

    apply_customization(base, pristine, dataroot / task.model_path)
    reference_before = None
    if laion is not None:  # the collateral rule's reference rows before unlearning, as stage 1 measures them
        reference_before = np.full(len(laion), np.nan)
        rows = np.arange(unlearner.reference_rows())
        reference_before[rows] = collect(laion, "reference losses", rows=rows)
    samples = {}
    with restored(unlearner.params):  # the customized model comes back after: its samples are the original's
        unlearned = unlearner.unlearn(task, reference_before)
        saved = save_custom_diffusion(base.unet, dataroot / task.model_path, out)
        if tool.samples:
            samples["unlearned"] = draw_samples(base, settings, [task.prompt, other])
    if tool.samples:
        samples["original"] = draw_samples(base, settings, [task.prompt, other])
        picture(out / "samples.png", dataroot / task.synth_image_path, [task.prompt, other], samples)
    pristine.restore()

    before, after = unlearned["query_loss"]
    save_json(out / RECORD, {"query": task.synth_image_path, "model_path": task.model_path, "prompt": task.prompt,
                             "query_loss": [before, after], "unlearn_steps_taken": len(unlearned["history"]),
                             "stop": unlearned.get("stop"), "files": [p.name for p in saved]
                             + (["samples.png"] if tool.samples else []),
                             "settings": json.loads(json.dumps(record(*settings.result)))})
    print(f"{task.synth_image_path}: query loss {before:.4f} -> {after:.4f} in {len(unlearned['history'])} steps; "
          f"the unlearned model is in {out}" + (f" (samples: {out / 'samples.png'})" if tool.samples else ""))


def draw_samples(base, settings, prompts) -> list:
    """[prompt][seed] images of the model as the base now holds it: DDIM, --sample_steps, --guidance_scale; sample i
    from the noise of a generator seeded with --sample_seed + i."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tool = settings.tool
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=DDIMScheduler.from_config(base.scheduler.config,
                                                                                       clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = base.resolution
    out = []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(tool.sample_seed + i) for i in range(tool.samples)]
        out.append(pipe([prompt] * tool.samples, height=size, width=size, num_inference_steps=tool.sample_steps,
                        guidance_scale=tool.guidance_scale, generator=generators, output_type="pil").images)
    return out


def picture(path: Path, query_path: Path, prompts, samples: dict) -> None:
    """samples.png: per prompt, the original model's samples, then the unlearned model's; the query leads the first."""
    rows, labels = [], []
    for p, prompt in enumerate(prompts):
        for which in ("original", "unlearned"):
            rows.append([load_rgb(query_path) if p == 0 and which == "original" else None] + samples[which][p])
            labels.append(f"{'query' if p == 0 else 'another'} prompt, {which}: {prompt[:48]}")
    save_sample_grid(path, rows, labels)


if __name__ == "__main__":
    run(main)
