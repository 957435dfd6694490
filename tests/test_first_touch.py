"""Commands a user touches first answer without torch or timm: the recipe is checked against an index of timm's
model names (kdforge/model_names.py), and `kdforge distill` says what it will do before torch is imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdforge import model_names

from .conftest import without_torch_env

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.toml"))


def kdforge(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdforge", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_the_index_holds_exactly_the_names_timm_accepts():
    from timm.models import _registry

    names = model_names.timm_model_names()
    assert names == frozenset(_registry._model_entrypoints)  # what timm.is_model checks
    index = json.loads(model_names.index_path(model_names.timm_version()).read_text())
    assert index["timm"] == model_names.timm_version() and frozenset(index["names"]) == names


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "timm": "0.0.1", "names": ["resnet18"]}',
                                     '{"format": 1, "timm": "VERSION", "names": []}'])
def test_a_damaged_or_foreign_index_is_rebuilt_from_timm(tmp_path, monkeypatch, content):
    monkeypatch.setenv("KDFORGE_CACHE_DIR", str(tmp_path))
    version = model_names.timm_version()
    path = model_names.index_path(version)
    path.parent.mkdir(parents=True)
    path.write_text(content.replace("VERSION", version))
    model_names.timm_model_names.cache_clear()
    try:
        assert "resnet18" in model_names.timm_model_names() and "vit_tiny_patch16_224" in model_names.timm_model_names()
    finally:
        model_names.timm_model_names.cache_clear()
    assert json.loads(path.read_text())["timm"] == version


def test_an_unwritable_cache_still_checks_names(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KDFORGE_CACHE_DIR", str(tmp_path / "file"))  # a file where the cache folder should be
    model_names.timm_model_names.cache_clear()
    try:
        assert model_names.check_timm_model("resnet18.a1_in1k") == "resnet18.a1_in1k"
        with pytest.raises(ValueError, match="did you mean: resnet18"):
            model_names.check_timm_model("resnt18")
    finally:
        model_names.timm_model_names.cache_clear()


def test_help_and_recipe_check_answer_without_torch_or_timm(tmp_path):
    env = without_torch_env(tmp_path)
    for args in (["--help"], ["verify", "--help"], ["distill", "--help"]):
        result = kdforge(args, env)
        assert result.returncode == 0 and "Usage" in result.stdout, result.stderr
    result = kdforge(["recipe", "check", *map(str, RECIPES)], env)
    assert result.returncode == 0, result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines()] == [str(path) for path in RECIPES]

    bad = tmp_path / "bad.toml"
    bad.write_text('[teacher]\nmodel = "resnt18"\n[student]\nmodel = "mobilenetv3_small_050.lamb_in1k"\n')
    result = kdforge(["recipe", "check", str(bad)], env)
    assert result.returncode == 2
    assert "teacher.model: unknown timm model 'resnt18' (did you mean: resnet18" in result.stderr
    assert "student.model" not in result.stderr  # a known architecture with a pretrained tag passes


def test_the_check_itself_fails_when_torch_is_blocked_and_needed(tmp_path):
    """The blocker works: a command that needs torch fails under it (so the tests above can fail)."""
    result = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                            env=without_torch_env(tmp_path))
    assert result.returncode != 0 and "made unimportable by this test" in result.stderr


def test_distill_says_its_plan_before_torch_is_imported(make_recipe, tmp_path):
    from .conftest import TINY_MODELS

    recipe = make_recipe(TINY_MODELS + '[export]\nformats = ["onnx"]\n', name="first")
    process = subprocess.Popen([sys.executable, "-m", "kdforge", "distill", str(recipe), "--runs-dir",
                                str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=without_torch_env(tmp_path, report=True))
    try:
        lines = []
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("importing "):
                break
    finally:
        process.kill()
        process.wait()
    assert lines[-1].startswith("importing "), lines  # torch came after ...
    assert lines[0] == ("first: teacher test_resnet 1 epoch -> baseline (labels only) test_convnext 1 epoch -> "
                        "distilled student (kd from the teacher) test_convnext 1 epoch -> export onnx + "
                        "verification on the test split"), lines  # ... the plan
