import pytest
import torch

import compute_fisher
import utils.fisher
from utils.data import LaionCandidates
from utils.fisher import estimate_fisher, load_fisher, per_sample_losses, sample_batch
from utils.errors import InputError
from utils.weights import select_parameter_names


@pytest.fixture
def laion(tiny_abc):
    return LaionCandidates(tiny_abc["dataroot"], subset_size=12)


def test_batched_per_sample_gradients_equal_one_sample_at_a_time(base_model, laion):
    names = select_parameter_names(base_model.unet, "cross-attn")  # Linear weights and to_out biases
    fast = estimate_fisher(base_model, laion, names, num_samples=6, batch_size=3, seed=0, device="cpu")
    slow = estimate_fisher(base_model, laion, names, num_samples=6, batch_size=3, seed=0, device="cpu",
                           per_sample_hooks=False)
    assert set(fast) == set(names)
    for n in names:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-12)
        assert (fast[n] > 0).all()


def test_fisher_is_the_mean_squared_gradient(base_model, laion):
    names = select_parameter_names(base_model.unet, "cross-attn-kv")[:1]
    fisher = estimate_fisher(base_model, laion, names, num_samples=2, batch_size=2, seed=0, device="cpu")
    order = __import__("numpy").random.default_rng(0).permutation(len(laion))
    p = dict(base_model.unet.named_parameters())[names[0]]
    total = torch.zeros_like(p, dtype=torch.float64)
    for i in range(2):
        inputs = sample_batch(laion, order, i, i + 1, 0, 1000)
        p.requires_grad_(True)
        (g,) = torch.autograd.grad(per_sample_losses(base_model, *inputs, "cpu").sum(), p)
        p.requires_grad_(False)
        total += g.double() ** 2
    torch.testing.assert_close(fisher[names[0]], (total / 2).float(), rtol=1e-4, atol=1e-12)


def test_resumed_run_equals_uninterrupted_run(tiny_copy, tmp_path):
    common = ["--dataroot", tiny_copy["dataroot"], "--sd_version", tiny_copy["sd_version"],
              "--laion_subset_size", "12", "--num_samples", "8", "--batch_size", "2", "--device", "cpu"]
    whole = tmp_path / "whole.pt"
    compute_fisher.main(common + ["--output", str(whole)])
    # a run killed after its checkpoint at 4 samples, then resumed
    part = tmp_path / "part.pt"
    saved = {}
    real_save = utils.fisher.save_torch

    def save_then_die(path, obj):
        real_save(path, obj)
        if str(path).endswith(".partial"):
            saved["done"] = obj["done"]
            raise KeyboardInterrupt

    utils.fisher.save_torch = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            compute_fisher.main(common + ["--output", str(part), "--save_every", "4"])
    finally:
        utils.fisher.save_torch = real_save
    assert saved["done"] == 4 and not part.exists()
    compute_fisher.main(common + ["--output", str(part), "--save_every", "4"])
    a, b = torch.load(whole), torch.load(part)
    assert all(torch.allclose(a[n], b[n], rtol=1e-6, atol=0) for n in a)
    assert not (tmp_path / "part.pt.partial").exists()


def test_load_fisher_checks_every_selected_parameter(base_model, tmp_path, tiny_abc):
    names = select_parameter_names(base_model.unet, "cross-attn-kv")
    params = {n: p for n, p in base_model.unet.named_parameters() if n in names}
    fisher = load_fisher(f"{tiny_abc['dataroot']}/sd_fisher.pt", params)
    assert set(fisher) == set(names) and all(f.dtype == torch.float64 for f in fisher.values())
    table = {f"unet.{n}": torch.ones(p.shape) for n, p in params.items()}  # 'unet.' prefix accepted
    torch.save(table, tmp_path / "f.pt")
    assert set(load_fisher(tmp_path / "f.pt", params)) == set(names)
    table[f"unet.{names[0]}"][0, 0] = 0
    torch.save(table, tmp_path / "f.pt")
    with pytest.raises(InputError, match="1 zero or negative"):
        load_fisher(tmp_path / "f.pt", params)
    assert load_fisher(tmp_path / "f.pt", params, floor=1e-8)[names[0]][0, 0] == 1e-8
    del table[f"unet.{names[1]}"]
    torch.save(table, tmp_path / "f.pt")
    with pytest.raises(InputError, match="no Fisher entry for 1 of the 8"):
        load_fisher(tmp_path / "f.pt", params)
    with pytest.raises(InputError, match="Fisher file not found"):
        load_fisher(tmp_path / "none.pt", params)
