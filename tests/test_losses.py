import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.batch_clock import ENV, steady_rate
from utils.data import ExemplarCandidates, LaionCandidates
from utils.errors import InputError
from utils.loss_cache import LossSettings, check_settings
from utils.losses import collect_losses
from utils.models import load_base_model
from utils.customization import apply_customization
from utils.weights import PristineWeights


@pytest.fixture
def laion(tiny_abc):
    return LaionCandidates(tiny_abc["dataroot"], subset_size=12)


def test_laion_rows_follow_the_documented_order(tiny_abc):
    latents = np.load(f"{tiny_abc['dataroot']}/laion_latents.npy")
    texts = np.load(f"{tiny_abc['dataroot']}/laion_text_embeddings.npy")
    sub = LaionCandidates(tiny_abc["dataroot"], subset_size=5)  # N = 12 images, S = 5
    assert len(sub) == 10
    lat, txt = sub.batch(3, 8)  # rows 3, 4 (unflipped), 5, 6, 7 (flipped images 0, 1, 2)
    np.testing.assert_array_equal(lat.numpy(), latents[[3, 4, 12, 13, 14]])
    np.testing.assert_array_equal(txt.numpy(), texts[[3, 4, 0, 1, 2]])
    with pytest.raises(InputError, match="laion_subset_size 13"):
        LaionCandidates(tiny_abc["dataroot"], subset_size=13)


def test_losses_repeat_bit_for_bit(base_model, laion):
    args = dict(batch_size=12, time_samples=4, seed=0)
    a = collect_losses(base_model.unet, base_model.scheduler, laion, **args)
    b = collect_losses(base_model.unet, base_model.scheduler, laion, **args)
    assert a.shape == (24,) and a.dtype == np.float32
    assert np.array_equal(a, b)
    for other in (dict(args, batch_size=8), dict(args, time_samples=2), dict(args, seed=1)):
        c = collect_losses(base_model.unet, base_model.scheduler, laion, **other)
        assert not np.allclose(a, c)  # noise depends on B, T and the seed


def test_each_loss_batch_records_its_time_and_forwards_when_asked(base_model, laion, tmp_path, monkeypatch):
    times = tmp_path / "batches.txt"
    collect_losses(base_model.unet, base_model.scheduler, laion, batch_size=12, time_samples=4)
    assert not times.exists()  # off unless ABU_BATCH_TIMES is set
    monkeypatch.setenv(ENV, str(times))
    collect_losses(base_model.unet, base_model.scheduler, laion, batch_size=12, time_samples=4)
    rows = [line.split() for line in times.read_text().splitlines()]
    assert [int(r[2]) for r in rows] == [12] * 8  # 24 rows x T = 4 in batches of 12 forwards
    ends, durations = [float(r[0]) for r in rows], [float(r[1]) for r in rows]
    assert ends == sorted(ends) and all(d > 0 for d in durations)
    assert np.allclose(np.diff(ends), durations[1:], atol=1e-5)  # one pass: each batch starts where the last ended
    rate, batches = steady_rate(times, warmup=2)  # batches 2..7 (0-based)
    assert batches == 6 and rate == pytest.approx(6 * 12 / sum(durations[2:]))
    rate, batches = steady_rate(times, warmup=8)  # nothing after the warm-up to time
    assert np.isnan(rate) and batches == 0


def test_loss_matches_the_documented_noise_rule_by_hand(base_model, laion):
    """Candidate 4 sits in batch 1 (3 candidates a batch) at position 1: its noise is rows 4..7 of seed 0 + 1."""
    unet, sched = base_model.unet, base_model.scheduler
    losses = collect_losses(unet, sched, laion, batch_size=12, time_samples=4, seed=0)
    lat, txt = laion.batch(3, 6)
    lat, txt = lat.repeat_interleave(4, 0), txt.repeat_interleave(4, 0)
    t = torch.tensor([0, 250, 500, 750]).repeat(3)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pred = unet(sched.add_noise(lat, noise, t), t, txt).sample
    mine = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))[4:8].mean()
    assert losses[4] == pytest.approx(mine.item(), rel=1e-5)


def test_customized_weights_change_the_losses(base_model, tiny_abc, laion):
    base_loss = collect_losses(base_model.unet, base_model.scheduler, laion, batch_size=12, time_samples=4)
    custom = apply_customization(base_model, PristineWeights(base_model.unet),
                                 f"{tiny_abc['dataroot']}/models/imagenet/n01440764_0000")
    assert len(custom) == 8  # attn2 to_k and to_v of 4 transformer blocks (1 down, 1 mid, 2 up)
    custom_loss = collect_losses(base_model.unet, base_model.scheduler, laion, batch_size=12, time_samples=4)
    assert np.abs(custom_loss - base_loss).max() > 1e-4


