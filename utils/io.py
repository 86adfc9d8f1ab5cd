"""Atomic file output, and the one way every script reads a file (JSON, NumPy, pickle, torch or safetensors
tensors, text lines): a missing or damaged file becomes one InputError that names it and says what to do
(docs/reliability.md). Images are read by utils.transforms.load_rgb, which does the same."""
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


def save_safetensors(path, tensors) -> Path:
    """A dict name -> tensor as a safetensors file, written atomically (tensors made contiguous, on the CPU)."""
    from safetensors.torch import save

    return atomic_write(path, lambda f: f.write(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})))


def _check_exists(path: Path, what: str, remedy: str) -> None:
    if not path.is_file():
        raise InputError(f"{what} not found: {path}" + (f"; {remedy}" if remedy else ""))


def damaged(path, what: str, error: Exception, remedy: str) -> InputError:
    """The error for a file that exists but cannot be read: which file, its size, the reader's words, the fix."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return InputError(f"cannot read {what} {path} ({size} bytes: {why}); the file is damaged or truncated: "
                      f"{remedy or 'copy, download or save it again'}")


def load_json(path, what: str):
    """Read a JSON file, turning a missing or malformed file into an InputError that names it."""
    path = Path(path)
    _check_exists(path, what, "")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    except (UnicodeDecodeError, OSError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from e


SAFETENSORS_MAGIC_BYTES = 8  # a safetensors file opens with the length of its JSON header, then '{'


def is_safetensors(path) -> bool:
    """Does the file hold safetensors bytes, whatever its name says (diffusers' Custom Diffusion trainer has
    written safetensors under a .bin name)?"""
    with open(path, "rb") as f:
        head = f.read(SAFETENSORS_MAGIC_BYTES + 1)
    return len(head) == SAFETENSORS_MAGIC_BYTES + 1 and head[-1:] == b"{" and \
        int.from_bytes(head[:SAFETENSORS_MAGIC_BYTES], "little") < (1 << 32)


def load_tensors(path, what: str, remedy: str = ""):
    """A dict of tensors from a torch pickle (.pt / .bin, loaded with weights_only) or a safetensors file
    (told apart by content, not name), on the CPU. Raises InputError naming the file when it is missing,
    truncated or holds something else."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    _check_exists(path, what, remedy)
    try:
        if is_safetensors(path):
            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch, zipfile, pickle and safetensors each raise their own kinds for a damaged file
        raise damaged(path, what, e, remedy) from e


def load_npy(path, what: str, mmap_mode=None, remedy: str = "") -> np.ndarray:
    """A .npy array (memory-mapped with `mmap_mode`); a missing, truncated or non-.npy file is an InputError."""
    path = Path(path)
    _check_exists(path, what, remedy)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise damaged(path, what, e, remedy) from e


def load_pickle(path, what: str, remedy: str = ""):
    """An object from a pickle file this repo wrote (influence.pkl); a damaged one is an InputError."""
    path = Path(path)
    _check_exists(path, what, remedy)
    try:
        return pickle.loads(path.read_bytes())
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError) as e:
        raise damaged(path, what, e, remedy) from e


def read_lines(path, what: str, remedy: str = "") -> list:
    """The lines of a UTF-8 text file split on '\\n' only (as `wc -l` and Python's readlines() count them:
    U+2028, U+0085 and form feeds stay inside a line), without a final empty line; '\\r\\n' endings lose the
    '\\r'."""
    path = Path(path)
    _check_exists(path, what, remedy)
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise damaged(path, what, e, remedy or "save it as UTF-8 text") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return [line[:-1] if line.endswith("\r") else line for line in lines]
