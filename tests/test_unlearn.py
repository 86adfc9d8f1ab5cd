import pytest
import torch

from utils.unlearning import fisher_preconditioned_step, query_diffusion_loss, unlearn
from utils.weights import select_parameter_names
from utils.weights import PristineWeights


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn2 = torch.nn.ModuleDict({"to_k": torch.nn.Linear(3, 2), "to_q": torch.nn.Linear(3, 2)})
        self.attn1 = torch.nn.ModuleDict({"to_k": torch.nn.Linear(3, 2)})


def test_weight_selection_groups():
    m = Toy()
    assert select_parameter_names(m, "cross-attn-kv") == ["attn2.to_k.weight", "attn2.to_k.bias"]
    assert len(select_parameter_names(m, "cross-attn")) == 4
    assert len(select_parameter_names(m, "attn")) == 6
    assert len(select_parameter_names(m, "all")) == 6
    with pytest.raises(ValueError, match="unknown weight selection"):
        select_parameter_names(m, "kv")


def test_step_is_the_closed_form_in_float64():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    fisher = {"w": torch.rand(4, 3, dtype=torch.float64) + 0.5}
    start = p.detach().clone()
    fisher_preconditioned_step({"w": p}, fisher, lr=0.1, dataset_size=1000, grad_accum_steps=10)
    want = (start.double() + 0.1 * p.grad.double() / (fisher["w"] * 1000) / 10).float()
    assert torch.equal(p.detach(), want)


def test_unlearning_moves_only_selected_weights_and_raises_the_query_loss(base_model):
    unet, sched = base_model.unet, base_model.scheduler
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g).expand(4, -1, -1, -1)
    text = torch.randn(1, 77, 32, generator=g).expand(4, -1, -1)
    names = select_parameter_names(unet, "cross-attn-kv")
    params = {n: p for n, p in unet.named_parameters() if n in names}
    fisher = {n: torch.full(p.shape, 1e-4, dtype=torch.float64) for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}

    def fixed_noise_loss():
        with torch.no_grad():
            return query_diffusion_loss(unet, sched, latents, text, torch.Generator().manual_seed(7)).item()

    loss_before = fixed_noise_loss()
    history = unlearn(unet, sched, latents, text, params, fisher, steps=3, grad_accum_steps=2, lr=0.1,
                      dataset_size=10, generator=torch.Generator().manual_seed(1), progress=False)
    assert len(history) == 3
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names)
    assert fixed_noise_loss() > loss_before + 0.01
    assert all(not p.requires_grad and p.grad is None for p in unet.parameters())


def test_unlearning_is_repeatable_with_a_seed(base_model):
    unet, sched = base_model.unet, base_model.scheduler
    latents, text = torch.ones(2, 4, 8, 8), torch.ones(2, 77, 32)
    names = select_parameter_names(unet, "cross-attn-kv")
    params = {n: p for n, p in unet.named_parameters() if n in names}
    fisher = {n: torch.full(p.shape, 1e-4, dtype=torch.float64) for n, p in params.items()}
    pristine = PristineWeights(unet)
    pristine.protect(names)
    results = []
    for _ in range(2):
        unlearn(unet, sched, latents, text, params, fisher, steps=2, grad_accum_steps=2, lr=0.1,
                dataset_size=1000, generator=torch.Generator().manual_seed(3), progress=False)
        results.append({n: p.detach().clone() for n, p in params.items()})
        pristine.restore()
    assert all(torch.equal(results[0][n], results[1][n]) for n in names)
