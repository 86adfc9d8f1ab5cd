"""The loss cache records what changes the numbers, not where the files lie (utils/loss_cache.py)."""
import json
import shutil

import numpy as np
import pytest
import torch

import compute_influence
import compute_training_loss
from utils.errors import InputError
from utils.models import load_base_model
from helpers import STAGE1, stage2_flags

STAGE2 = stage2_flags(steps=2, accum=1, batch=2)


def args(sd_version, bench, results):
    return ["--sd_version", str(sd_version), "--dataroot", str(bench["dataroot"]), "--task_json", bench["task_json"],
            "--result_dir", str(results)]


@pytest.fixture
def stage1(tiny_copy, tmp_path):
    """Stage 1 on a private copy of the tiny benchmark, base model given by its absolute path."""
    results = tmp_path / "results"
    compute_training_loss.main(args(tiny_copy["sd_version"], tiny_copy, results) + STAGE1)
    return results


def test_a_moved_base_model_and_dataroot_keep_their_caches(tiny_copy, stage1, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "sd"
    shutil.copytree(tiny_copy["sd_version"], moved)
    data = tmp_path / "elsewhere" / "abc"
    shutil.copytree(tiny_copy["dataroot"], data)
    monkeypatch.chdir(tmp_path)  # and given as a relative path this time
    bench = dict(tiny_copy, dataroot="elsewhere/abc")
    compute_training_loss.main(args("elsewhere/sd", bench, stage1) + STAGE1)  # finished caches: checked, kept
    compute_influence.main(args("elsewhere/sd", bench, stage1) + STAGE2)
    assert len(list(stage1.rglob("influence.pkl"))) == 4
    settings = json.loads(next(stage1.rglob("settings.json")).read_text())
    assert settings["sd_version"] == tiny_copy["sd_version"]  # recorded for the reader, not compared


def test_another_base_model_is_refused(tiny_copy, stage1, tmp_path):
    other = tmp_path / "other_sd"
    shutil.copytree(tiny_copy["sd_version"], other)
    base = load_base_model(str(other), "cpu")
    with torch.no_grad():
        next(base.unet.parameters()).mul_(1.01)  # the same architecture, other weights
    base.unet.save_pretrained(other / "unet")
    assert load_base_model(str(other), "cpu").fingerprint != load_base_model(tiny_copy["sd_version"], "cpu").fingerprint
    with pytest.raises(InputError, match="base_model: cache has '[0-9a-f]{16}', this run uses '[0-9a-f]{16}'"):
        compute_influence.main(args(other, tiny_copy, stage1) + STAGE2)
    with pytest.raises(InputError, match="base_model: cache has"):  # stage 1 checks the caches it would skip
        compute_training_loss.main(args(other, tiny_copy, stage1) + STAGE1)


def test_a_retrained_customized_model_and_reencoded_candidates_are_refused(tiny_copy, stage1):
    model = f"{tiny_copy['dataroot']}/models/imagenet/n01440764_0000/<new1>.bin"
    embedding = torch.load(model)
    torch.save({"<new1>": embedding["<new1>"] + 0.01}, model)
    with pytest.raises(InputError, match="customized_model: cache has"):
        compute_influence.main(args(tiny_copy["sd_version"], tiny_copy, stage1) + STAGE2)
    torch.save(embedding, model)
    latents = np.load(f"{tiny_copy['dataroot']}/laion_latents.npy")
    np.save(f"{tiny_copy['dataroot']}/laion_latents.npy", latents[::-1].copy())
    with pytest.raises(InputError, match="laion_arrays: cache has"):
        compute_influence.main(args(tiny_copy["sd_version"], tiny_copy, stage1) + STAGE2)


@pytest.mark.parametrize("key, cached, message", [
    ("compiled", True, "compiled: cache has True, this run uses False"),
    ("kernels", "cuda:NVIDIA H100 80GB HBM3", "kernels: cache has 'cuda:NVIDIA H100 80GB HBM3', this run uses 'cpu'"),
])
def test_losses_of_other_kernels_are_refused(tiny_copy, stage1, key, cached, message):
    """A cache made with --compile, or on another kind of device, differs in the last bits of every loss:
    stage 2 refuses it (the cache here is the CPU one, its record edited as such a run writes it)."""
    for path in stage1.rglob("settings.json"):
        settings = json.loads(path.read_text())
        assert settings[key] == {"compiled": False, "kernels": "cpu"}[key]  # what this run recorded
        path.write_text(json.dumps(dict(settings, **{key: cached})))
    with pytest.raises(InputError, match=message):
        compute_influence.main(args(tiny_copy["sd_version"], tiny_copy, stage1) + STAGE2)
