"""Work claims between processes started on the same task file, and 'finished during this run' (docs/reliability.md)."""
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InputError, write_error


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
