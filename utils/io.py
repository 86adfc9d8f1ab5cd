"""Atomic file output, work claims between processes, and the one exception type that the command-line
scripts turn into a clean exit (docs/reliability.md)."""
import errno
import io
import json
import os
import pickle
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .faults import checkpoint


class InputError(Exception):
    """A problem with the user's input (a file, a flag, a cache): printed without a traceback, exit code 2."""


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


WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.EIO: "an input/output error of the disk"}


def write_error(path, e: OSError) -> str:
    """One line that says which file could not be written, why, and what to do."""
    why = WRITE_ERRORS.get(e.errno, e.strerror or str(e))
    return (f"cannot write {path}: {why}; free space or fix the folder's permissions (or pass another "
            f"--result_dir), then rerun: finished outputs are kept and skipped")


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


@contextmanager
def claim(lock, what: str) -> Iterator[bool]:
    """Claim a unit of work (a model's cache, a query) for this process with an exclusive lock on the file `lock`.

    Yields True when this process may do the work, False when another process holds the claim (it says which).
    The lock is the kernel's (flock), so it ends with its process however that process ends: a claim left by a
    killed run is free for the rerun. The file is removed when the work ends.
    """
    import fcntl

    lock = Path(lock)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
        raise InputError(write_error(lock, e)) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            print(f"skipping {what}: {holder} is working on it (claim {lock})", flush=True)
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}".encode())
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)  # still holding the lock: a process that opened it meanwhile sees it free
    finally:
        os.close(fd)


def finished_since(marker, started: float, overwrite: bool) -> bool:
    """Is the output whose last-written file is `marker` done: finished at all, or with --overwrite, finished
    during this run (started at `started`, by a sibling process started on the same task file)?"""
    marker = Path(marker)
    return marker.is_file() and (not overwrite or marker.stat().st_mtime >= started)


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
