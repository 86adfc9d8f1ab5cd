"""The one exception type that the command-line scripts turn into a clean exit, and the message of a failed write
(docs/reliability.md)."""
import errno


class InputError(Exception):
    """A problem with the user's input (a file, a flag, a cache): printed without a traceback, exit code 2."""


WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.EIO: "an input/output error of the disk"}


def write_error(path, e: OSError) -> str:
    """One line that says which file could not be written, why, and what to do."""
    why = WRITE_ERRORS.get(e.errno, e.strerror or str(e))
    return (f"cannot write {path}: {why}; free space or fix the folder's permissions (or pass another "
            f"--result_dir), then rerun: finished outputs are kept and skipped")
