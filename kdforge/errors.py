"""Errors a user can act on. The CLI turns these into one clean message and an exit code."""


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
