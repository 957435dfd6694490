"""The student search (`kdforge students`, `[student] model = "auto"`): candidates are timm models or refused with a
suggestion, each is exported and timed on the target format (a second search reuses the exports), a device profile
written by the torch-free probe replaces this machine's timings, the race keeps the candidate that learns, and the
chain distils the winner, checks its own file against the budget and reuses the choice when run again. All but the
first export or train (marked slow: `make test-fast` leaves them out)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdforge import layout
from kdforge.cli import app as cli
from kdforge.errors import KdforgeError, RecipeError
from tests.conftest import TINY_MODELS, synth_data_section

runner = CliRunner()
CANDIDATES = ["test_convnext", "test_efficientnet", "test_vit"]


def auto_recipe(folder: Path, synth_root: Path, search: str, name: str = "auto") -> Path:
    """The tiny models' recipe with an "auto" student and `search` as its [student.search] section."""
    body = TINY_MODELS.replace('model = "test_convnext"', 'model = "auto"')
    path = folder / f"{name}.toml"
    path.write_text(synth_data_section(synth_root) + body + textwrap.dedent(search)
                    + f'\n[export]\ndir = "{folder / "exports"}"\n')
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory, synth_root):
    """One search without the race over three tiny candidates (ONNX, batch 1): (recipe, settings, runs, result)."""
    from kdforge.recipe import load_recipe
    from kdforge.students import search_settings, search_students

    folder = tmp_path_factory.mktemp("search")
    recipe = load_recipe(auto_recipe(folder, synth_root, f"""
        [student.search]
        budget_ms = 1000
        candidates = {json.dumps(CANDIDATES)}
        repeats = 10
        """))
    settings = search_settings(recipe)
    result = search_students(recipe, settings, folder / "runs", race_on=False, consumers=[])
    return recipe, settings, folder / "runs", result


def test_candidates_are_timm_models_or_refused_with_a_suggestion(tmp_path, synth_root):
    from kdforge.recipe import load_recipe
    from kdforge.students import DEFAULT_CANDIDATES, candidate_config, default_candidates

    assert default_candidates() == list(DEFAULT_CANDIDATES)  # the curated list is all in the pinned timm
    with pytest.raises(RecipeError, match=r"unknown timm model 'mobilenetv3_smal' \(did you mean: mobilenetv3_small"):
        load_recipe(auto_recipe(tmp_path, synth_root, """
            [student.search]
            budget_ms = 5
            candidates = ["mobilenetv3_smal"]
            """))
    with pytest.raises(RecipeError, match=r'model = "auto" needs a \[student.search\] section'):
        load_recipe(auto_recipe(tmp_path, synth_root, ""))
    with pytest.raises(RecipeError, match="timed on its own"):  # a format without a file of its own
        load_recipe(auto_recipe(tmp_path, synth_root, '[student.search]\nbudget_ms = 5\nformat = "triton"\n'))
    auto_only = load_recipe(auto_recipe(tmp_path, synth_root, "[student.search]\nbudget_ms = 5\n"))
    from kdforge.train.stages import train_stage

    with pytest.raises(RecipeError, match='the baseline stage needs a model: \\[student\\] model = "auto" is chosen'):
        train_stage(auto_only, "baseline", runs_dir=tmp_path / "runs", consumers=[])
    assert not (tmp_path / "runs").exists()
    with pytest.raises(RecipeError, match="choose the student once"):
        load_recipe(auto_recipe(tmp_path, synth_root, "[student.search]\nbudget_ms = 5\n"),
                    ["experiment.seeds=[0,1]"])

    # the command refuses a misspelt candidate before anything is made
    recipe = tmp_path / "named.toml"
    recipe.write_text(synth_data_section(synth_root) + TINY_MODELS)
    runs = tmp_path / "runs"
    result = runner.invoke(cli, ["students", str(recipe), "--budget-ms", "5", "--candidates",
                                 "test_resnet,tset_vit", "--runs-dir", str(runs)])
    assert result.exit_code == 2  # a recipe or option error
    assert "unknown timm model 'tset_vit' (did you mean: test_vit" in result.output
    assert not runs.exists()
    result = runner.invoke(cli, ["students", str(recipe), "--runs-dir", str(runs)])
    assert result.exit_code == 2 and "give --budget-ms" in result.output
    result = runner.invoke(cli, ["students", str(recipe), "--budget-ms", "5", "--set", "data.val_fraction=0",
                                 "--runs-dir", str(runs)])  # refused before the teacher would train
    assert result.exit_code == 2 and "the race chooses on the validation split" in result.output
    assert not runs.exists()

    # a model that cannot take the input size is named with why (ViTs get img_size when they need it)
    loaded = load_recipe(recipe)
    assert candidate_config(loaded, "test_vit3", 32).model_kwargs == {"img_size": 32}
    with pytest.raises(KdforgeError, match=r"test_vit does not accept 8x8 inputs \(Input height \(8\) should be "
                                           r"divisible by patch size"):
        candidate_config(loaded, "test_vit", 8)


