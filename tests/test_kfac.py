"""The Kronecker-factored Fisher (utils/kfac.py): its estimate, its solve, the unlearning step that uses it and
compute_fisher.py --kind ekfac's file, checkpoint and refusals."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import compute_fisher
import utils.fisher
from utils.data import LaionCandidates
from utils.errors import InputError
from utils.fisher import estimate_fisher, per_sample_losses, sample_batch
from utils.kfac import (KFAC_MIN_SCALE, KroneckerEigenFisher, KroneckerFactorHooks, check_kfac_scale, estimate_ekfac,
                        load_kronecker_fisher)
from utils.unlearning import fisher_preconditioned_step
from utils.weights import select_parameter_names


@pytest.fixture
def laion(tiny_abc):
    return LaionCandidates(tiny_abc["dataroot"], subset_size=12)


def random_orthogonal(n, generator):
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]


def test_ekfac_eigenvalues_are_the_second_moment_of_rotated_gradients(base_model, laion):
    names = select_parameter_names(base_model.unet, "cross-attn-kv")[:2]
    ekfac = estimate_ekfac(base_model, laion, names, num_samples=4, batch_size=2, seed=0, device="cpu")
    diagonal = estimate_fisher(base_model, laion, names, num_samples=4, batch_size=2, seed=0, device="cpu")
    params = dict(base_model.unet.named_parameters())
    order = np.random.default_rng(0).permutation(len(laion))
    for n in names:
        q_in, q_out = ekfac[f"{n}.eigvecs_in"], ekfac[f"{n}.eigvecs_out"]
        torch.testing.assert_close(q_in.T @ q_in, torch.eye(len(q_in), dtype=torch.float64))
        assert (ekfac[f"{n}.eigvals_in"] >= -1e-12).all() and (ekfac[f"{n}.eigvals_out"] >= -1e-12).all()
        # Lambda, one sample's autograd gradient at a time, rotated into the factors' eigenbasis
        total = torch.zeros_like(params[n], dtype=torch.float64)
        for i in range(4):
            params[n].requires_grad_(True)
            (g,) = torch.autograd.grad(per_sample_losses(base_model, *sample_batch(laion, order, i, i + 1, 0, 1000),
                                                         "cpu").sum(), params[n])
            params[n].requires_grad_(False)
            total += (q_out.T @ g.double() @ q_in) ** 2
        torch.testing.assert_close(ekfac[f"{n}.eigvals"], total / 4, rtol=1e-4, atol=1e-6 * float(total.max() / 4))
        # a rotation keeps the squared norm: the same total as the diagonal Fisher of the same samples
        assert float(ekfac[f"{n}.eigvals"].sum()) == pytest.approx(float(diagonal[n].double().sum()), rel=1e-5)


def factors_of(x, grad_out, approx):
    """(A, G) that KroneckerFactorHooks reads from a Linear(4, 3) on input x [n, tokens, 4] whose output gradient is
    grad_out [n, tokens, 3]."""
    layer = torch.nn.Sequential(torch.nn.Linear(4, 3))
    hooks = KroneckerFactorHooks(layer, ["0.weight"], approx)
    (layer(x) * grad_out).sum().backward()
    hooks.remove()
    return hooks.factors["0.weight"]


def test_expand_and_reduce_factors_by_hand():
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 3, generator=gen)
    a, c = factors_of(x, g, "expand")  # every token one more sample: A / T, G summed
    torch.testing.assert_close(a, torch.einsum("nti,ntj->ij", x.double(), x.double()) / 5)
    torch.testing.assert_close(c, torch.einsum("nto,ntp->op", g.double(), g.double()))
    a, c = factors_of(x, g, "reduce")  # one vector per sample: the token mean input, the summed output gradient
    mean, total = x.double().mean(1), g.double().sum(1)
    torch.testing.assert_close(a, mean.T @ mean)
    torch.testing.assert_close(c, total.T @ total)
    # one sample whose tokens share one input: DW = gsum x^T, so reduce's G (x) A is its exact Fisher and expand's
    # is not (it drops the tokens' cross terms)
    x_one = torch.randn(1, 1, 4, generator=gen).expand(1, 5, 4)
    dw = g[:1].double().sum(1).T @ x_one[:, 0].double()
    exact = torch.outer(dw.flatten(), dw.flatten())
    a, c = factors_of(x_one, g[:1], "reduce")
    torch.testing.assert_close(torch.kron(c, a), exact)
    a, c = factors_of(x_one, g[:1], "expand")
    assert not torch.allclose(torch.kron(c, a), exact)


def test_solve_inverts_the_kronecker_fisher():
    gen = torch.Generator().manual_seed(0)
    out_dim, in_dim = 3, 4
    q_out, q_in = random_orthogonal(out_dim, gen), random_orthogonal(in_dim, gen)
    eigvals = torch.rand(out_dim, in_dim, generator=gen, dtype=torch.float64) + 0.1
    grad = torch.randn(out_dim, in_dim, generator=gen, dtype=torch.float64)
    # row-major vec: vec(Q_G^T W Q_A) = kron(Q_G^T, Q_A^T) vec(W), so F = K^T diag(vec Lambda) K
    k = torch.kron(q_out.T, q_in.T)
    fisher = k.T @ torch.diag(eigvals.flatten()) @ k
    expected = torch.linalg.solve(fisher, grad.flatten()).reshape(out_dim, in_dim)
    torch.testing.assert_close(KroneckerEigenFisher(q_in, q_out, eigvals).solve(grad), expected)
    # K-FAC's eigenvalues c_i a_j: F is kron(G, A) itself
    a, c = torch.rand(in_dim, generator=gen, dtype=torch.float64) + 0.1, torch.rand(out_dim, generator=gen,
                                                                                     dtype=torch.float64) + 0.1
    kron = torch.kron(q_out @ torch.diag(c) @ q_out.T, q_in @ torch.diag(a) @ q_in.T)
    torch.testing.assert_close(KroneckerEigenFisher(q_in, q_out, torch.outer(c, a)).solve(grad),
                               torch.linalg.solve(kron, grad.flatten()).reshape(out_dim, in_dim))


def test_the_identity_basis_gives_the_diagonal_step():
    gen = torch.Generator().manual_seed(1)
    diagonal = torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.5
    steps = []
    for fisher in (diagonal, KroneckerEigenFisher(torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64),
                                                  diagonal)):
        p = torch.nn.Parameter(torch.zeros(3, 4))
        p.grad = torch.arange(12.0).reshape(3, 4)
        fisher_preconditioned_step({"w": p}, {"w": fisher}, lr=0.1, dataset_size=10, grad_accum_steps=2)
        steps.append(p.detach().clone())
    torch.testing.assert_close(steps[0], steps[1])
    assert float(steps[0][1, 1]) == pytest.approx(0.1 * 5 / (float(diagonal[1, 1]) * 10) / 2, rel=1e-6)


def test_compute_fisher_ekfac_resumes_and_its_file_loads(tiny_copy, tmp_path, base_model):
    common = ["--dataroot", tiny_copy["dataroot"], "--sd_version", tiny_copy["sd_version"], "--kind", "ekfac",
              "--laion_subset_size", "12", "--num_samples", "8", "--batch_size", "2", "--device", "cpu"]
    whole = tmp_path / "whole.safetensors"
    compute_fisher.main(common + ["--output", str(whole)])
    assert (tmp_path / "whole.json").is_file()
    # killed at its checkpoints, in the factors' pass and in the eigenvalues' pass, then resumed
    part, real_save, passes = tmp_path / "part.safetensors", utils.fisher.save_torch, []

    def save_then_die(path, obj):
        real_save(path, obj)
        if str(path).endswith(".partial") and obj["pass"] not in passes:
            passes.append(obj["pass"])
            raise KeyboardInterrupt

    utils.fisher.save_torch = save_then_die
    try:
        for _ in range(2):
            with pytest.raises(KeyboardInterrupt):
                compute_fisher.main(common + ["--output", str(part), "--save_every", "4"])
        compute_fisher.main(common + ["--output", str(part), "--save_every", "4"])
    finally:
        utils.fisher.save_torch = real_save
    assert passes == [1, 2] and not (tmp_path / "part.safetensors.partial").exists()
    from safetensors.torch import load_file
    a, b = load_file(whole), load_file(part)
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-15) for k in a)

    names = select_parameter_names(base_model.unet, "cross-attn-kv")
    params = {n: p for n, p in base_model.unet.named_parameters() if n in names}
    ekfac = load_kronecker_fisher(whole, params, "ekfac", floor=1e-30)
    kfac = load_kronecker_fisher(whole, params, "kfac", floor=1e-30)
    n = names[0]
    products = torch.outer(a[f"{n}.eigvals_out"], a[f"{n}.eigvals_in"]).clamp(min=1e-30)
    torch.testing.assert_close(kfac[n].eigvals, products)
    torch.testing.assert_close(ekfac[n].eigvals, a[f"{n}.eigvals"].clamp(min=1e-30))
    with pytest.raises(InputError, match="factors nn.Linear weights only"):
        load_kronecker_fisher(whole, dict(base_model.unet.named_parameters()), "ekfac")
    with pytest.raises(InputError, match="EK-FAC file not found"):
        load_kronecker_fisher(tmp_path / "none.safetensors", params)
    torch.save({n: torch.ones(p.shape) for n, p in params.items()}, tmp_path / "diagonal.pt")
    with pytest.raises(InputError, match="holds a diagonal Fisher"):
        load_kronecker_fisher(tmp_path / "diagonal.pt", params)
    from utils.io import save_safetensors
    flipped = dict(a)  # two negative factor eigenvalues: their product is positive, the factors are not
    flipped[f"{n}.eigvals_in"] = a[f"{n}.eigvals_in"].abs() * torch.where(torch.arange(len(a[f"{n}.eigvals_in"])) == 0,
                                                                           -1.0, 1.0).double()
    flipped[f"{n}.eigvals_out"] = a[f"{n}.eigvals_out"].abs() * torch.where(
        torch.arange(len(a[f"{n}.eigvals_out"])) == 0, -1.0, 1.0).double()
    save_safetensors(tmp_path / "flipped.safetensors", flipped)
    with pytest.raises(InputError, match="K-FAC factor eigvals_out of .* 1 zero or negative"):
        load_kronecker_fisher(tmp_path / "flipped.safetensors", params, "kfac")
    with pytest.raises(InputError, match="not nn.Linear weights"):  # to_out's bias is in 'cross-attn'
        compute_fisher.main(common + ["--output", str(tmp_path / "bias.safetensors"),
                                      "--weight_selection", "cross-attn"])
    # K-FAC-reduce: its own default file and record, other bases, the same total (a rotation of the same gradients)
    compute_fisher.main(common + ["--kfac_approx", "reduce"])
    reduce = load_file(Path(tiny_copy["dataroot"]) / "sd_ekfac_reduce.safetensors")
    record = json.loads((Path(tiny_copy["dataroot"]) / "sd_ekfac_reduce.json").read_text())
    assert record["kfac_approx"] == "reduce" and json.loads((tmp_path / "whole.json").read_text())["kfac_approx"] \
        == "expand"
    assert not torch.allclose(reduce[f"{n}.eigvecs_in"].abs(), a[f"{n}.eigvecs_in"].abs(), atol=1e-3)
    assert float(reduce[f"{n}.eigvals"].sum()) == pytest.approx(float(a[f"{n}.eigvals"].sum()), rel=1e-6)
    # the keys' token-summed gradient vanishes (softmax ignores a shift of all logits): reduce's G of every to_k is
    # zero up to rounding, so its K-FAC eigenvalues are refused, and EK-FAC's refit in its bases loads
    path = Path(tiny_copy["dataroot"]) / "sd_ekfac_reduce.safetensors"
    keys = [k for k in names if k.endswith("to_k.weight")]
    assert all(float(reduce[f"{k}.eigvals_out"].sum()) < 1e-9 * float(a[f"{k}.eigvals_out"].sum()) for k in keys)
    with pytest.raises(InputError, match=r"to_k\.weight sum to .* zero up to rounding"):
        load_kronecker_fisher(path, params, "kfac", floor=1e-30)
    load_kronecker_fisher(path, params, "ekfac", floor=1e-30)
    with pytest.raises(InputError, match="holds a Fisher of kind 'ekfac' and kfac_approx 'expand' .* name another"):
        compute_fisher.main(common[:4] + ["--kind", "diagonal", "--output", str(whole)])  # not replaced unasked
    with pytest.raises(InputError, match="kfac_approx 'expand'"):
        compute_fisher.main(common + ["--kfac_approx", "reduce", "--output", str(whole)])
    legacy = {k: v for k, v in json.loads((tmp_path / "whole.json").read_text()).items() if k != "kfac_approx"}
    (tmp_path / "whole.json").write_text(json.dumps(legacy))  # written before --kfac_approx: expand's
    with pytest.raises(InputError, match="kfac_approx 'expand'"):
        compute_fisher.main(common + ["--kfac_approx", "reduce", "--output", str(whole)])
    assert load_file(whole).keys() == a.keys()
    with pytest.raises(InputError, match="--kind diagonal has none"):
        compute_fisher.main(common[:4] + ["--kind", "diagonal", "--kfac_approx", "reduce"])


def test_kfac_eigenvalues_far_below_the_gradients_second_moment_are_refused():
    moment = torch.full((2, 3), 1.0, dtype=torch.float64)  # sums to 6
    check_kfac_scale(torch.full((2, 3), 2 * KFAC_MIN_SCALE, dtype=torch.float64), moment, "f", "w")  # 2e-6: kept
    with pytest.raises(InputError, match="sum to 5.0e-07 of the gradients' second moment"):
        check_kfac_scale(torch.full((2, 3), KFAC_MIN_SCALE / 2, dtype=torch.float64), moment, "f", "w")
    with pytest.raises(InputError, match="sum to nan"):
        check_kfac_scale(torch.full((2, 3), float("nan"), dtype=torch.float64), moment, "f", "w")
    with pytest.raises(InputError, match="sums to 0.0: no sample moved it"):
        check_kfac_scale(moment, torch.zeros(2, 3, dtype=torch.float64), "f", "w")
