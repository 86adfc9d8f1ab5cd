"""Atomic file output and checked reading of JSON (docs/reliability.md)."""
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import InputError, write_error
from .faults import checkpoint


def atomic_write(path, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Serialize with `write(file)` into memory, write that to a temporary file in the same folder, rename it over
    `path`.

    A run killed mid-write leaves at most a `*.tmp-<pid>` file, never a half-written `path` that a rerun
    would trust; a failed write (disk full, read-only folder) leaves `path` as it was and stops the run with
    an InputError that names the file. Serializing first keeps the two apart: an error of the serializer
    (a bad value) is raised as it is, and the writing is plain Python I/O, whose errors keep their errno
    (numpy's and torch's own file writers report a full disk without one).
    """
    path = Path(path)
    buffer = io.BytesIO() if binary else io.StringIO()
    write(buffer)
    data = buffer.getvalue() if binary else buffer.getvalue().encode("utf-8")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(write_error(path, e)) from e
    finally:
        if tmp.exists():
            tmp.unlink()
    checkpoint(f"wrote:{path.name}")
    return path


def check_writable(folder) -> Path:
    """Fail before any work when the results folder cannot take a file."""
    folder = Path(folder)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
    except OSError as e:
        raise InputError(write_error(probe, e).replace(str(probe), str(folder), 1)) from e
    finally:
        if probe.exists():
            probe.unlink()
    return folder


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
    except (UnicodeDecodeError, OSError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from e
