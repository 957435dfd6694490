"""MkDocs hook: pages that are generated from the code or the repository's own files, so they cannot drift.

- `<!-- recipe-reference -->` in a page becomes the recipe reference (kdforge/reference.py, from the recipe's
  pydantic models: every key, its type, default and comment);
- `<!-- include ARCHITECTURE.md -->` becomes that file of the repository (one copy, read by both audiences).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- recipe-reference -->" in markdown:
        from kdforge.reference import recipe_reference

        markdown = markdown.replace("<!-- recipe-reference -->", recipe_reference())
    if "<!-- include ARCHITECTURE.md -->" in markdown:
        text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
        body = text.split("\n", 1)[1]  # the page keeps its own title
        markdown = markdown.replace("<!-- include ARCHITECTURE.md -->", body)
    return markdown
