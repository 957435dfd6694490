from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.errors import RecipeError
from kdforge.recipe import load_recipe, recipe_hash, recipe_to_toml

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.toml"))
runner = CliRunner()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_in_the_repository_is_valid(path):
    result = runner.invoke(app, ["recipe", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert f"ok: {path}" in result.output


def test_train_defaults_merge_into_each_model_and_per_model_keys_win(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[train]\nepochs = 3\nlr = 0.1\n[teacher]\nmodel = "resnet18"\n[teacher.train]\nepochs = 7\n'
                    '[student]\nmodel = "resnet18"\n')
    recipe = load_recipe(path)
    assert (recipe.teacher.train.epochs, recipe.teacher.train.lr) == (7, 0.1)
    assert (recipe.student.train.epochs, recipe.student.train.lr) == (3, 0.1)
    assert recipe.name == "r"  # defaults to the file name


def test_overrides_are_typed_and_reach_nested_keys(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[teacher]\nmodel = "resnet18"\n')
    recipe = load_recipe(path, ["train.epochs=2", "teacher.model=resnet34", "data.augment.hflip=false",
                                "teacher.mean=[0.5, 0.5, 0.5]"])
    assert recipe.teacher.train.epochs == 2
    assert recipe.teacher.model == "resnet34"
    assert recipe.data.augment.hflip is False
    assert recipe.teacher.mean == (0.5, 0.5, 0.5)


def test_resolved_recipe_round_trips_through_toml(tmp_path):
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "quickstart.toml")
    saved = tmp_path / "quickstart.toml"
    saved.write_text(recipe_to_toml(recipe))
    assert load_recipe(saved) == recipe
    assert recipe_hash(load_recipe(saved)) == recipe_hash(recipe)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[train]\nepochz = 3\n', "train.epochz: unknown key (did you mean: epochs?)"),
        ('[train]\nepochs = "ten"\n', "train.epochs: Input should be a valid integer"),
        ('[train]\nlr = -1\n', "train.lr: Input should be greater than 0"),
        ('[teacher]\nmodel = "resnt18"\n', "teacher.model: unknown timm model 'resnt18' (did you mean: resnet18"),
        ('[teacher]\npretrained = true\n', "teacher.model: required key is missing"),
        ('[teacher]\nmodel = "resnet18"\nweights = "missing.safetensors"\n', "weights file not found"),
        ('[data]\ndataset = "cifar10"\n', "data.dataset: unknown dataset 'cifar10' (did you mean: cifar100?)"),
        ('[runtime]\ndevice = "gpu"\n', "runtime.device: device must be auto, cpu, cuda, cuda:N or mps"),
        ('[train\nepochs = 1\n', "invalid TOML"),
    ],
)
def test_malformed_recipe_gives_one_clear_line_and_no_traceback(tmp_path, body, expected):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    result = runner.invoke(app, ["recipe", "check", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in result.output + result.stderr


def test_bad_train_default_is_reported_once_not_per_model(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[train]\nepochs = 0\n[teacher]\nmodel = "resnet18"\n[student]\nmodel = "resnet18"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).count("epochs") == 1


def test_missing_recipe_file_and_bad_override_are_clean_errors(tmp_path):
    result = runner.invoke(app, ["teacher", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "recipe not found" in result.stderr
    path = tmp_path / "r.toml"
    path.write_text('[teacher]\nmodel = "resnet18"\n')
    result = runner.invoke(app, ["recipe", "check", str(path), "--set", "train.epochs"])
    assert result.exit_code == 2 and "expected dotted.key=value" in result.stderr


def test_recipe_without_the_needed_section_says_so(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[student]\nmodel = "resnet18"\n')
    result = runner.invoke(app, ["teacher", str(path)])
    assert result.exit_code == 2
    assert "has no [teacher] section" in result.stderr


def test_recipes_never_execute_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "r.toml"
    path.write_text(f'[teacher]\nmodel = "__import__(\'os\').system(\'touch {marker}\')"\n')
    with pytest.raises(RecipeError):
        load_recipe(path)
    assert not marker.exists()


def test_version_and_help_have_examples():
    assert runner.invoke(app, ["--version"]).output.startswith("kdforge ")
    for command in (["teacher"], ["baseline"], ["recipe", "check"], ["data", "synth"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Example" in result.output, command
