"""The documentation site builds with `mkdocs build --strict` (a broken link, a page missing from the navigation or
an unknown anchor fails it), its recipe reference holds every key the recipe accepts, and README.md stays short."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is part of the dev install")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_site_builds_strictly_with_a_page_per_topic(site):
    for page in ("getting-started", "recipes", "data", "distillation", "choosing-a-student", "export", "int8",
                 "on-device", "deploying", "serving-api", "benchmarks", "architecture", "development"):
        assert (site / page / "index.html").is_file(), page
    architecture = (site / "architecture" / "index.html").read_text()
    assert "One owner per concept" in architecture  # ARCHITECTURE.md, included at build time


def test_the_recipe_reference_lists_every_key_the_recipe_accepts(site):
    from pydantic import BaseModel

    from kdforge.recipe import Recipe
    from kdforge.reference import _section

    page = (site / "recipes" / "index.html").read_text()
    missing, queue = [], [Recipe]
    while queue:
        model = queue.pop()
        for name, field in model.model_fields.items():
            sub = _section(field.annotation)
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                queue.append(sub)
            elif f"<code>{name}</code>" not in page:
                missing.append(f"{model.__name__}.{name}")
    assert not missing, missing


def test_the_readme_is_short_and_keeps_its_two_set_up_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert re.search(r"^    make demo ", readme, re.M) and re.search(r"^    make test ", readme, re.M)
    assert not re.search(r"\]\(\.\./", readme)  # no link to a file outside the repository
