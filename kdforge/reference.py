"""The recipe reference, generated from the recipe's pydantic models (what `docs/recipes.md` shows, built by the
documentation's hook), so the documented keys, types and defaults are the ones the recipe accepts:

    markdown = recipe_reference()    # one table per section: key, type, default, what it does

"What it does" is the comment beside or above the field in kdforge/recipe.py, where the code's readers see it too.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from pydantic import BaseModel

from kdforge.recipe import Recipe

COMMENT = re.compile(r"\s+#\s?(.*)$")


def field_notes(model: type[BaseModel]) -> dict[str, tuple[str, str]]:
    """{field: (type as written, comment)} from the class's source: the comment on the field's line, else the
    comment lines just above it."""
    lines = inspect.getsource(model).splitlines()
    notes = {}
    for number, line in enumerate(lines):
        match = re.match(r"^    (\w+): (.*?)(?: = .*)?$", line.split("  #")[0].rstrip())
        if not match or match.group(1) not in model.model_fields:
            continue
        comment = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        above, back = [], number - 1
        while back >= 0 and lines[back].strip().startswith("#"):
            above.insert(0, lines[back].strip().lstrip("#").strip())
            back -= 1
        notes[match.group(1)] = (match.group(2).strip(), " ".join([*above, comment]).strip())
    return notes


def _plain(kind: str) -> str:
    """`Annotated[int, Field(ge=8)]` -> `int (ge=8)`; pipes escaped for the table."""
    match = re.fullmatch(r"Annotated\[(.+?), Field\((.*)\)\]( \| None)?", kind)
    if match:
        kind = f"{match.group(1)}{match.group(3) or ''} ({match.group(2)})"
    return kind.replace("|", "\\|")


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`".replace("|", "\\|")


def _section(model: type[BaseModel]) -> type[BaseModel] | None:
    """The model a field's annotation holds (a sub-section), if any."""
    for candidate in getattr(model, "__args__", None) or (model,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def recipe_reference() -> str:
    """Markdown: `[section]` headings, each with a table of its keys."""
    parts, queue, seen = [], [("(top level)", Recipe)], set()
    while queue:
        path, model = queue.pop(0)
        if (path, model) in seen:
            continue
        seen.add((path, model))
        notes = field_notes(model)
        rows = []
        for name, field in model.model_fields.items():
            sub = _section(field.annotation)
            if sub is not None:
                queue.append((name if path == "(top level)" else f"{path}.{name}", sub))
                continue
            kind, note = notes.get(name, (str(field.annotation), ""))
            rows.append(f"| `{name}` | `{_plain(kind)}` | {_default(field)} | {note.replace('|', '/')} |")
        if rows:
            title = path if path == "(top level)" else f"[{path}]"
            # the section's own docstring only (inspect.getdoc would hand down pydantic's BaseModel one)
            doc = (model.__doc__ or "").strip().split("\n\n")[0] if model is not Recipe else ""
            doc = " ".join(doc.split())
            parts += [f"### {title}", "", *([doc, ""] if doc else []),
                      "| key | type | default | what it does |", "|---|---|---|---|", *rows, ""]
    return "\n".join(parts)