def test_exemplar_candidates_share_one_caption():
    c = ExemplarCandidates(torch.randn(6, 4, 8, 8), torch.randn(1, 77, 32))
    lat, txt = c.batch(4, 10)
    assert lat.shape[0] == 2 and txt.shape == (2, 77, 32) and torch.equal(txt[0], txt[1])


def test_settings_mismatch_names_each_value(tmp_path):
    from dataclasses import replace

    s = LossSettings(200, 10, 0, 100, "fp32", False, "cpu", "base0", "custom0", "laion0", "models/a", "<new1> fish",
                     8, 200)
    cached = json.loads(json.dumps({**s.__dict__, "sd_version": "/somewhere/sd"}))
    check_settings(cached, s, tmp_path)  # same settings pass; where the base model lay is not compared
    with pytest.raises(InputError) as e:
        check_settings(cached, replace(s, batch_size=100, seed=3, compiled=True), tmp_path)
    assert "batch_size: cache has 200, this run uses 100" in str(e.value)
    assert "seed: cache has 0, this run uses 3" in str(e.value)
    assert "compiled: cache has False, this run uses True" in str(e.value)
    with pytest.raises(InputError, match="multiple of the number of time samples"):
        collect_losses(None, type("S", (), {"config": type("C", (), {"num_train_timesteps": 1000})})(), [],
                       batch_size=15, time_samples=4)


def v_prediction_model(tiny_abc, tmp_path, kind: str = "v_prediction") -> str:
    """The tiny base model with its scheduler set to predict `kind` (as SD 2.x's does v_prediction)."""
    import json
    import shutil

    folder = tmp_path / "sd_v"
    shutil.copytree(tiny_abc["sd_version"], folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": kind}))
    return str(folder)


def test_losses_use_the_schedulers_prediction_type_as_diffusers_trainers_do(tiny_abc, tmp_path):
    """A v-prediction base model is scored (stage 1 and 2's loss loop, unlearning's loss, the Fisher, the gradient
    baseline all go through utils.losses) against the velocity, written here as diffusers' train_text_to_image.py
    computes its target; an epsilon model against the noise."""
    import torch.nn.functional as F

    from utils.unlearning import query_diffusion_loss
    from utils.losses import per_row_loss

    for kind in ("epsilon", "v_prediction", "sample"):
        base = load_base_model(v_prediction_model(tiny_abc, tmp_path / kind, kind), "cpu")
        assert base.scheduler.config.prediction_type == kind
        laion = LaionCandidates(tiny_abc["dataroot"], 12)
        got = collect_losses(base.unet, base.scheduler, laion, batch_size=20, time_samples=5, seed=3)
        # by hand: batch 0 holds candidates 0..3, each at the 5 grid timesteps, noise seeded 3 + 0
        latents, text = laion.batch(0, 4)
        latents, text = latents.repeat_interleave(5, 0), text.repeat_interleave(5, 0)
        t = torch.arange(0, 1000, 200).repeat(4)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
        noisy = base.scheduler.add_noise(latents, noise, t)
        with torch.no_grad():
            pred = base.unet(noisy, t, text).sample
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = base.scheduler.get_velocity(latents, noise, t)
        else:
            target = latents
        by_hand = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).view(4, 5).mean(1)
        np.testing.assert_allclose(got[:4], by_hand.numpy(), rtol=1e-5)
        with torch.no_grad():
            q = query_diffusion_loss(base.unet, base.scheduler, latents[:4], text[:4], torch.Generator().manual_seed(1))
            g = torch.Generator().manual_seed(1)
            n = torch.randn(latents[:4].shape, generator=g)
            ts = torch.randperm(1000, generator=g)[:4]
            rows = per_row_loss(base.unet, base.scheduler, latents[:4], n, ts, text[:4])
        assert float(q) == pytest.approx(float(rows.mean()), rel=1e-5)
    v, eps = (load_base_model(v_prediction_model(tiny_abc, tmp_path / f"again_{k}", k), "cpu") for k in
              ("v_prediction", "epsilon"))
    assert not np.allclose(collect_losses(v.unet, v.scheduler, laion, 20, 5, 3),
                           collect_losses(eps.unet, eps.scheduler, laion, 20, 5, 3))


def test_a_scheduler_predicting_something_else_is_refused(tiny_abc, tmp_path):
    from utils.errors import InputError

    with pytest.raises(InputError, match="prediction_type is 'flow'"):
        load_base_model(v_prediction_model(tiny_abc, tmp_path, "flow"), "cpu")
