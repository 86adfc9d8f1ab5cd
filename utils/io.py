"""Atomic file output and the one exception type that the command-line scripts turn into a clean exit."""
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np


class InputError(Exception):
    """A problem with the user's input (a file, a flag, a cache): printed without a traceback, exit code 2."""


def atomic_write(path, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Write through a temporary file in the same folder, then rename it over `path`.

    A run killed mid-write leaves at most a `*.tmp-<pid>` file, never a half-written `path`
    that a rerun would trust.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_npy(path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, np.asarray(array)))


def save_json(path, obj) -> Path:
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True), binary=False)


def save_pickle(path, obj) -> Path:
    return atomic_write(path, lambda f: pickle.dump(obj, f))


def save_torch(path, obj) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def load_json(path, what: str):
    """Read a JSON file, turning a missing or malformed file into an InputError that names it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
