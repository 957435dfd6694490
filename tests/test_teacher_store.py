"""The sharded teacher store ([distill.teacher_cache] store): the same answers as the one-file cache, built by
every process (each rank its shards), read by position from memory-mapped shards, reused by key, and a damaged or
missing shard built again, alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kdforge.distill.cache import load_or_build_cache
from kdforge.distill.store import SHARD, build_shards, load_or_build_store, open_store
from kdforge.errors import KdforgeError
from kdforge.phases import on_notes
from kdforge.recipe import AugmentConfig, TeacherCacheConfig

from .test_scale import CPU, teacher_and_data  # noqa: F401 - the fixture

SHARD_IMAGES = 300  # the small synthetic set: 1,000 training images, 4 shards


def store(folder, teacher, data, rank=0, world=1, key="k", views=2, topk=None, notes=None):
    cfg = TeacherCacheConfig(views=views, topk=topk, batch_size=128, store=str(folder), shard_images=SHARD_IMAGES)
    runtime = dataclasses.replace(CPU, rank=rank, world_size=world)
    return load_or_build_store(folder, key, teacher, data.train, cfg, AugmentConfig(), 0, runtime, 100,
                               [on_notes(notes.append)] if notes is not None else ())


def shard_tensors(folder, key="k"):
    """Copies of every shard's tensors (load_file's may be mapped from the file a test then damages)."""
    return {path.name: {name: t.clone() for name, t in load_file(str(path)).items()}
            for path in sorted((folder / key).glob("shard-*.safetensors"))}


@pytest.mark.parametrize("topk", [None, 10])
def test_the_store_answers_as_the_one_file_cache_does(tmp_path, teacher_and_data, topk):  # noqa: F811
    teacher, data = teacher_and_data
    cfg = TeacherCacheConfig(views=2, topk=topk, batch_size=128)
    whole = load_or_build_cache(tmp_path / "cache.safetensors", "k", teacher, data.train, cfg, AugmentConfig(), 0, CPU)
    sharded = store(tmp_path / "store", teacher, data, topk=topk)
    assert len(sharded.shards) == -(-len(data.train) // SHARD_IMAGES) > 1
    assert all(isinstance(array, np.memmap) for shard in sharded.shards for array in shard.values())  # not loaded
    idx = torch.tensor([0, 299, 300, 650, len(data.train) - 1, 7, 599])  # across shard boundaries
    for epoch in (0, 1, 2):
        images, logits = whole.batch(data.train.images, idx, epoch)
        same_images, same_logits = sharded.batch(data.train.images, idx, epoch)
        assert torch.equal(images, same_images)
        torch.testing.assert_close(same_logits, logits, rtol=0, atol=1e-2)  # FP16 answers of other batches


@pytest.mark.slow
def test_two_processes_build_the_store_one_process_builds_each_shard_once_and_it_is_reused(tmp_path,
                                                                                            teacher_and_data):  # noqa: F811
    teacher, data = teacher_and_data
    alone = tmp_path / "alone"
    store(alone, teacher, data)
    together, notes = tmp_path / "together", []
    cfg = TeacherCacheConfig(views=2, batch_size=128, store=str(together), shard_images=SHARD_IMAGES)
    ranks = [dataclasses.replace(CPU, rank=rank, world_size=2) for rank in (0, 1)]
    assert build_shards(together, "k", teacher, data.train, cfg, AugmentConfig(), 0, ranks[1], 100) == [1, 3]
    with pytest.raises(KdforgeError, match=r"shard-000000.safetensors, shard-000002.safetensors missing"):
        open_store(together, "k", data.train, cfg, AugmentConfig(), 0, ranks[1], 100)  # rank 0's not there yet
    assert build_shards(together, "k", teacher, data.train, cfg, AugmentConfig(), 0, ranks[0], 100) == [0, 2]
    mine, theirs = shard_tensors(alone), shard_tensors(together)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name].keys() == theirs[name].keys()
        assert all(torch.equal(mine[name][t], theirs[name][t]) for t in mine[name])

    # a second run (another student, another machine reading the same folder) reuses it: nothing is rewritten
    times = {path.name: path.stat().st_mtime_ns for path in (together / "k").glob("shard-*")}
    notes.clear()
    store(together, teacher, data, notes=notes)
    assert notes == [f"teacher store: reusing {together / 'k'} ({len(times)} shards)"]
    assert times == {path.name: path.stat().st_mtime_ns for path in (together / "k").glob("shard-*")}
    # another key (a retrained teacher, other settings) is another folder beside it
    store(together, teacher, data, key="other", views=1)
    assert (together / "other").is_dir() and (together / "k").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "another key", "garbage header", "missing"])
def test_a_damaged_or_missing_shard_is_built_again_alone(tmp_path, teacher_and_data, damage):  # noqa: F811
    teacher, data = teacher_and_data
    folder = tmp_path / "store"
    store(folder, teacher, data)
    good = shard_tensors(folder)
    victim = folder / "k" / SHARD.format(1)
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-100])
    elif damage == "another key":
        store(tmp_path / "elsewhere", teacher, data, key="x")
        victim.write_bytes((tmp_path / "elsewhere" / "x" / SHARD.format(1)).read_bytes())
    elif damage == "garbage header":
        victim.write_bytes(b"\xff" * 8 + victim.read_bytes()[8:])
    else:
        victim.unlink()
    others = {path.name: path.stat().st_mtime_ns for path in (folder / "k").glob("shard-*") if path != victim}
    notes = []
    cache = store(folder, teacher, data, notes=notes)
    assert notes[0].startswith("teacher store: building 1 of")
    assert others == {path.name: path.stat().st_mtime_ns for path in (folder / "k").glob("shard-*") if path != victim}
    assert all(torch.equal(good[victim.name][t], load_file(str(victim))[t]) for t in good[victim.name])
    assert cache.logits(torch.tensor([0]), torch.tensor([SHARD_IMAGES + 5])).shape == (1, 100)


@pytest.mark.slow
def test_kdforge_teacher_cache_builds_the_store_and_two_student_runs_read_it(make_recipe, tmp_path):
    import json

    from typer.testing import CliRunner

    from kdforge.cli import app
    from kdforge.pipeline import run_distill
    from kdforge.recipe import load_recipe
    from kdforge.train.stages import train_stage

    from .conftest import TINY_MODELS

    folder, runs = tmp_path / "store", tmp_path / "runs"
    overrides = ["train.max_steps=6", "train.limit_eval_batches=1", "distill.baseline=false",
                 "distill.teacher_cache.views=2", f"distill.teacher_cache.store={folder}",
                 f"distill.teacher_cache.shard_images={SHARD_IMAGES}", "quantize.enabled=false", "export.formats=[]"]
    path = make_recipe(TINY_MODELS)
    args = ["teacher-cache", str(path), "--runs-dir", str(runs), *[a for o in overrides for a in ("--set", o)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "no trained teacher" in result.output and not folder.exists()
    recipe = load_recipe(path, overrides)
    train_stage(recipe, "teacher", runs_dir=runs, consumers=[])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"teacher answers for 900 training images x 2 view(s) in {folder}" in result.output
    (key,) = [p.name for p in folder.iterdir()]
    shards = {p.name: p.stat().st_mtime_ns for p in (folder / key).glob("shard-*")}
    assert len(shards) == 3  # 900 images (10% held out for validation), 300 a shard

    notes = []
    from kdforge.phases import on_notes

    run_distill(recipe, runs_dir=runs, consumers=[on_notes(notes.append)])
    lines = (runs / recipe.name / "student" / "metrics.jsonl").read_text().splitlines()
    assert any(json.loads(line).get("loss_kd") is not None for line in lines)
    assert f"teacher store: reusing {folder / key} (3 shards)" in notes
    # another student, another run, the first run's teacher: the same answers, nothing rebuilt
    other = load_recipe(path, [*overrides, "name=other", "student.model=test_resnet",
                               f"teacher.checkpoint={runs / recipe.name / 'teacher'}"])
    notes.clear()
    run_distill(other, runs_dir=runs, consumers=[on_notes(notes.append)])
    assert f"teacher store: reusing {folder / key} (3 shards)" in notes
    assert shards == {p.name: p.stat().st_mtime_ns for p in (folder / key).glob("shard-*")}
    assert not (runs / recipe.name / "teacher_cache.safetensors").exists()


@pytest.mark.heavy
def test_two_processes_of_kdforge_teacher_cache_build_the_store_one_process_builds(make_recipe, tmp_path):
    """`kdforge teacher-cache --nproc 2` (torchrun, gloo): each rank builds its shards; the store equals the one a
    single process builds, shard for shard."""
    import os
    import subprocess
    import sys

    from kdforge.recipe import load_recipe
    from kdforge.train.stages import build_teacher_cache, train_stage

    from .conftest import TINY_MODELS

    runs = tmp_path / "runs"
    common = ["train.max_steps=4", "train.limit_eval_batches=1", "distill.teacher_cache.views=2",
              f"distill.teacher_cache.shard_images={SHARD_IMAGES}", "runtime.threads=1"]
    path = make_recipe(TINY_MODELS)
    alone = load_recipe(path, [*common, f"distill.teacher_cache.store={tmp_path / 'alone'}"])
    train_stage(alone, "teacher", runs_dir=runs, consumers=[])
    build_teacher_cache(alone, runs, consumers=[])
    args = [a for o in [*common, f"distill.teacher_cache.store={tmp_path / 'two'}"] for a in ("--set", o)]
    done = subprocess.run([sys.executable, "-m", "kdforge", "teacher-cache", str(path), "--runs-dir", str(runs),
                           "--nproc", "2", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launching 2 processes" in done.stderr and done.stdout.count("teacher answers for") == 1
    (key,) = [p.name for p in (tmp_path / "alone").iterdir()]
    mine, theirs = shard_tensors(tmp_path / "alone", key), shard_tensors(tmp_path / "two", key)
    assert mine.keys() == theirs.keys() and len(mine) == 3
    for name in mine:
        assert all(torch.equal(mine[name][t], theirs[name][t]) for t in mine[name]), name
