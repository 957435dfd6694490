"""Hosts that share nothing: every process of a multi-node run starts a stage from the same stage folder, sent by
the process whose folder holds it newest.

    share_stage(Path("runs/quickstart/teacher"))   # every process of the group, before the stage is planned

Rank 0 alone writes checkpoints and results, into its own runs folder. On a shared disk every process then reads
the same files; on hosts that share nothing the others' folders hold nothing (or an older state), and which host
gets rank 0 may change between launches (torchrun's c10d rendezvous ranks nodes by address and process id). So
before a stage is planned, every process describes its copy of the folder (finished, or the step of its last
checkpoint), they agree on the newest (a finished run first, then the latest checkpoint, then rank 0), and when any
copy differs from it, its holder sends the folder's files over the process group (the recipe, the metrics, the
result, the `last` and `best` checkpoints and their links): weights as they were written (safetensors), the
training state as torch saved it (read back with `weights_only=True`, as from disk), never pickle on the wire.
A process whose copy differs keeps its own in runs/NAME/.stale/ until the stage finishes, and then plans, resumes
or reuses from the same files as every other process. On a shared disk every copy is the same one: nothing moves.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from kdforge import layout
from kdforge.errors import CheckpointError
from kdforge.fileio import atomic_path
from kdforge.runtime import all_gather_json, broadcast_bytes

MANIFEST = "kdforge-stage-files"


def describe_copy(stage_dir: Path) -> dict:
    """What this process's copy of the stage folder holds: finished or not, its last checkpoint's step, and a
    digest of the files that would be sent (equal digests: the same copy)."""
    finished = layout.is_finished(stage_dir)
    last = (stage_dir / layout.LAST).resolve() if (stage_dir / layout.LAST).is_symlink() else None
    step = int(last.name.removeprefix("step-")) if last is not None and last.name.startswith("step-") else -1
    digest = hashlib.sha256(json.dumps(_links(stage_dir), sort_keys=True).encode())
    for relative, path in _files(stage_dir):  # a checkpoint is written once per step: its name and size suffice
        detail = path.stat().st_size if relative.startswith(layout.CHECKPOINTS) else \
            hashlib.sha256(path.read_bytes()).hexdigest()
        digest.update(f"{relative}:{detail}\n".encode())
    return {"finished": finished, "step": step, "digest": digest.hexdigest(), "host": os.uname().nodename}


def _files(stage_dir: Path) -> list[tuple[str, Path]]:
    """The files that make a stage folder resumable or reusable elsewhere."""
    files = [(name, stage_dir / name) for name in (layout.RECIPE, layout.METRICS, layout.RESULT)
             if (stage_dir / name).is_file()]
    for link in (layout.LAST, layout.BEST):
        target = (stage_dir / link).resolve() if (stage_dir / link).is_symlink() else None
        if target is not None and target.parent == (stage_dir / layout.CHECKPOINTS).resolve() and target.is_dir():
            files += [(f"{layout.CHECKPOINTS}/{target.name}/{f.name}", f) for f in sorted(target.iterdir())
                      if f.is_file() and (f"{layout.CHECKPOINTS}/{target.name}/{f.name}", f) not in files]
    return files


def _links(stage_dir: Path) -> dict[str, str]:
    return {link: (stage_dir / link).resolve().name for link in (layout.LAST, layout.BEST)
            if (stage_dir / link).is_symlink()}


def pack(stage_dir: Path) -> bytes:
    """The folder's files as one message: a JSON manifest (names, sizes, the links' checkpoints), then the bytes."""
    files = _files(stage_dir)
    manifest = {"kind": MANIFEST, "files": [[name, path.stat().st_size] for name, path in files],
                "links": _links(stage_dir)}
    head = json.dumps(manifest).encode()
    return len(head).to_bytes(8, "little") + head + b"".join(path.read_bytes() for _, path in files)


def unpack(message: bytes, stage_dir: Path) -> None:
    """Write a packed folder as `stage_dir` (this process's copy moved aside to .stale/ first). Every name is
    checked to stay inside the folder before anything is written."""
    size = int.from_bytes(message[:8], "little")
    manifest = json.loads(message[8:8 + size])
    if manifest.get("kind") != MANIFEST:
        raise CheckpointError(f"{stage_dir}: the stage files received are not a kdforge stage")
    names = [name for name, _ in manifest["files"]]
    for name in names:
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not (len(parts) == 1 or (
                len(parts) == 3 and parts[0] == layout.CHECKPOINTS and parts[1].startswith("step-"))):
            raise CheckpointError(f"{stage_dir}: refusing a received file named {name!r}")
    for link, target in manifest["links"].items():
        if link not in (layout.LAST, layout.BEST) or not target.startswith("step-") or "/" in target:
            raise CheckpointError(f"{stage_dir}: refusing a received link {link} -> {target!r}")
    if stage_dir.exists():
        aside = stage_dir.parent / layout.STALE / f"{stage_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        stage_dir.rename(aside)
    offset = 8 + size
    for name, length in manifest["files"]:
        path = stage_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(message[offset:offset + length])
        offset += length
    for link, target in manifest["links"].items():
        (stage_dir / link).symlink_to(Path(layout.CHECKPOINTS) / target)


def share_stage(stage_dir: Path) -> str | None:
    """Make this process's copy of `stage_dir` the newest copy any process of the group holds (see the module
    docstring); returns a note saying what was sent, or None when every copy was already the same."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return None
    copies = all_gather_json(describe_copy(stage_dir))
    newest = max(range(len(copies)), key=lambda r: (copies[r]["finished"], copies[r]["step"], -r))
    if copies[newest]["step"] < 0 and not copies[newest]["finished"]:
        return None  # nothing to resume or reuse anywhere: every process starts the same way
    behind = [r for r, copy in enumerate(copies) if copy["digest"] != copies[newest]["digest"]]
    if not behind:
        return None
    rank = torch.distributed.get_rank()
    message = broadcast_bytes(pack(stage_dir) if rank == newest else None, newest)
    if rank in behind:
        unpack(message, stage_dir)
    state = "finished" if copies[newest]["finished"] else f"checkpoint step {copies[newest]['step']}"
    return (f"{stage_dir.name}: the {state} from {copies[newest]['host']} (rank {newest}) sent to rank(s) "
            f"{', '.join(map(str, behind))} ({len(message) / 1e6:.1f} MB)")
