"""The fast path: --precision is honoured and recorded, and `accelerate launch` shards without changing outputs."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import compute_influence
import compute_training_loss
from utils.unlearning import unlearn
from utils.data import LaionCandidates
from utils.errors import InputError
from utils.losses import collect_losses
from utils.weights import select_parameter_names
from helpers import STAGE1, paths, stage2_flags

REPO = Path(__file__).resolve().parent.parent
STAGE2 = stage2_flags()


def test_low_precision_losses_are_close_to_fp32_but_not_equal(base_model, tiny_abc):
    laion = LaionCandidates(tiny_abc["dataroot"], subset_size=12)
    run = dict(batch_size=20, time_samples=5, seed=0)
    fp32 = collect_losses(base_model.unet, base_model.scheduler, laion, **run)
    for precision in ("bf16", "fp16"):
        low = collect_losses(base_model.unet, base_model.scheduler, laion, precision=precision, **run)
        assert low.dtype == np.float32 and not np.array_equal(low, fp32)
        np.testing.assert_allclose(low, fp32, rtol=0.05)


def test_fp16_unlearning_moves_the_weights_as_fp32_does(base_model, tiny_abc):
    """The static fp16 loss scale is undone in the step: the update has fp32's size and direction."""
    laion = LaionCandidates(tiny_abc["dataroot"], subset_size=12)
    latents, text = laion.batch(0, 4)
    names = select_parameter_names(base_model.unet, "cross-attn-kv")
    params = {n: p for n, p in base_model.unet.named_parameters() if n in names}
    start = {n: p.detach().clone() for n, p in params.items()}
    fisher = {n: torch.ones_like(p, dtype=torch.float64) for n, p in params.items()}
    deltas = {}
    for precision in ("fp32", "fp16"):
        unlearn(base_model.unet, base_model.scheduler, latents, text, params, fisher, steps=2, grad_accum_steps=2,
                lr=1e-2, dataset_size=1, generator=torch.Generator().manual_seed(0), precision=precision,
                progress=False)
        deltas[precision] = torch.cat([(params[n] - start[n]).flatten() for n in names])
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
    a, b = deltas["fp32"], deltas["fp16"]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert 0.9 < (b.norm() / a.norm()).item() < 1.1


def test_auto_precision_is_bf16_on_cuda_and_fp32_on_the_cpu():
    from utils.precision import resolve_precision

    assert resolve_precision("auto", "cuda") == resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("fp16", "cuda") == "fp16"


def test_precision_is_recorded_and_stage2_refuses_another(tiny_abc, tmp_path):
    compute_training_loss.main(paths(tiny_abc, tmp_path) + STAGE1 + ["--precision", "bf16"])
    settings = next((tmp_path / "orig_loss").rglob("settings.json")).read_text()
    assert '"precision": "bf16"' in settings
    with pytest.raises(InputError, match="precision: cache has 'bf16', this run uses 'fp32'"):
        compute_influence.main(paths(tiny_abc, tmp_path) + STAGE2)
    compute_influence.main(paths(tiny_abc, tmp_path) + STAGE2 + ["--precision", "bf16"])
    result = pickle.loads(next((tmp_path / "influence").rglob("influence.pkl")).read_bytes())
    assert result["settings"]["precision"] == "bf16"


def launch_two_processes(script, args):
    # accelerate's --cpu launcher starts one process (many need MPI); its torchrun launcher (--multi_gpu) starts
    # two here, and with --device cpu each joins a gloo group (PartialState: MULTI_CPU)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(REPO / script)]
    # one thread each, as torchrun sets by default and as the single run below uses: CPU kernels sum in an order
    # that depends on the thread count, and outputs would otherwise differ in the last bits
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + args, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_processes_give_the_single_process_outputs(tiny_abc, tmp_path):
    """`accelerate launch` (2 CPU processes, gloo) splits models and queries; every file equals a plain run's."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compute_training_loss.main(paths(tiny_abc, single) + STAGE1)
        compute_influence.main(paths(tiny_abc, single) + STAGE2)
    finally:
        torch.set_num_threads(threads)
    out1 = launch_two_processes("compute_training_loss.py", paths(tiny_abc, multi) + STAGE1)
    assert "process 0 of 2 takes 1" in out1 and "process 1 of 2 takes 1" in out1
    out2 = launch_two_processes("compute_influence.py", paths(tiny_abc, multi) + STAGE2)
    assert "process 0 of 2 takes 2" in out2 and "process 1 of 2 takes 2" in out2
    files = sorted(p.relative_to(single) for p in single.rglob("*") if p.suffix in (".npy", ".pkl"))
    assert len(files) == 2 * 5 + 4 * 3  # per model: 2 losses, 2 per timestep, latents; per query: 2 losses, pkl
    for rel in files:
        if rel.suffix == ".npy":
            assert np.array_equal(np.load(single / rel), np.load(multi / rel)), rel
        else:
            a, b = (pickle.loads((root / rel).read_bytes()) for root in (single, multi))
            assert np.array_equal(a["influence"], b["influence"]) and np.array_equal(a["rank"], b["rank"]), rel
    # a process that died mid-query left no influence.pkl for it: a rerun does exactly that query
    lost = next(multi.rglob("influence.pkl"))
    kept = pickle.loads(lost.read_bytes())
    lost.unlink()
    out3 = launch_two_processes("compute_influence.py", paths(tiny_abc, multi) + STAGE2)
    assert "3 done, 1 to do" in out3
    assert np.array_equal(pickle.loads(lost.read_bytes())["influence"], kept["influence"])
