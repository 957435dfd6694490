"""Training at speed and scale: the teacher output cache, runtime decisions, and 2-process DDP on gloo."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from kdforge.data.synthetic import load_synthetic
from kdforge.data.transforms import apply_augment
from kdforge.distill.cache import load_or_build_cache, view_augment
from kdforge.distill.teacher import FrozenTeacher
from kdforge.models import create_model, resolve_input_spec
from kdforge.phases import on_notes
from kdforge.pipeline import run_distill
from kdforge.recipe import AugmentConfig, ModelConfig, RuntimeConfig, TeacherCacheConfig, load_recipe
from kdforge.runtime import Runtime, is_cnn, runtime_scope

from .conftest import SYNTH

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None)


@pytest.fixture(scope="module")
def teacher_and_data(synth_root):
    cfg = ModelConfig(model="test_resnet", input_size=32)
    torch.manual_seed(0)
    model = create_model(cfg, num_classes=100)
    data = load_synthetic(synth_root, **SYNTH)
    return FrozenTeacher(model, resolve_input_spec(cfg)), data


def build(tmp_path, teacher, data, views=3, topk=None, augment=None, key="k", notes=None):
    augment = augment or AugmentConfig()
    cfg = TeacherCacheConfig(views=views, topk=topk, batch_size=128)
    return load_or_build_cache(tmp_path / "cache.safetensors", key, teacher, data.train, cfg, augment, 0, CPU,
                               [on_notes(notes.append)] if notes is not None else ())


def test_cached_logits_equal_a_fresh_teacher_forward_on_the_same_view(tmp_path, teacher_and_data):
    teacher, data = teacher_and_data
    cache = build(tmp_path, teacher, data)
    idx = torch.arange(0, 200, 3)
    for epoch in (0, 1):
        images, cached = cache.batch(data.train.images, idx, epoch)
        fresh = teacher(images)
        assert cached.dtype == torch.float32 and cached.shape == fresh.shape == (len(idx), 100)
        torch.testing.assert_close(cached, fresh, rtol=2e-3, atol=2e-3 * fresh.abs().max().item())
    # each image draws one of its 3 views per epoch: different epochs, different views for many images
    before = cache._choice[idx].clone()
    cache.batch(data.train.images, idx, 2)
    assert (before != cache._choice[idx]).any() and set(before.tolist()) == {0, 1, 2}
    # a view is a pure function of (seed, view, image): view 1 of image 7 is the same image every time
    offsets, flips = view_augment(len(data.train), 1, 0, AugmentConfig())
    again, _ = view_augment(len(data.train), 1, 0, AugmentConfig())
    assert torch.equal(offsets, again)
    one = apply_augment(data.train.images[[7]], 4, offsets[:, [7]], flips[[7]])
    torch.testing.assert_close(cache.logits(torch.tensor([1]), torch.tensor([7])), teacher(one),
                               rtol=2e-3, atol=2e-3 * teacher(one).abs().max().item())


def test_top_k_cache_keeps_the_largest_logits_exactly_and_the_tail_mass(tmp_path, teacher_and_data):
    teacher, data = teacher_and_data
    cache = build(tmp_path, teacher, data, views=1, topk=10, augment=AugmentConfig(crop_padding=0, hflip=False))
    idx = torch.arange(50)
    images, cached = cache.batch(data.train.images, idx, 0)
    fresh = teacher(images)
    values, indices = fresh.topk(10, dim=1)
    torch.testing.assert_close(cached.gather(1, indices), values, rtol=2e-3, atol=2e-3 * values.abs().max().item())
    top_mass = lambda logits: logits.softmax(1).gather(1, indices).sum(1)  # noqa: E731
    torch.testing.assert_close(top_mass(cached), top_mass(fresh), rtol=0, atol=2e-3)


def test_one_view_without_augmentation_is_classic_offline_kd(tmp_path, teacher_and_data):
    teacher, data = teacher_and_data
    cache = build(tmp_path, teacher, data, views=1, augment=AugmentConfig(crop_padding=0, hflip=False))
    idx = torch.arange(10, 30)
    images, first = cache.batch(data.train.images, idx, 0)
    assert torch.equal(images, data.train.images[idx])  # the images as they are
    _, later = cache.batch(data.train.images, idx, 5)
    assert torch.equal(first, later)  # the same teacher answer every epoch


def test_the_cache_is_reused_for_the_same_key_and_regenerated_for_another(tmp_path, teacher_and_data):
    teacher, data = teacher_and_data
    notes = []
    build(tmp_path, teacher, data, views=1, key="a", notes=notes)
    build(tmp_path, teacher, data, views=1, key="a", notes=notes)
    build(tmp_path, teacher, data, views=1, key="b", notes=notes)
    assert "running the teacher on 1 view(s)" in notes[0]
    assert any(n.startswith("teacher cache: reusing") for n in notes)
    assert any("key changed" in n for n in notes)


@pytest.mark.slow
def test_distillation_from_the_cache_trains_and_a_new_teacher_invalidates_it(make_recipe, tmp_path):
    from .conftest import TINY_MODELS

    recipe = load_recipe(make_recipe(TINY_MODELS), ["train.max_steps=6", "train.limit_eval_batches=1",
                                                    "distill.teacher_cache.views=2", "distill.baseline=false"])
    run_distill(recipe, runs_dir=tmp_path / "runs", consumers=[])
    cache_file = tmp_path / "runs" / "tiny" / "teacher_cache.safetensors"
    first = load_file(str(cache_file))["logits"]
    # a view of every training image (the 10% held out for validation are not trained on)
    assert first.shape == (2, SYNTH["train"] * 9 // 10, 100) and first.dtype == torch.float16
    lines = (tmp_path / "runs" / "tiny" / "student" / "metrics.jsonl").read_text().splitlines()
    assert any(json.loads(line).get("loss_kd") is not None for line in lines)
    # a retrained teacher (other seed of its model) changes the cache key: the logits are generated again
    recipe = load_recipe(make_recipe(TINY_MODELS), ["train.max_steps=6", "train.limit_eval_batches=1",
                                                    "distill.teacher_cache.views=2", "distill.baseline=false",
                                                    "teacher.train.lr=1e-3"])
    run_distill(recipe, runs_dir=tmp_path / "runs", consumers=[])
    assert not torch.equal(load_file(str(cache_file))["logits"], first)


def test_runtime_decides_channels_last_and_compile_off_on_cpu_unless_asked():
    cnn, vit = create_model(ModelConfig(model="test_resnet"), 10), create_model(ModelConfig(model="test_vit"), 10)
    assert is_cnn(cnn) and not is_cnn(vit)
    with runtime_scope(RuntimeConfig(device="cpu")) as rt:
        assert rt.amp_dtype is None and not rt.uses_channels_last(cnn) and not rt.compile
        assert rt.for_training(cnn) is cnn and rt.world_size == 1 and rt.is_main
    cuda = Runtime(device=torch.device("cuda"), amp_dtype=torch.bfloat16)
    assert cuda.uses_channels_last(cnn) and not cuda.uses_channels_last(vit)
    with runtime_scope(RuntimeConfig(device="cpu", channels_last=True)) as rt:
        x = rt.format_input(rt.place(cnn), torch.zeros(2, 3, 32, 32))
        assert x.is_contiguous(memory_format=torch.channels_last)
        conv = next(m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.heavy
def test_two_gloo_processes_match_one_process_and_two_nodes_match_one_node(tmp_path, synth_root):
    """--nproc 2 on one node trains what one process trains (same data order, averaged gradients) and writes each
    file once; two torchrun agents meeting at a c10d rendezvous (2 "nodes" on localhost, 1 process each, one
    shared runs folder) train exactly what the 2-process single-node run trains."""
    recipe = tmp_path / "ddp.toml"
    recipe.write_text(
        f'name = "ddp"\n[data]\ndataset = "synthetic"\nroot = "{synth_root}"\n'
        f"synthetic = {{ train = {SYNTH['train']}, test = {SYNTH['test']}, seed = 0 }}\n"
        '[runtime]\ndevice = "cpu"\nthreads = 1\n[train]\nepochs = 1\nbatch_size = 50\nlr = 3e-3\nlog_every = 5\n'
        '[teacher]\nmodel = "test_convnext"\ninput_size = 32\n'  # LayerNorm models: no per-process batch stats
        '[student]\nmodel = "test_vit"\ninput_size = 32\nmodel_kwargs = { img_size = 32, patch_size = 4 }\n'
        "[distill]\nbaseline = false\nteacher_cache = { views = 2 }\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path / f"runs{nproc}"
        command = [sys.executable, "-m", "kdforge", "distill", str(recipe), "--runs-dir", str(runs[nproc]),
                   "--nproc", str(nproc)]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        if nproc == 2:
            assert "launching 2 processes" in done.stderr
            assert done.stdout.count("distillation:") == 1  # one summary: only rank 0 prints
    for stage in ("teacher", "student"):
        one, two = (runs[n] / "ddp" / stage for n in (1, 2))
        a, b = load_file(str(one / "last" / "model.safetensors")), load_file(str(two / "last" / "model.safetensors"))
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-3
        results = [json.loads((d / "result.json").read_text()) for d in (one, two)]
        assert abs(results[0]["top1"] - results[1]["top1"]) <= 0.01 and results[1]["steps"] == results[0]["steps"]
        # checkpoints and metrics written once, by rank 0
        assert sorted(p.name for p in (two / "checkpoints").iterdir()) == sorted(
            p.name for p in (one / "checkpoints").iterdir())
        assert not list(two.glob("**/*.tmp*"))
        assert len((two / "metrics.jsonl").read_text().splitlines()) == len(
            (one / "metrics.jsonl").read_text().splitlines())
    torch.testing.assert_close(load_file(str(runs[2] / "ddp" / "teacher_cache.safetensors"))["logits"],
                               load_file(str(runs[1] / "ddp" / "teacher_cache.safetensors"))["logits"],
                               rtol=0, atol=1e-2)

    # two nodes: the same command on each, meeting at one endpoint
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{free.getsockname()[1]}"
    nodes_dir = tmp_path / "runs-nodes"
    command = [sys.executable, "-m", "kdforge", "distill", str(recipe), "--runs-dir", str(nodes_dir), "--nnodes", "2",
               "--rdzv-endpoint", endpoint]
    agents = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    outputs = [agent.communicate(timeout=600) for agent in agents]
    for agent, (_, stderr) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, stderr[-3000:]
        assert f"one of 2 meeting at {endpoint}" in stderr
    assert sum(stdout.count("distillation:") for stdout, _ in outputs) == 1  # one summary, from global rank 0
    for stage in ("teacher", "student"):
        one_node, two_nodes = (d / "ddp" / stage / "last" / "model.safetensors" for d in (runs[2], nodes_dir))
        a, b = load_file(str(one_node)), load_file(str(two_nodes))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{stage}: 2 nodes x 1 process differ from 1 node x 2"
        assert json.loads((nodes_dir / "ddp" / stage / "result.json").read_text())["top1"] == json.loads(
            (runs[2] / "ddp" / stage / "result.json").read_text())["top1"]


def test_multi_node_launch_command_and_its_errors():
    from kdforge.errors import KdforgeError
    from kdforge.runtime import torchrun_command

    assert torchrun_command(["distill", "r.toml"], nproc=4)[2:] == [
        "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "kdforge", "distill", "r.toml"]
    command = torchrun_command(["distill", "r.toml"], nproc=8, nnodes=2, rdzv_endpoint="node0:29400", rdzv_id="r")
    assert command[3:8] == ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--rdzv-id=r",
                            "--nproc-per-node=8"]
    for endpoint in (None, "node0", "node0:port"):
        with pytest.raises(KdforgeError, match="needs --rdzv-endpoint HOST:PORT"):
            torchrun_command(["distill", "r.toml"], nnodes=2, rdzv_endpoint=endpoint)


@pytest.mark.slow
def test_loop_parity_benchmark_runs_the_real_loop_and_prints_ratios(capsys):
    """benchmarks/loop_parity.py in smoke form: kdforge's `fit` and the cache build against their hand-written
    counterparts, four rows with positive speeds (the ratios themselves are the benchmark's, not a test's)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "loop_parity.py"
    spec = importlib.util.spec_from_file_location("loop_parity", script)
    loop_parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop_parity)
    rows = loop_parity.main(["--teacher", "test_resnet", "--student", "test_convnext", "--batch", "16", "--steps",
                             "3", "--warmup", "1", "--threads", "1"])
    assert [r["what"] for r in rows] == ["plain training", "online KD", "teacher cache build (2 views)", "cached KD"]
    assert all(r["kdforge_images_per_s"] > 0 and r["hand_written_images_per_s"] > 0 and r["ratio"] > 0
               for r in rows)
    assert "ratio" in capsys.readouterr().out


def test_cpu_training_speed_benchmark_measures_both_layouts(capsys):
    """benchmarks/cpu_training_speed.py in smoke form: a row per model and memory layout, positive speeds."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "cpu_training_speed.py"
    spec = importlib.util.spec_from_file_location("cpu_training_speed", script)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    rows = benchmark.main(["--models", "test_resnet", "--batch", "8", "--steps", "2", "--warmup", "1",
                           "--threads", "1"])
    assert [(r["model"], r["layout"]) for r in rows] == [("test_resnet", "nchw"), ("test_resnet", "channels_last")]
    assert all(r["train"] > 0 and r["inference"] > 0 for r in rows)
    assert "threads" in capsys.readouterr().out  # the machine is named with the numbers
