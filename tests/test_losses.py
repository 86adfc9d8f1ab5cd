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
