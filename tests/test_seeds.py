"""Seeds as a dimension: the chain per seed, one shared teacher, mean +- sd and the gain's confidence interval."""

import json

import pytest
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.recipe import load_recipe
from kdforge.seeds import gain_interval, run_seeds, t_quantile, verdict

from .conftest import TINY_MODELS

STEPS = ["--set", "train.max_steps=3", "--set", "train.limit_eval_batches=2"]


@pytest.mark.parametrize(("df", "quantile"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantiles_match_the_published_table(df, quantile):
    assert t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)


def test_the_gain_interval_and_its_verdict():
    gain = gain_interval([8.0, 9.1, 10.2])  # mean 9.1, sd 1.1: 9.1 +- 4.3027 * 1.1 / sqrt(3)
    assert gain["mean"] == pytest.approx(9.1) and gain["sd"] == pytest.approx(1.1)
    assert gain["ci"] == pytest.approx([6.3674, 11.8326], abs=1e-4) and gain["significant"]
    assert verdict(gain) == "gain +9.10 +- 1.10 points over 3 seeds, 95% CI [+6.37, +11.83]: significant"
    crossing = gain_interval([-1.0, 0.5, 1.2])
    assert crossing["significant"] is False and verdict(crossing).endswith("not significant (the interval includes 0)")
    assert gain_interval([-3.0, -2.9, -3.1])["significant"]  # a real loss is significant too
    assert "one seed, no confidence interval" in verdict(gain_interval([3.0]))


@pytest.mark.slow
def test_distill_over_seeds_trains_one_teacher_and_reports_the_gain(make_recipe, tmp_path):
    path = make_recipe(TINY_MODELS)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["distill", str(path), "--seeds", "0,1", *STEPS, "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    group = runs / "tiny"
    assert (runs / "tiny-seed0" / "teacher" / "result.json").is_file()
    assert not (runs / "tiny-seed1" / "teacher").exists() and (runs / "tiny-seed1" / "teacher_eval").is_dir()

    saved = json.loads((group / "seeds.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["shared_teacher"] is True
    for row in saved["per_seed"]:  # each row is that seed's own summary
        own = json.loads((runs / f"tiny-seed{row['seed']}" / "summary.json").read_text())
        assert row["baseline"] == pytest.approx(own["baseline"]["top1"] * 100)
        assert row["gain"] == pytest.approx((own["student"]["top1"] - own["baseline"]["top1"]) * 100)
    assert saved["per_seed"][0]["teacher"] == saved["per_seed"][1]["teacher"]  # the same teacher
    first, second = (json.loads((runs / f"tiny-seed{s}" / "baseline" / "metrics.jsonl").read_text().splitlines()[0])
                     for s in (0, 1))
    assert first["loss"] != second["loss"]  # the seeds really differ
    assert saved["verdict"] in result.stdout and "mean +- sd" in result.stdout
    report = (group / "report" / "seeds.md").read_text()
    assert saved["verdict"] in report and (group / "report" / "seeds.png").is_file()

    again = CliRunner().invoke(app, ["distill", str(path), "--seeds", "0,1", *STEPS, "--runs-dir", str(runs)])
    assert again.exit_code == 0 and json.loads((group / "seeds.json").read_text())["per_seed"] == saved["per_seed"]
    assert again.stderr.count("finished earlier with these settings, reused") == 5  # every stage of both seeds


@pytest.mark.slow
def test_a_teacher_per_seed_when_asked(make_recipe, tmp_path):
    recipe = load_recipe(make_recipe(TINY_MODELS), ["train.max_steps=2", "train.limit_eval_batches=1",
                                                    "experiment.seeds=[3, 4]", "experiment.share_teacher=false"])
    summary = run_seeds(recipe, runs_dir=tmp_path, consumers=[])
    assert summary.shared_teacher is False
    assert all((tmp_path / f"tiny-seed{s}" / "teacher" / "result.json").is_file() for s in (3, 4))


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "0,a"], "--seeds takes integers separated by commas"),
    (["--seeds", "1,1"], "seeds must be distinct"),
    (["--seeds", "0,1", "--set", "distill.baseline=false"], "experiment.seeds needs distill.baseline = true"),
])
def test_bad_seeds_are_one_error_before_anything_runs(make_recipe, tmp_path, args, message):
    result = CliRunner().invoke(app, ["distill", str(make_recipe(TINY_MODELS)), *args, "--runs-dir",
                                      str(tmp_path / "runs")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "runs").exists()
