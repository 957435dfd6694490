"""Checkpoints that a kill can never leave half-written.

A stage directory holds complete checkpoints and two links to them:

    runs/<recipe>/<stage>/checkpoints/step-00000120/model.safetensors   weights (safetensors)
    runs/<recipe>/<stage>/checkpoints/step-00000120/state.pt            optimizer, scheduler, RNG, counters
    runs/<recipe>/<stage>/last -> checkpoints/step-00000120
    runs/<recipe>/<stage>/best -> checkpoints/step-00000100

A checkpoint is written into a temporary folder and renamed into place; then the link is replaced
atomically; only then are checkpoints no link points to deleted. `state.pt` is loaded with
`weights_only=True`.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from kdforge.errors import CheckpointError
from kdforge.fileio import atomic_path, file_hash
from kdforge.layout import BEST, CHECKPOINTS, LAST, RESULT

WEIGHTS = "model.safetensors"
STATE = "state.pt"
FULL_BELOW = 64 << 20  # free bytes under which a failed checkpoint write is reported as a full disk


def save_checkpoint(
    stage_dir: Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    metadata: dict[str, str],
    best: bool,
) -> Path:
    """Save weights + training state for `step`, point `last` (and `best` if asked) at it, prune the rest."""
    checkpoints = stage_dir / CHECKPOINTS
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"step-{step:08d}"
    if not final.is_dir():  # a step is saved once; a second call may only move the `best` link
        tmp = checkpoints / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save_model(model, str(tmp / WEIGHTS), metadata={k: str(v) for k, v in metadata.items()})
            torch.save(state, tmp / STATE)
        except RuntimeError:  # torch's writer reports a failed write as RuntimeError ("unexpected pos")
            shutil.rmtree(tmp, ignore_errors=True)
            if shutil.disk_usage(checkpoints).free < FULL_BELOW:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(checkpoints)) from None
            raise
        tmp.rename(final)
    _point(stage_dir / LAST, final)
    if best:
        _point(stage_dir / BEST, final)
    _prune(stage_dir)
    return final


def _point(link: Path, target: Path) -> None:
    with atomic_path(link) as tmp:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target.relative_to(link.parent))


def _prune(stage_dir: Path) -> None:
    keep = {(stage_dir / name).resolve() for name in (LAST, BEST) if (stage_dir / name).exists()}
    for path in (stage_dir / CHECKPOINTS).iterdir():
        if path.resolve() not in keep:
            shutil.rmtree(path, ignore_errors=True)


def load_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return torch.load(checkpoint / STATE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{checkpoint / STATE}: cannot read training state: {str(exc)[:200]}; start the "
                              f"stage over with --overwrite") from None
    except pickle.UnpicklingError:  # weights_only refused something that is not plain tensors and containers
        raise CheckpointError(f"{checkpoint / STATE}: not a kdforge training state (the safe loader refused what "
                              f"it holds); start the stage over with --overwrite") from None


def load_weights(model: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    """Load `checkpoint/model.safetensors` (or a .safetensors file) into `model`, strictly."""
    path = checkpoint / WEIGHTS if checkpoint.is_dir() else checkpoint
    if not path.is_file():
        raise CheckpointError(f"no weights at {path}")
    try:
        load_model(model, str(path), strict=True)
    except SafetensorError as exc:  # truncated or not a safetensors file
        raise CheckpointError(f"{path}: damaged weights file ({exc}); train that stage again with --overwrite "
                              f"(or restore the file)") from None
    except (RuntimeError, OSError, ValueError) as exc:  # safetensors' header errors are ValueErrors/OSErrors
        raise CheckpointError(f"{path}: weights do not fit the model {type(model).__name__} "
                              f"({_first_line(str(exc))}); is this the checkpoint of another model?") from None
    return model


def _first_line(message: str) -> str:
    """torch's load_state_dict errors list every key over many lines; the first problem is enough to act on."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0] if lines else "unknown"
    return detail if len(detail) <= 200 else detail[:200] + "..."


def checkpoint_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path / WEIGHTS}: damaged weights file ({exc}); start the stage over with "
                              f"--overwrite") from None


def final_weights(stage_dir: Path) -> Path:
    """The final weights of a stage folder (its `last` checkpoint). A `last` link that leads out of the stage's
    own checkpoints folder (moved, edited or planted) is refused: the weights behind it are not this stage's."""
    link = stage_dir / LAST
    if link.is_symlink():
        target, own = link.resolve(), (stage_dir / CHECKPOINTS).resolve()
        if own not in target.parents:
            raise CheckpointError(f"{link} points outside its stage's checkpoints folder (to {target}): these are "
                                  f"not the stage's weights; retrain the stage (--overwrite)")
    return link / WEIGHTS


def check_final_weights(stage_dir: Path, recorded: str | None) -> Path:
    """The stage's final weights, checked against the sha256 its result.json recorded (`recorded`; stages finished
    before it was recorded have none): a replaced weights file is refused."""
    weights = final_weights(stage_dir)
    if recorded and weights.is_file() and file_hash(weights) != recorded:
        raise CheckpointError(f"{weights} is not the file this stage finished with (its sha256 differs from "
                              f"{RESULT}'s weights_sha256); retrain the stage (--overwrite)")
    return weights


def resolve_weights(path: Path, what: str) -> Path:
    """A finished stage folder, a checkpoint folder or a .safetensors file -> the weights file."""
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if (path / RESULT).is_file() and final_weights(path).is_file():
        return final_weights(path)
    if (path / LAST).exists():
        raise CheckpointError(f"{what}: the run in {path} has not finished; finish it with --resume first")
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    raise CheckpointError(f"{what}: no weights at {path} (expected a finished run folder or a .safetensors file)")
