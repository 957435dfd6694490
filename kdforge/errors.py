"""Errors a user can act on. The CLI turns these into one clean message and an exit code."""

import errno

# operating-system failures a user can act on (a full disk, a read-only or foreign folder, a quota, the open-file
# limit), and what to do about each: the CLI prints them as one error line (`describe_os_error`)
OS_ADVICE = {
    errno.ENOSPC: "free some space there, or write elsewhere, then run the command again (training: add --resume)",
    errno.EDQUOT: "a disk quota is exhausted there: free some space, or write elsewhere, then run the command again",
    errno.EROFS: "that file system is read-only: write elsewhere (--out, --runs-dir, export.dir)",
    errno.EACCES: "permission denied: write elsewhere (--out, --runs-dir, export.dir) or fix the folder's permissions",
    errno.EPERM: "operation not permitted: write elsewhere (--out, --runs-dir, export.dir) or fix the permissions",
    errno.EMFILE: "this process has too many open files: raise the limit (ulimit -n) and run the command again",
    errno.ENFILE: "the system has too many open files: close some programs and run the command again",
}


def shorten(text: str, limit: int) -> str:
    """`text` cut to about `limit` characters, saying how much was left out (a huge value echoed in a message)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]} ... [{len(text) - limit // 2:,} more characters]"


class KdforgeError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in kdforge."""

    exit_code = 1


class RecipeError(KdforgeError):
    """The recipe (or a --set override) is malformed or asks for something that does not exist."""

    exit_code = 2


class DataError(KdforgeError):
    """A dataset is missing, corrupt or in an unexpected format."""


class ModelError(KdforgeError):
    """A model cannot be created or its weights cannot be loaded."""


class CheckpointError(KdforgeError):
    """A run's checkpoint is missing, incomplete or does not match the recipe."""


class ExportError(KdforgeError):
    """An export format cannot be produced or read."""


class VerificationError(KdforgeError):
    """An exported model does not match the PyTorch model within tolerance; `report` holds the measurements."""

    def __init__(self, message: str, report=None) -> None:
        super().__init__(message)
        self.report = report


class UnavailableError(KdforgeError):
    """What was asked needs software or hardware this machine lacks (TensorRT, a CUDA GPU); everything that
    could be done here was done."""

    exit_code = 3


class ServingError(KdforgeError):
    """An export cannot be served (missing, unverified when required, unreadable) or the server cannot start."""


class OutOfMemoryError(KdforgeError):
    """The device (GPU, MPS or CPU memory) could not hold what a stage asked for; the message says which stage,
    model and batch size, and what to change. Checkpoints written before it are kept."""


def describe_os_error(exc: OSError) -> str | None:
    """One line for an operating-system failure a user can act on (`OS_ADVICE`): the path, what happened and what to
    do; None for any other OSError (a bug or an unexpected condition, shown in full)."""
    if exc.errno not in OS_ADVICE:
        return None
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or 'operating-system error'}: {OS_ADVICE[exc.errno]}"
