"""Sharding models or queries over the processes of `accelerate launch` (or torchrun)."""
from typing import List, Sequence, Tuple

from .precision import device_type


def process_share(items: Sequence, device: str) -> Tuple[List, str, int, int]:
    """(this process's items, its device, its index, the process count).

    Under `accelerate launch` (or torchrun) every process takes every num_processes-th item starting at
    its own index, on its own GPU; a plain run takes everything. Items are independent and seeded, so
    each output equals a single-process run's, and a rerun after a crash finishes whatever is missing.
    """
    from accelerate import PartialState

    state = PartialState(cpu=device_type(device) == "cpu")
    if state.num_processes > 1 and device_type(device) == "cuda":
        device = str(state.device)
    return list(items)[state.process_index::state.num_processes], device, state.process_index, state.num_processes
