"""The gradient-similarity baseline: per-candidate gradients equal autograd's, and streaming keeps the cache's noise."""
import torch

from utils.baselines import RowSlice, whitened_unit_gradients
from utils.data import LaionCandidates
from utils.losses import noised_batches, per_row_loss
from utils.weights import select_parameter_names

SETTINGS = {"batch_size": 10, "time_samples": 5, "seed": 3}  # 2 candidates (x 5 timesteps) per batch


def test_gradient_rows_equal_autograd_and_chunks_equal_one_pass(base_model, tiny_abc):
    laion = LaionCandidates(tiny_abc["dataroot"], subset_size=12)
    names = select_parameter_names(base_model.unet, "cross-attn-kv")
    scale = torch.rand(sum(p.numel() for n, p in base_model.unet.named_parameters() if n in names),
                       generator=torch.Generator().manual_seed(0)) + 0.5
    full = whitened_unit_gradients(base_model, names, scale, laion, SETTINGS, "all")
    assert full.shape == (24, len(scale))
    torch.testing.assert_close(full.norm(dim=1), torch.ones(24))

    # candidate row 5 is the second candidate of batch 2: its gradient by plain autograd, one candidate alone
    params = dict(base_model.unet.named_parameters())
    n, latents, timesteps, text, noise = list(noised_batches(base_model.scheduler, laion, **SETTINGS))[2]
    rows = slice(5, 10)
    for name in names:
        params[name].requires_grad_(True)
    loss = per_row_loss(base_model.unet, base_model.scheduler, latents[rows], noise[rows], timesteps[rows],
                        text[rows]).mean()
    grads = torch.autograd.grad(loss, [params[name] for name in names])
    for name in names:
        params[name].requires_grad_(False)
    expected = torch.nn.functional.normalize(torch.cat([g.flatten() for g in grads]) * scale, dim=0)
    torch.testing.assert_close(full[5], expected, rtol=1e-4, atol=1e-6)

    # streamed in chunks of 4 rows (2 batches), each chunk seeded where the cache's layout puts it
    chunks = torch.cat([whitened_unit_gradients(base_model, names, scale, RowSlice(laion, s, s + 4), SETTINGS, "chunk",
                                                first_batch=s // 2) for s in range(0, 24, 4)])
    torch.testing.assert_close(chunks, full)
    unseeded = whitened_unit_gradients(base_model, names, scale, RowSlice(laion, 4, 8), SETTINGS, "chunk")
    assert not torch.allclose(unseeded, full[4:8])


def test_a_finished_baseline_of_another_model_is_refused(tiny_copy, tmp_path):
    """The gradient baseline records the fingerprints of what it read; after the model is trained again and stage 1
    redone, its finished results are refused (naming the model and the cache), not skipped."""
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    import compute_training_loss
    from helpers import STAGE1, paths

    repo = Path(__file__).resolve().parent.parent
    results = tmp_path / "results"
    compute_training_loss.main(paths(tiny_copy, results) + STAGE1)
    flags = [sys.executable, str(repo / "compute_baselines.py"), "--method", "gradient", "--sd_version",
             tiny_copy["sd_version"], "--dataroot", tiny_copy["dataroot"], "--task_json", tiny_copy["task_json"],
             "--result_dir", str(results), "--laion_subset_size", "12"]
    assert subprocess.run(flags, capture_output=True, cwd=repo).returncode == 0
    result = next((results / "influence").rglob("influence.pkl"))
    assert set(pickle.loads(result.read_bytes())["provenance"]) == {"base_model", "customized_model", "laion_arrays",
                                                                    "loss_cache", "fisher"}
    assert subprocess.run(flags, capture_output=True, cwd=repo).returncode == 0  # unchanged: skipped
    f = Path(tiny_copy["dataroot"]) / "models" / "imagenet" / "n01440764_0000" / "pytorch_custom_diffusion_weights.pt"
    state = torch.load(f)
    torch.save({k: v * 1.01 for k, v in state.items()}, f)
    compute_training_loss.main(paths(tiny_copy, results) + STAGE1 + ["--overwrite"])
    proc = subprocess.run(flags, capture_output=True, text=True, cwd=repo)
    assert proc.returncode == 2 and "other settings or inputs" in proc.stderr and "customized_model" in proc.stderr


def test_a_finished_baseline_made_with_other_settings_is_refused(tiny_copy, tmp_path):
    """Baselines record their settings (BaselineSettings) and compare them before skipping a finished query, as the
    stages do: another --seed of the random baseline is refused naming it; a setting that cannot change the result
    (the seed of another method, a path) is not."""
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent

    def run(method, *flags):
        return subprocess.run([sys.executable, str(repo / "compute_baselines.py"), "--method", method, "--sd_version",
                               tiny_copy["sd_version"], "--dataroot", tiny_copy["dataroot"], "--task_json",
                               tiny_copy["task_json"], "--result_dir", str(tmp_path / method), "--laion_subset_size",
                               "12", *flags], capture_output=True, text=True, cwd=repo)

    assert run("random", "--seed", "1").returncode == 0
    result = pickle.loads(next((tmp_path / "random").rglob("influence.pkl")).read_bytes())
    assert result["settings"]["seed"] == 1 and result["settings"]["method"] == "random"
    refused = run("random", "--seed", "2")
    assert refused.returncode == 2 and "seed: result has 1, this run uses 2" in refused.stderr
    assert run("random", "--seed", "1", "--fisher_path", "elsewhere.pt").returncode == 0  # a path: not compared
    assert run("pixel", "--seed", "1").returncode == 0
    assert run("pixel", "--seed", "5").returncode == 0  # pixel reads no seed
