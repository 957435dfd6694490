"""Experiment tracking: TensorBoard and MLflow receive the events metrics.jsonl is written from, and the summary;
read back with each tool's own reader."""

import json

import pytest

from kdforge.errors import KdforgeError
from kdforge.pipeline import run_distill
from kdforge.recipe import load_recipe

from .conftest import TINY_MODELS

pytestmark = pytest.mark.slow  # each test runs a chain with TensorBoard or MLflow (MLflow's store alone ~10 s)

STEPS = ["train.max_steps=6", "train.limit_batches=3", "train.log_every=2", "train.limit_eval_batches=2"]  # 2 epochs


def logged(stage_dir, split="test"):
    events = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return ({e["step"]: e["loss"] for e in events if e["event"] == "log"},
            {e["step"]: e["top1"] for e in events if e["event"] == "eval" and e["split"] == split})


def test_tensorboard_reads_every_stage_and_the_summary(make_recipe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(make_recipe(TINY_MODELS), [*STEPS, 'tracking.backend="tensorboard"'])
    summary = run_distill(recipe, runs_dir=tmp_path / "runs", consumers=[])
    board = tmp_path / "runs" / "tiny" / "tensorboard"
    for stage in ("teacher", "baseline", "student"):
        events = EventAccumulator(str(board / stage)).Reload()
        assert {"train/loss", "train/lr", "train/top1", "train/images_per_s", "test/top1"} <= set(
            events.Tags()["scalars"])
        losses, top1 = logged(tmp_path / "runs" / "tiny" / stage)
        assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses)
        assert {e.step: e.value for e in events.Scalars("test/top1")} == pytest.approx(top1)
        _, val_top1 = logged(tmp_path / "runs" / "tiny" / stage, "val")
        assert {e.step: e.value for e in events.Scalars("val/top1")} == pytest.approx(val_top1)
        assert ("train/loss_kd" in events.Tags()["scalars"]) == (stage == "student")  # the loss parts too
        recipe_text = events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
        assert 'model = "test_convnext"' in recipe_text and "[distill]" in recipe_text  # the resolved recipe
    final = EventAccumulator(str(board / "summary")).Reload()
    assert final.Scalars("summary/student_top1")[0].value == pytest.approx(summary.student["top1"])
    assert final.Scalars("summary/gain_top1")[0].value == pytest.approx(summary.gain_top1)


def test_mlflow_reads_every_stage_the_recipe_and_the_summarys_files(make_recipe, tmp_path):
    from mlflow.tracking import MlflowClient

    recipe = load_recipe(make_recipe(TINY_MODELS), [*STEPS, 'tracking.backend=["mlflow", "tensorboard"]'])
    summary = run_distill(recipe, runs_dir=tmp_path / "runs", consumers=[])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default: next to runs/
    experiment = client.get_experiment_by_name("tiny")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"tiny/teacher", "tiny/baseline", "tiny/student", "tiny/summary"}
    student = runs["tiny/student"]
    assert student.info.status == "FINISHED"
    assert student.data.params["distill.temperature"] == "4.0" and student.data.params["student.model"] == \
        "test_convnext"
    losses, top1 = logged(tmp_path / "runs" / "tiny" / "student")
    history = client.get_metric_history(student.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(losses)
    assert {m.step: m.value for m in client.get_metric_history(student.info.run_id, "test/top1")} == \
        pytest.approx(top1)
    final = runs["tiny/summary"]
    assert final.data.metrics["summary/student_top1"] == pytest.approx(summary.student["top1"])
    files = {f.path for f in client.list_artifacts(final.info.run_id)}
    assert "summary.json" in files and "report" in files
    assert "report/report.md" in {f.path for f in client.list_artifacts(final.info.run_id, "report")}
    assert (tmp_path / "mlruns").is_dir()  # artifacts next to runs/, like the database


def test_a_stage_that_fails_is_a_failed_mlflow_run(make_recipe, tmp_path):
    from mlflow.tracking import MlflowClient

    from kdforge.train.stages import train_stage

    recipe = load_recipe(make_recipe(TINY_MODELS), [*STEPS, 'tracking.backend="mlflow"', "train.batch_size=5000"])
    with pytest.raises(KdforgeError, match="fewer than one batch"):
        train_stage(recipe, "teacher", runs_dir=tmp_path / "runs", consumers=[])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_name == "tiny/teacher" and run.info.status == "FAILED"


def test_a_missing_tracking_package_is_one_error_naming_the_extra(make_recipe, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    recipe = load_recipe(make_recipe(TINY_MODELS), [*STEPS, 'tracking.backend="mlflow"'])
    with pytest.raises(KdforgeError, match=r'pip install "kdforge\[mlflow\]"'):
        run_distill(recipe, runs_dir=tmp_path / "runs", consumers=[])
    assert not (tmp_path / "runs").exists()


def test_an_unknown_tracking_backend_is_a_recipe_error(make_recipe):
    from kdforge.errors import RecipeError

    with pytest.raises(RecipeError, match="unknown tracking backend 'wandb'; choose from none, tensorboard, mlflow"):
        load_recipe(make_recipe(TINY_MODELS), ['tracking.backend="wandb"'])
