import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.errors import CheckpointError, DataError
from kdforge.recipe import load_recipe
from kdforge.train.loop import lr_factor
from kdforge.train.stages import train_stage

from .conftest import TINY_MODELS

QUIET: list = []  # no progress display in tests


def test_lr_schedule_warms_up_then_decays_to_min():
    factors = [lr_factor(s, total_steps=100, warmup_steps=10, schedule="cosine", min_factor=0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.slow
def test_small_cnn_learns_the_synthetic_dataset_well_above_chance(tmp_path):
    """The built-in dataset is learnable: a 0.2M-parameter CNN beats 5x chance (5%) in 4 short epochs.

    (About 30 s on a 2-core CPU; speed is measured in benchmarks, not asserted here.)
    """
    recipe_path = tmp_path / "learn.toml"
    recipe_path.write_text(f"""
[data]
dataset = "synthetic"
root = "{tmp_path / 'synth'}"
synthetic = {{ train = 4000, test = 500, seed = 0 }}
[runtime]
device = "cpu"
threads = 2
[train]
epochs = 4
batch_size = 64
lr = 4e-3
warmup_epochs = 0.5
log_every = 1000
[teacher]
model = "test_convnext"
input_size = 32
""")
    result = train_stage(load_recipe(recipe_path), "teacher", runs_dir=tmp_path / "runs", consumers=QUIET)
    assert result.top1 >= 0.05, result


@pytest.mark.slow
def test_a_run_leaves_resolved_recipe_metrics_checkpoints_and_result(make_recipe, tmp_path):
    recipe = load_recipe(make_recipe(TINY_MODELS), ["train.limit_batches=4", "train.epochs=2"])
    runs = tmp_path / "runs"
    result = train_stage(recipe, "baseline", runs_dir=runs, consumers=QUIET)
    stage_dir = runs / "tiny" / "baseline"
    assert result.steps == 8 and result.model == "test_convnext"
    assert load_recipe(stage_dir / "recipe.toml") == recipe  # the run can be reproduced from its own copy
    events = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    # each epoch on the validation split (it chooses `best`), then the final weights once on the test split
    assert [(e["split"], e["epoch"]) for e in events if e["event"] == "eval"] == [("val", 1), ("val", 2), ("test", 2)]
    assert all(0 <= e["top1"] <= 1 for e in events if e["event"] == "eval")
    assert [e["count"] for e in events if e["event"] == "eval"] == [100, 100, 300]  # 10% of 1000; the test split
    assert result.val_images == 100 and result.top1 == events[-1]["top1"]  # the reported number is the test one
    for link in ("last", "best"):
        assert (stage_dir / link / "model.safetensors").is_file()
    state = torch.load(stage_dir / "last" / "state.pt", weights_only=True)
    assert state["step"] == 8
    assert json.loads((stage_dir / "result.json").read_text())["top1"] == result.top1
    assert not list((stage_dir / "checkpoints").glob(".tmp*"))


@pytest.mark.slow
def test_finished_stage_is_reused_and_a_changed_recipe_is_not_silently_mixed(make_recipe, tmp_path):
    path = make_recipe(TINY_MODELS)
    runs = tmp_path / "runs"
    first = train_stage(load_recipe(path, ["train.max_steps=2"]), "teacher", runs_dir=runs, consumers=QUIET)
    again = train_stage(load_recipe(path, ["train.max_steps=2"]), "teacher", runs_dir=runs, consumers=QUIET)
    assert again.skipped and again.top1 == first.top1
    with pytest.raises(CheckpointError, match="--overwrite"):
        train_stage(load_recipe(path, ["train.max_steps=3"]), "teacher", runs_dir=runs, consumers=QUIET)
    redone = train_stage(load_recipe(path, ["train.max_steps=3"]), "teacher", runs_dir=runs, overwrite=True,
                         consumers=QUIET)
    assert redone.steps == 3 and not redone.skipped


@pytest.mark.slow
def test_batch_larger_than_the_training_split_is_a_clear_error(make_recipe, tmp_path):
    recipe = load_recipe(make_recipe(TINY_MODELS), ["train.batch_size=5000"])
    with pytest.raises(DataError, match="fewer than one batch"):
        train_stage(recipe, "teacher", runs_dir=tmp_path / "runs", consumers=QUIET)


@pytest.mark.slow
def test_teacher_command_trains_and_prints_accuracy(make_recipe, tmp_path):
    path = make_recipe(TINY_MODELS)
    args = ["teacher", str(path), "--set", "train.max_steps=3", "--runs-dir", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "teacher test_resnet: test top-1" in result.stdout
    # running it again while the run is finished reuses it
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "already trained" in again.stdout


def _wait_for_checkpoint(stage_dir: Path, proc: subprocess.Popen, min_step: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = stage_dir / "last"
        if last.exists():
            step = int(last.resolve().name.removeprefix("step-"))
            if step >= min_step:
                return step
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "training process exited early"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared in time")


@pytest.mark.slow
def test_kill_9_then_resume_ends_with_the_same_weights(make_recipe, tmp_path):
    path = make_recipe(TINY_MODELS)
    overrides = ["train.epochs=3", "train.limit_batches=8", "train.checkpoint_every=3", "teacher.input_size=64",
                 "train.log_every=1"]
    recipe = load_recipe(path, overrides)

    # reference: an uninterrupted run
    train_stage(recipe, "teacher", runs_dir=tmp_path / "a", consumers=QUIET)

    # the same run in a separate process, killed with SIGKILL after its first checkpoint
    cmd = [sys.executable, "-m", "kdforge", "teacher", str(path), "--runs-dir", str(tmp_path / "b")]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stage_dir = tmp_path / "b" / "tiny" / "teacher"
    try:
        killed_at = _wait_for_checkpoint(stage_dir, proc, min_step=3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (stage_dir / "result.json").exists(), "the run finished before it could be killed"
    assert killed_at < 24

    # without --resume the unfinished run is protected; with it, the run completes
    with pytest.raises(CheckpointError, match="--resume"):
        train_stage(recipe, "teacher", runs_dir=tmp_path / "b", consumers=QUIET)
    resumed = train_stage(recipe, "teacher", runs_dir=tmp_path / "b", resume=True, consumers=QUIET)
    assert resumed.steps == 24

    expected = load_file(tmp_path / "a" / "tiny" / "teacher" / "last" / "model.safetensors")
    actual = load_file(stage_dir / "last" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key

    # the metrics log reads like one run: every step once, the same losses as the uninterrupted run
    def losses(root):
        lines = (root / "tiny" / "teacher" / "metrics.jsonl").read_text().splitlines()
        return [(e["step"], e["loss"]) for e in map(json.loads, lines) if e["event"] == "log"]

    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_progress_lines_off_a_terminal_are_one_event_per_line_with_the_time_left(capsys):
    """In CI logs and `make demo > log`, a training log line is never wrapped at 80 columns (the lr stays on it),
    and it says how long the stage has left, as the progress bar does on a terminal."""
    from kdforge.train.events import ProgressDisplay

    clock = iter([1000.0, 1010.0])  # the stage starts at 1000 s; step 100 of 7820 is logged 10 s later
    display = ProgressDisplay(clock=lambda: next(clock))  # stderr is captured here: not a terminal
    title = "student vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    display({"event": "start", "title": title, "total_steps": 7820, "steps_per_epoch": 782, "step": 0,
             "device": "cuda, bf16 autocast, channels_last"})
    display({"event": "log", "step": 100, "total_steps": 7820, "loss": 4.1234, "train_top1": 0.0625,
             "images_per_s": 2871.0, "lr": 2.1e-3})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and len(lines[1]) > 80
    # the time left is the stage's pace so far: 7720 steps at 0.1 s a step
    assert lines[1].startswith(f"{title} step 100/7820") and lines[1].endswith("lr 2.10e-03  12:52 left")


@pytest.mark.slow
def test_a_loss_that_becomes_nan_stops_training_before_a_checkpoint_is_written(make_recipe, tmp_path, monkeypatch):
    """The NaN guard reads the loss when a line is logged or a checkpoint is due (not in every step): a loss that
    turns NaN mid-epoch is one error naming the steps, and no checkpoint holds the weights it reached."""
    from kdforge.distill import objective as objectives
    from kdforge.errors import KdforgeError

    real = objectives.cross_entropy_objective

    def poisoned(*args, **kwargs):
        objective, calls = real(*args, **kwargs), [0]

        def nan_from_step_3(logits, labels, images, teacher_logits=None, **extra):
            loss, parts = objective(logits, labels, images, teacher_logits, **extra)
            calls[0] += 1
            return (loss * float("nan") if calls[0] >= 3 else loss), parts

        return nan_from_step_3

    monkeypatch.setattr("kdforge.train.assemble.cross_entropy_objective", poisoned)
    recipe = load_recipe(make_recipe(TINY_MODELS), ["train.log_every=50", "train.checkpoint_every=4"])
    with pytest.raises(KdforgeError, match=r"loss became nan between steps 1 and 4; lower train.lr"):
        train_stage(recipe, "baseline", runs_dir=tmp_path / "runs", consumers=[])
    assert not list((tmp_path / "runs" / recipe.name / "baseline").glob("checkpoints/step-*"))
