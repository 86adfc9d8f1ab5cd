"""Per-sample gradients of nn.Linear parameters from one backward pass of a summed batch loss.

For y = x W^T + b with x [B, ..., in], sample i's gradient w.r.t. W is g_i^T x_i summed over the middle
(token) dims, where g = dL/dy; for b it is g_i summed likewise. Used by compute_fisher.py (squared and
summed: the diagonal Fisher) and by compute_baselines.py's gradient-similarity baseline (kept whole).
"""
from typing import Dict, List

import torch


class PerSampleLinearGrads:
    """Hooks on the nn.Linear modules owning `names`; after backward, `grads[name]` is [B, *param.shape]."""

    def __init__(self, model: torch.nn.Module, names: List[str], dtype: torch.dtype = torch.float64):
        self.modules: Dict[str, torch.nn.Linear] = {}
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                for attr in ("weight", "bias"):
                    if f"{module_name}.{attr}" in names:
                        self.modules[module_name] = module
        self.names, self.dtype = list(names), dtype
        self.grads: Dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in self.modules.items()]

    @staticmethod
    def covers(model: torch.nn.Module, names: List[str]) -> bool:
        linear = {f"{mn}.{a}" for mn, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  for a in ("weight", "bias")}
        return all(n in linear for n in names)

    def _forward_hook(self, module_name):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            output.register_hook(lambda g: self._store(module_name, x, g.detach()))
        return hook

    def _store(self, module_name, x, g):
        b = x.shape[0]
        x, g = x.reshape(b, -1, x.shape[-1]).to(self.dtype), g.reshape(b, -1, g.shape[-1]).to(self.dtype)
        for attr, grad in (("weight", lambda: torch.einsum("bto,bti->boi", g, x)), ("bias", lambda: g.sum(1))):
            name = f"{module_name}.{attr}"
            if name in self.names:  # a module called twice in one forward adds up, as autograd would
                self.grads[name] = self.grads[name] + grad() if name in self.grads else grad()

    def flat(self) -> torch.Tensor:
        """[B, total entries]: every named parameter's per-sample gradient, in `names` order."""
        return torch.cat([self.grads[n].flatten(1) for n in self.names], dim=1)

    def remove(self):
        for h in self.handles:
            h.remove()
