"""Which UNet parameters a method updates, and the base values that bring the UNet back after it did."""
from contextlib import contextmanager
from typing import Dict, List

import torch


# A parameter is selected when, for every group, one of the group's substrings occurs in its name
# (docs/method.md, section 4). Custom Diffusion trains exactly the cross-attention K/V ("cross-attn-kv").
WEIGHT_SELECTIONS: Dict[str, List[List[str]]] = {
    "cross-attn-kv": [["attn2"], ["to_k", "to_v"]],
    "cross-attn": [["attn2"]],
    "attn": [["attn"]],
    "all": [],
}


def select_parameter_names(model: torch.nn.Module, weight_selection: str) -> List[str]:
    """Names of the parameters of `model` that `weight_selection` picks, in the model's order."""
    if weight_selection not in WEIGHT_SELECTIONS:
        raise ValueError(f"unknown weight selection {weight_selection!r}; choose from {', '.join(WEIGHT_SELECTIONS)}")
    groups = WEIGHT_SELECTIONS[weight_selection]
    names = [n for n, _ in model.named_parameters() if all(any(s in n for s in g) for g in groups)]
    if not names:
        raise ValueError(f"weight selection {weight_selection!r} matches no parameter of the model")
    return names


class PristineWeights:
    """Base values of every parameter of a module that a customization or an unlearning run changes.

    Invariant: a parameter not saved here still holds its base value, so `protect` before a change
    saves the base value, and `restore` brings the module back to the base model (kept on the CPU).
    Parameters are looked up by name at each call, since loading a token embedding replaces the table; a
    table that has grown since (tokens added by a later model) gets its first rows back.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.saved: Dict[str, torch.Tensor] = {}

    @property
    def params(self) -> Dict[str, torch.nn.Parameter]:
        return dict(self.module.named_parameters())

    def protect(self, names) -> None:
        params = None
        for n in names:
            if n not in self.saved:
                params = params if params is not None else self.params
                self.saved[n] = params[n].detach().to("cpu", copy=True)

    @torch.no_grad()
    def restore(self) -> None:
        if not self.saved:
            return
        params = self.params
        for n, value in self.saved.items():
            target = params[n] if params[n].shape == value.shape else params[n][:len(value)]
            target.copy_(value)


def copy_weights(params: Dict[str, torch.nn.Parameter]) -> Dict[str, torch.Tensor]:
    """{name: a detached copy} of the parameters (e.g. the ones unlearning moves): a state to load again later."""
    return {n: p.detach().clone() for n, p in params.items()}


@torch.no_grad()
def load_weights(params: Dict[str, torch.nn.Parameter], values: Dict[str, torch.Tensor]) -> None:
    for n, p in params.items():
        p.copy_(values[n])


@contextmanager
def loaded(params: Dict[str, torch.nn.Parameter], values: Dict[str, torch.Tensor]):
    """Run the block with `values` (copy_weights') in `params`; what they held before is put back after, also when
    the block raises. Which weights a measurement reads is then the `with` around it."""
    held = copy_weights(params)
    load_weights(params, values)
    try:
        yield
    finally:
        load_weights(params, held)


@contextmanager
def restored(params: Dict[str, torch.nn.Parameter]):
    """Run the block (unlearning in place, say), then put back what `params` held before it."""
    held = copy_weights(params)
    try:
        yield
    finally:
        load_weights(params, held)
