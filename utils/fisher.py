"""The diagonal Fisher file (`sd_fisher.pt`): a dict UNet-parameter-name -> tensor of that parameter's shape."""
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .io import InputError


def load_fisher(path, params: Dict[str, torch.Tensor], floor: Optional[float] = None,
                device="cpu") -> Dict[str, torch.Tensor]:
    """Fisher diagonals of exactly the parameters in `params`, as float64 on `device`.

    Names may carry a 'unet.' prefix. A selected parameter without an entry, with another shape, or
    with a zero / negative / non-finite entry is an error, since the update divides by it (SPEC pitfall 5);
    `floor` instead raises every entry to at least that value.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Fisher file not found: {path}; download it with data/download_abc.sh "
                         f"or build it with compute_fisher.py (--fisher_path)")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a dict of parameter name -> tensor, got {type(raw).__name__}")
    table = {(k[len("unet."):] if k.startswith("unet.") else k): v for k, v in raw.items()}
    missing = [n for n in params if n not in table]
    if missing:
        raise InputError(f"{path} has no Fisher entry for {len(missing)} of the {len(params)} selected "
                         f"parameter(s), e.g. {missing[0]!r}; rebuild it with compute_fisher.py "
                         f"using the same --weight_selection")
    out = {}
    for name, p in params.items():
        f = table[name]
        if tuple(f.shape) != tuple(p.shape):
            raise InputError(f"{path}: Fisher of {name} has shape {tuple(f.shape)}, the parameter {tuple(p.shape)}")
        f = f.to(device=device, dtype=torch.float64)
        if not torch.isfinite(f).all():
            raise InputError(f"{path}: Fisher of {name} has non-finite entries")
        if floor is not None:
            f = f.clamp(min=floor)
        elif (f <= 0).any():
            n_bad = int((f <= 0).sum())
            raise InputError(f"{path}: Fisher of {name} has {n_bad} zero or negative entr(y/ies), and the "
                             f"update divides by it; pass --fisher_floor (e.g. 1e-12) to clamp them")
        out[name] = f
    return out


def fisher_summary(fisher: Dict[str, torch.Tensor]) -> List[str]:
    return [f"{n}: mean {f.mean().item():.3e}, min {f.min().item():.3e}" for n, f in fisher.items()]
