"""timm's model names without importing timm (and so torch): what validating a recipe asks.

Importing timm costs about 3 s and 800 MB (it imports torch), which made `kdforge recipe check`, `kdforge report`
and the first line of `kdforge distill` wait for a library they never run. The names timm registers are fixed by
its version, so they are written once into an index in the user's cache (`layout.user_cache_dir()/timm-models/
timm-<version>.json`) by the first command that needs them, and read from there by every later one. A new timm
version has no index yet: the next check builds its own. Without a writable cache the names come from timm itself
each time (slower, still right).

    check_timm_model("resnet18.a1_in1k")  # -> "resnet18.a1_in1k"; ValueError with timm's closest names otherwise
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from pathlib import Path

from kdforge.errors import RecipeError
from kdforge.fileio import write_json
from kdforge.layout import MODEL_NAMES, user_cache_dir
from kdforge.registry import suggest

INDEX_FORMAT = 1  # bump when the index file's shape changes


def timm_version() -> str:
    """The installed timm's version, read from its package metadata (timm is not imported)."""
    try:
        return importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        raise RecipeError("timm is not installed: kdforge's models come from it (pip install timm)") from None


def index_path(version: str) -> Path:
    return user_cache_dir() / MODEL_NAMES / f"timm-{version}.json"


def names_from_timm() -> list[str]:
    """Every architecture name timm registers (what `timm.is_model` accepts), from timm itself: its listed models
    and the deprecated names it still maps to them (timm keeps those in its registry module only)."""
    import timm
    from timm.models import _registry

    return sorted(set(timm.list_models()) | set(getattr(_registry, "_deprecated_models", {})))


def _read_index(path: Path, version: str) -> frozenset[str] | None:
    """The names in the index at `path`, or None when it is missing, unreadable, damaged or of another version."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if index["format"] == INDEX_FORMAT and index["timm"] == version:
            names = index["names"]
            if isinstance(names, list) and names and all(isinstance(name, str) for name in names):
                return frozenset(names)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


@functools.cache
def timm_model_names(version: str | None = None) -> frozenset[str]:
    """The architecture names of the installed timm: from the cached index of its version, else from timm (and
    then the index is written for the next command; a cache that cannot be written is left alone)."""
    version = version or timm_version()
    path = index_path(version)
    names = _read_index(path, version)
    if names is None:
        listed = names_from_timm()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"format": INDEX_FORMAT, "timm": version, "names": listed})
        except OSError:
            pass
        names = frozenset(listed)
    return names


def check_timm_model(name: str) -> str:
    """`name` when timm has its architecture (a pretrained tag after a dot is allowed), else a ValueError naming
    the closest ones."""
    arch = name.split(".", 1)[0]
    names = timm_model_names()
    if arch not in names:
        raise ValueError(f"unknown timm model {arch!r}{suggest(arch, sorted(names))}")
    return name