@pytest.mark.slow  # exports and trains
def test_the_latency_table_ranks_three_candidates_and_a_second_search_reuses_their_exports(searched):
    import timm

    from kdforge.students import search_students

    recipe, settings, runs, result = searched
    rows = result.rows
    assert [row["model"] for row in rows] != [] and sorted(row["model"] for row in rows) == sorted(CANDIDATES)
    assert [row["latency_p50_ms"] for row in rows] == sorted(row["latency_p50_ms"] for row in rows)
    assert all(row["fits"] and 0 < row["latency_p50_ms"] <= row["latency_p95_ms"] for row in rows)
    students = runs / recipe.name / layout.STUDENTS
    for row in rows:  # parameters and MACs of the model as built, size of the very file timed
        model = timm.create_model(row["model"], num_classes=100, **row["model_kwargs"])
        assert row["params"] == sum(p.numel() for p in model.parameters())
        assert row["macs"] > row["params"] / 10
        export = students / "exports" / f"{row['model']}-32"
        assert row["bytes"] == (export / "student.onnx").stat().st_size
        assert json.loads((export / layout.METADATA).read_text())["input_size"] == 32
    assert result.winner["model"] == rows[0]["model"]  # no race: the fastest within budget
    record = json.loads((students / layout.STUDENTS_RECORD).read_text())
    assert record["winner"] == result.winner and (students / layout.STUDENTS_PLOT).stat().st_size > 10_000

    stamps = {path: path.stat().st_mtime_ns for path in (students / "exports").rglob("student.onnx")}
    again = search_students(recipe, settings, runs, race_on=False, consumers=[])
    assert all(row["export_s"] is None for row in again.rows)  # reused, not exported again
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps


