"""Skip, resume or redo: `plan_stage` decides from a stage folder's files alone, so every case is set up here with
files (a result.json, a checkpoint's metadata, a `last` link), without training anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kdforge.errors import CheckpointError
from kdforge.layout import LAST, RESULT
from kdforge.rng import STREAMS, rng_stream, stream_seed
from kdforge.train.stages import plan_stage


def finished(stage_dir: Path, fingerprint: str) -> Path:
    checkpoint(stage_dir, fingerprint)
    (stage_dir / RESULT).write_text(json.dumps({"fingerprint": fingerprint, "top1": 0.5}))
    return stage_dir


def checkpoint(stage_dir: Path, fingerprint: str, step: int = 10) -> Path:
    folder = stage_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"),
              metadata={"fingerprint": fingerprint, "step": str(step)})
    (stage_dir / LAST).symlink_to(folder.relative_to(stage_dir))
    return folder


def test_a_finished_stage_with_the_same_settings_is_reused(tmp_path):
    stage = finished(tmp_path / "runs" / "r" / "baseline", "abc")
    plan = plan_stage(stage, "baseline", "abc", tmp_path / "runs")
    assert plan.action == "reuse" and plan.previous["top1"] == 0.5


def test_a_finished_stage_with_other_settings_is_redone_only_when_allowed(tmp_path):
    stage = finished(tmp_path / "runs" / "r" / "baseline", "old")
    with pytest.raises(CheckpointError, match="finished with other settings.*--overwrite"):
        plan_stage(stage, "baseline", "new", tmp_path / "runs")
    plan = plan_stage(stage, "baseline", "new", tmp_path / "runs", retrain_stale=True)
    assert plan.action == "train" and "other settings" in plan.discard
    assert plan_stage(stage, "baseline", "old", tmp_path / "runs", overwrite=True).discard == "--overwrite"


def test_an_unfinished_stage_resumes_only_with_resume(tmp_path):
    stage = tmp_path / "runs" / "r" / "student"
    last = checkpoint(stage, "abc", step=20)
    with pytest.raises(CheckpointError, match="unfinished run.*--resume"):
        plan_stage(stage, "student", "abc", tmp_path / "runs")
    plan = plan_stage(stage, "student", "abc", tmp_path / "runs", resume=True)
    assert plan.action == "resume" and plan.resume_from == last.resolve() and plan.discard is None


def test_an_unfinished_stage_of_an_older_recipe_is_discarded(tmp_path):
    stage = tmp_path / "runs" / "r" / "student"
    checkpoint(stage, "old")
    plan = plan_stage(stage, "student", "new", tmp_path / "runs", resume=True, retrain_stale=True)
    assert plan.action == "train" and plan.resume_from is None and "recipe changed" in plan.discard


def test_a_teacher_finished_in_another_run_is_adopted_not_a_student(tmp_path):
    runs = tmp_path / "runs"
    donor = finished(runs / "other" / "teacher", "same")
    finished(runs / "other" / "student", "same")
    plan = plan_stage(runs / "mine" / "teacher", "teacher", "same", runs)
    assert plan.action == "adopt" and plan.donor == donor
    assert plan_stage(runs / "mine" / "student", "student", "same", runs).action == "train"  # students are not shared
    assert plan_stage(runs / "mine" / "teacher", "teacher", "same", runs, overwrite=True).action == "train"


def test_a_damaged_result_elsewhere_does_not_stop_the_search(tmp_path):
    runs = tmp_path / "runs"
    broken = runs / "broken" / "teacher"
    broken.mkdir(parents=True)
    (broken / RESULT).write_text("{not json")
    donor = finished(runs / "good" / "teacher", "fp")
    assert plan_stage(runs / "mine" / "teacher", "teacher", "fp", runs).donor == donor


def test_random_streams_are_named_and_reproducible():
    with pytest.raises(ValueError, match="unknown random stream"):
        rng_stream(0, "dropout")
    for purpose in STREAMS:
        first, again = (torch.rand(4, generator=rng_stream(3, purpose, 5)) for _ in range(2))
        assert torch.equal(first, again)
    assert not torch.equal(torch.rand(4, generator=rng_stream(3, "augment", 5)),
                           torch.rand(4, generator=rng_stream(3, "augment", 6)))
    # the seeds finished runs were drawn with (their fingerprints and `make demo`'s numbers depend on them)
    assert stream_seed(3, "augment", 5) == 3 * 1_000_003 + 5
    assert stream_seed(3, "cache_view", 2) == (3 * 1_000_003 + 2) * 7_919 + 104_729
