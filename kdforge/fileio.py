"""Small file helpers shared by runs and exports: atomic writes, content hashes and the lock one kdforge process
holds on a run or export folder while it changes it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kdforge.errors import KdforgeError
from kdforge.layout import LOCKS, METADATA, user_cache_dir

_HELD: dict[str, list[Any]] = {}  # the folder locks this process holds: key -> [open lock file, depth]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (`.NAME.tmp-PID`) to write to; renamed onto `path` when the block ends
    without an error, removed when it raises. Readers see the old file or the new one, never half of one, and
    what a killed writer leaves behind is removed by `remove_leftovers`.

        with atomic_path(engine_path) as tmp:
            tmp.write_bytes(serialized)
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> bool:
    """Write `data` to `path` atomically (see `atomic_path`) unless `path` holds exactly these bytes already; then
    nothing is written, so a command that changes nothing (a report of an unchanged run) also works on a read-only
    folder. True when the file was written."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return True


def atomic_write_text(path: Path, text: str) -> bool:
    """Write `text` to `path` as UTF-8, atomically and only when it changed (see `write_bytes`)."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> bool:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


CANNOT_WRITE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})  # a read-only or someone else's folder


def record_or_note(write: Callable[[], Any], path: Path, notes: list[str] | None) -> None:
    """Call `write`, which records what a command measured in `path` (verify.json, bench.json). When `notes` is a
    list, a folder the command may not write (read-only, another user's) adds a note that `path` was not updated
    instead of failing: such a command's result is what it prints. Other failures (a full disk) raise."""
    try:
        write()
    except OSError as exc:
        if notes is None or exc.errno not in CANNOT_WRITE:
            raise
        note = f"{path} not updated ({exc.strerror}): the results above are not recorded"
        if note not in notes:
            notes.append(note)


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when there is no such file; a damaged file is a KdforgeError that names it."""
    from kdforge.errors import KdforgeError

    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KdforgeError(f"{path}: damaged or not JSON ({exc}); write it again (export again, or rerun the "
                           f"command that made it)") from None
    if not isinstance(value, dict):
        raise KdforgeError(f"{path}: expected a JSON object, found {type(value).__name__}; write it again")
    return value


def check_can_create(folder: Path, what: str = "folder") -> None:
    """Raise a KdforgeError naming the obstacle when `folder` cannot be created (or used) as a folder because a
    file is where it or one of its parents should be. Called before anything is written, so a command that
    would fail on it half-way fails at the start instead."""
    from kdforge.errors import KdforgeError

    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise KdforgeError(f"cannot use {folder} as the {what}: {path} is a file; pass another path")
            return


# what every reader of an export's metadata.json relies on (written by kdforge.export.artifacts.build_metadata)
METADATA_KEYS = ("model", "recipe", "run", "input_size", "mean", "std", "class_names", "num_classes", "formats",
                 "checkpoint_sha256")


def read_metadata(export_dir: Path) -> dict[str, Any]:
    """The export's metadata.json, checked complete; a KdforgeError naming the file when it is missing, damaged
    or lacks what serving, verification and benchmarks read."""
    from kdforge.errors import KdforgeError

    path = export_dir / METADATA
    if not path.is_file():
        raise KdforgeError(f"{export_dir} is not a kdforge export (no metadata.json); pass an export folder "
                           f"(exports/NAME) or run `kdforge export`")
    meta = read_json(path)
    missing = [key for key in METADATA_KEYS if key not in meta]
    if missing or not isinstance(meta["formats"], dict):
        raise KdforgeError(f"{path} lacks {', '.join(missing) or 'a formats table'}: not a complete kdforge export; "
                           f"export again")
    return meta


def check_artifact(export_dir: Path, entry: dict[str, Any]) -> Path:
    """The artifact of a metadata.json format entry, checked to be the very file that was exported (sha256):
    what serving, verification and benchmarks open. An ExportError when it is missing or was replaced."""
    from kdforge.errors import ExportError

    artifact = export_dir / entry["file"]
    files = [(artifact, entry["sha256"])]
    if "weights_file" in entry:  # a format whose weights are a second file (OpenVINO's .bin)
        files.append((export_dir / entry["weights_file"], entry["weights_sha256"]))
    for path, digest in files:
        if not path.is_file():
            raise ExportError(f"{path} is missing; export it again")
        if file_hash(path) != digest:
            raise ExportError(f"{path} changed since it was exported (its sha256 is not the one in metadata.json); "
                               f"export it again")
    return artifact


def file_hash(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in `folder` (`.NAME.tmp-PID`,
    `.NAME.pre-PID`, `.tmp-step-N-PID`: the names kdforge's atomic writes use) when process PID is gone."""
    import shutil

    removed = []
    for path in folder.glob(".*-*") if folder.is_dir() else []:
        stem, _, pid = path.name.rpartition("-")
        if not pid.isdigit() or not (stem.endswith((".tmp", ".pre")) or stem.startswith(".tmp-step-")):
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that process still runs: its file is not a leftover
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def lock_folder() -> Path:
    """Where kdforge's locks live: `locks/` in the user's kdforge cache (~/.cache/kdforge/locks, or
    $KDFORGE_CACHE_DIR/locks), created 0700 and checked, without following links, to be a folder of this user's
    that no one else can write. Not the shared temporary directory: there another local user could plant the
    folder (or a link in it) first, and a full $TMPDIR would make Python pick another one, where a second kdforge
    would not see the first's lock. A folder that fails the check is an error, never silently replaced."""
    folder = user_cache_dir() / LOCKS
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        raise KdforgeError(f"cannot create kdforge's lock folder {folder}: {exc.strerror}; set KDFORGE_CACHE_DIR to "
                           f"a folder of yours that is writable") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        what = ("a link" if stat.S_ISLNK(info.st_mode) else "not a folder" if not stat.S_ISDIR(info.st_mode)
                else "owned by another user" if info.st_uid != os.getuid() else "writable by others")
        raise KdforgeError(f"kdforge's lock folder {folder} is {what}: another user could take or block its locks; "
                           f"remove it (it is recreated) or set KDFORGE_CACHE_DIR to a folder only you can write")
    return folder


def _open_lock_file(path: Path):
    """The lock file, opened without following a link planted at its name, and checked to be a regular file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        hint = "a link was planted there; remove it" if exc.errno == errno.ELOOP else exc.strerror
        raise KdforgeError(f"cannot open the lock file {path}: {hint}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise KdforgeError(f"the lock file {path} is not a regular file; remove it")
    return os.fdopen(fd, "a+")


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold the lock on `folder` (a run or an export folder) while the block runs: a second kdforge process that
    asks for it fails at once with one line naming the first one (its pid and command), instead of training or
    exporting the same thing beside it. The lock is the operating system's (`flock`) on a file in `lock_folder()`
    keyed by the folder's resolved path, so nothing is written into the folder itself (a read-only runs folder
    stays usable) and a process that dies releases it: a stale lock is simply taken over. Re-entrant within a
    process (`kdforge distill` holds its run while each stage takes it again). Local to this machine: processes on
    other machines sharing the folder over a network file system are not seen. No-op where flock does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:24]
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    handle = _open_lock_file(lock_folder() / f"{key}.lock")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise KdforgeError(f"{what} {folder} is in use by another kdforge process ({holder}): wait for it to end, "
                           f"or stop it (its lock ends with it)") from None
    handle.seek(0)
    handle.truncate()
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
    handle.write(f"pid {os.getpid()}: {command}"[:300])
    handle.flush()
    _HELD[key] = [handle, 1]
    try:
        yield
    finally:
        del _HELD[key]
        handle.close()  # closing releases the lock