@pytest.mark.slow  # exports and trains
def test_the_device_profile_replaces_this_machines_timings(searched, tmp_path):
    from kdforge.students import search_students

    recipe, settings, runs, _ = searched
    exports = runs / recipe.name / layout.STUDENTS / "exports"
    profile_path = tmp_path / "latency.json"
    # the probe as the serving image runs it: without torch
    code = ("import sys; sys.modules['torch'] = None\n"
            "from kdforge.serve.probe import main\n"
            f"main([{str(exports)!r}, '--repeats', '3', '--output', {str(profile_path)!r}])\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    profile = json.loads(profile_path.read_text())
    assert sorted(row["model"] for row in profile["rows"]) == sorted(CANDIDATES)
    assert profile["machine"]["cpu"] and profile["machine"]["runtimes"]["onnxruntime"]

    # the same files on a device where the order differs, one of them not probed there
    ordered = sorted(profile["rows"], key=lambda row: row["latency_p50_ms"])
    slowest_here, middle, fastest_here = ordered[2], ordered[1], ordered[0]
    slowest_here.update(latency_p50_ms=1.0, latency_p95_ms=1.5)
    middle.update(latency_p50_ms=2.0, latency_p95_ms=2.5)
    profile["rows"] = [slowest_here, middle]
    profile["machine"]["cpu"] = "Cortex-A76 board"
    profile_path.write_text(json.dumps(profile))
    on_device = search_students(recipe, settings.model_copy(update={"device_profile": str(profile_path),
                                                                    "budget_ms": 1.5}), runs, race_on=False,
                                consumers=[])
    assert [(row["model"], row["latency_p50_ms"], row["fits"]) for row in on_device.rows] == \
        [(slowest_here["model"], 1.0, True), (middle["model"], 2.0, False)]
    assert {row["measured_on"] for row in on_device.rows} == {"Cortex-A76 board"}
    assert "not in the device profile" in on_device.skipped[fastest_here["model"]]
    assert on_device.winner["model"] == slowest_here["model"]

    profile["settings"]["batch"] = 4
    profile_path.write_text(json.dumps(profile))
    with pytest.raises(KdforgeError, match="measured at batch 4; the search asks batch 1"):
        search_students(recipe, settings.model_copy(update={"device_profile": str(profile_path)}), runs,
                        race_on=False, consumers=[])


@pytest.fixture(scope="module")
def auto_chain(tmp_path_factory, synth_root):
    """`kdforge distill` of a recipe whose student is "auto" (two tiny candidates, a short race), run once:
    (recipe path, runs folder, the command's output)."""
    folder = tmp_path_factory.mktemp("auto-chain")
    path = auto_recipe(folder, synth_root, """
        [student.search]
        budget_ms = 1000
        candidates = ["test_convnext", "test_efficientnet"]
        race_steps = 6
        repeats = 5
        """)
    runs = folder / "runs"
    result = runner.invoke(cli, ["distill", str(path), "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    return path, runs, result.output


@pytest.mark.slow  # exports and trains
def test_an_auto_student_is_chosen_distilled_checked_against_its_budget_and_reused(auto_chain):
    path, runs, output = auto_chain
    run = runs / "auto"
    record = json.loads((run / layout.STUDENTS / layout.STUDENTS_RECORD).read_text())
    winner = record["winner"]["model"]
    assert len(record["race"]) == 1 and record["race"][0]["kept"] == [winner]
    summary = json.loads((run / layout.SUMMARY).read_text())
    assert summary["student"]["model"] == summary["baseline"]["model"] == winner
    assert f'model = "{winner}"' in (run / "student" / layout.RECIPE).read_text()
    # the search's format joined the export (the recipe exported nothing), and the budget was checked on that file
    assert "onnx" in summary["exports"] and "export: onnx added" in output
    budget = summary["budget"]
    assert budget["model"] == winner and budget["format"] == "onnx" and budget["budget_ms"] == 1000
    assert budget["met"] == (budget["latency_p50_ms"] <= 1000) and budget["sha256"] == \
        json.loads((Path(summary["exports"]["onnx"]["artifact"]).parent / layout.METADATA).read_text())[
            "formats"]["onnx"]["sha256"]
    assert "latency budget met" in output
    report = (run / layout.REPORT / layout.REPORT_MD).read_text()
    assert "## Student search" in report and f"{winner} (chosen)" in report and "Budget met" in report

    before = {p: p.stat().st_mtime_ns for p in (run / layout.STUDENTS).rglob("*") if p.is_file()}
    again = runner.invoke(cli, ["distill", str(path), "--runs-dir", str(runs)])
    assert again.exit_code == 0, again.output
    assert f"student: {winner} at 32x32 (chosen earlier, reused" in again.output
    assert "race round" not in again.output
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing searched, raced or re-timed


@pytest.mark.slow  # exports and trains
def test_the_race_keeps_the_candidate_that_learns(auto_chain):
    """Two candidates, one of which cannot learn (its learning rate is 1e-12) and is the faster one: the race
    chooses on validation accuracy, so the learner wins."""
    from kdforge.recipe import load_recipe
    from kdforge.students import candidate_config, race, search_settings
    from kdforge.train.stages import teacher_weights_for

    path, runs, _ = auto_chain
    recipe = load_recipe(path)
    learner = candidate_config(recipe, "test_resnet", 32)
    frozen = candidate_config(recipe, "test_byobnet", 32)
    frozen = frozen.model_copy(update={"train": frozen.train.model_copy(update={"lr": 1e-12})})
    rounds = race(recipe, {"test_byobnet": frozen, "test_resnet": learner}, {"test_byobnet": 0.1, "test_resnet": 0.2},
                  search_settings(recipe, race_steps=60), teacher_weights_for(recipe, runs),
                  runs / "auto" / layout.STUDENTS / "race", consumers=[])
    assert [entry["kept"] for entry in rounds] == [["test_resnet"]], rounds
    scores = rounds[0]["val_top1"]
    assert scores["test_resnet"] > scores["test_byobnet"] + 0.03, scores


@pytest.mark.slow  # exports and trains
def test_a_budget_nothing_meets_stops_the_chain_naming_the_fastest(auto_chain):
    path, runs, _ = auto_chain
    result = runner.invoke(cli, ["distill", str(path), "--runs-dir", str(runs), "--set",
                                 "student.search.budget_ms=0.0001"])
    assert result.exit_code == 2
    assert "no candidate meets 0.0001 ms in onnx (batch 1): the fastest" in result.output
    written = runner.invoke(cli, ["students", str(path), "--runs-dir", str(runs), "--no-race", "--write-recipe",
                                  str(path.parent / "chosen.toml")])
    assert written.exit_code == 0, written.output
    from kdforge.recipe import load_recipe

    chosen = load_recipe(path.parent / "chosen.toml")
    assert chosen.student.model in ("test_convnext", "test_efficientnet") and chosen.student.search.budget_ms == 1000
    assert chosen.export.formats == ["onnx"]  # the searched format, so its chain checks the budget too


@pytest.mark.slow  # exports and trains
def test_a_search_over_two_sizes_picks_a_model_and_its_size_and_the_chain_serves_it_at_that_size(
        tmp_path, synth_root):
    """[student.search] sizes: every (model, size) is exported, timed and raced; "auto" resolves to a model AND a
    size, which the chain trains, exports, verifies and serves (the server's input spec, both protocols); the
    teacher keeps its own size; a second search reuses the size-keyed exports."""
    from fastapi.testclient import TestClient

    from kdforge.recipe import load_recipe
    from kdforge.serve.app import create_app
    from kdforge.students import search_settings, search_students

    path = auto_recipe(tmp_path, synth_root, """
        [student.search]
        budget_ms = 1000
        candidates = ["test_convnext", "test_efficientnet"]
        sizes = [32, 48]
        race_steps = 6
        repeats = 5
        """, name="sized")
    runs = tmp_path / "runs"
    done = runner.invoke(cli, ["distill", str(path), "--runs-dir", str(runs)])
    assert done.exit_code == 0, done.output
    record = json.loads((runs / "sized" / layout.STUDENTS / layout.STUDENTS_RECORD).read_text())
    assert sorted(row["name"] for row in record["rows"]) == sorted(
        f"{model}@{size}" for model in ("test_convnext", "test_efficientnet") for size in (32, 48))
    winner, size = record["winner"]["model"], record["winner"]["input_size"]
    assert record["winner"]["name"] == f"{winner}@{size}" and record["race"][-1]["kept"] == [f"{winner}@{size}"]
    summary = json.loads((runs / "sized" / layout.SUMMARY).read_text())
    assert summary["student"]["model"] == winner and summary["student"]["input_size"] == size
    assert summary["teacher"]["input_size"] == 32  # the teacher sees its own resize of the same images
    export = Path(summary["exports"]["onnx"]["artifact"]).parent
    meta = json.loads((export / layout.METADATA).read_text())
    assert meta["input_size"] == size and json.loads((export / layout.VERIFY).read_text())["onnx"]["passed"]
    client = TestClient(create_app(export))
    assert client.get("/metadata").json()["input_size"] == size
    described = client.get(f"/v2/models/{meta['recipe']}").json()
    assert described["inputs"][1]["shape"] == [-1, 3, size, size]
    assert f"student: {winner} at {size}x{size} (chosen" in done.output

    recipe = load_recipe(path)
    again = search_students(recipe, search_settings(recipe), tmp_path / "again-runs", race_on=False, consumers=[])
    assert any(row["export_s"] is not None for row in again.rows)  # another runs folder: exported anew
    reused = search_students(recipe, search_settings(recipe), tmp_path / "again-runs", race_on=False, consumers=[])
    assert all(row["export_s"] is None for row in reused.rows)  # each (model, size) export folder reused


def test_sizes_are_checked_as_the_recipe_is(tmp_path, synth_root):
    from kdforge.recipe import load_recipe

    path = auto_recipe(tmp_path, synth_root, """
        [student.search]
        budget_ms = 1
        sizes = [32, 32]
        """)
    with pytest.raises(RecipeError, match="sizes lists a size twice"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="sizes"):
        load_recipe(path, ["student.search.sizes=[4]"])
