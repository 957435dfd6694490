"""What breaks at the size users run (224x224, GPUs) and cannot be seen at 32x32: every forward that is not
training runs without autograd, evaluation memory stays flat over many batches, running out of memory is a user
error that keeps the checkpoints, and the PyTorch reference of verification is true FP32."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.data import ImageDataset
from kdforge.data.synthetic import load_synthetic
from kdforge.data.transforms import InputSpec
from kdforge.distill.cache import build_cache_tensors
from kdforge.distill.teacher import FrozenTeacher
from kdforge.models import create_model, resolve_input_spec
from kdforge.recipe import AugmentConfig, ModelConfig, TeacherCacheConfig
from kdforge.runners import TorchRunner
from kdforge.runtime import Runtime
from kdforge.train.assemble import check_input_size
from kdforge.train.loop import evaluate, predict_logits

from .conftest import SYNTH, TINY_MODELS

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None)
runner = CliRunner()


class ForwardLog:
    """A forward hook recording, for every forward of the model, whether autograd was on and whether the output
    carries a graph."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, bool]] = []

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        model.register_forward_hook(self.hook)
        return model

    def hook(self, module, inputs, output) -> None:
        self.calls.append((torch.is_grad_enabled(), output.grad_fn is not None))

    def assert_inference_only(self, path: str) -> None:
        assert self.calls, f"{path}: the model never ran"
        assert not any(grad for grad, _ in self.calls), f"{path}: forward ran with autograd on"
        assert not any(graph for _, graph in self.calls), f"{path}: an output carries an autograd graph"
        self.calls.clear()


@pytest.fixture(scope="module")
def tiny(synth_root):
    cfg = ModelConfig(model="test_resnet", input_size=32)
    torch.manual_seed(0)
    return create_model(cfg, num_classes=100), resolve_input_spec(cfg), load_synthetic(synth_root, **SYNTH)


def test_every_inference_path_runs_without_autograd(tiny):
    model, spec, data = tiny
    log = ForwardLog()
    log.attach(model)
    model.train()  # as inside the training loop: evaluation must not depend on the caller's mode

    evaluate(model, spec, data.test, 64, CPU, limit_batches=2)
    log.assert_inference_only("evaluate")
    assert model.training, "evaluation restores the training mode"
    predict_logits(model, spec, data.test, 64, CPU, limit_batches=2)
    log.assert_inference_only("predict_logits")
    check_input_size(model, spec, "test_resnet")
    log.assert_inference_only("the input-size check")
    TorchRunner(model, spec, CPU).predict(data.test.images[:8])
    log.assert_inference_only("the PyTorch runner of verification and bench")
    teacher = FrozenTeacher(model, spec)
    teacher(data.train.images[:8])
    log.assert_inference_only("the frozen teacher")
    build_cache_tensors(teacher, data.train, TeacherCacheConfig(views=1, batch_size=500), AugmentConfig(), 0, CPU)
    log.assert_inference_only("the teacher cache")


def test_verification_and_bench_run_the_student_without_autograd(trained_students, tmp_path, monkeypatch):
    import kdforge.models
    from kdforge.bench import BenchSettings, bench_export
    from kdforge.export.artifacts import export_run
    from kdforge.verify import verify_export

    result = export_run(trained_students["cnn"], ["onnx"], exports_dir=tmp_path, verify=False)
    log = ForwardLog()
    real_create = kdforge.models.create_model
    monkeypatch.setattr(kdforge.models, "create_model", lambda *a, **k: log.attach(real_create(*a, **k)))
    verify_export(result.export_dir, "onnx")
    log.assert_inference_only("verify_export")
    bench_export(result.export_dir, BenchSettings(repeats=2, warmup=0, batch_size=4, formats=("pytorch",)))
    log.assert_inference_only("kdforge bench")


# ----------------------------------------------------------------------------------------------------------
# memory over many evaluation batches


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def peak_memory_growth_mb(fn) -> float:
    """How far the process's peak resident memory rises above its current level while `fn` runs (Linux: the
    peak is reset through /proc/self/clear_refs)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kb("VmRSS")
    fn()
    return (_rss_kb("VmHWM") - before) / 1024


needs_proc = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                reason="peak memory is read from Linux's /proc/self (clear_refs, VmHWM)")


def evaluation_growth(model: torch.nn.Module, size: int, batch: int = 4, few: int = 2, many: int = 8):
    """Peak memory growth of evaluating `few` and then `many` batches of `batch` images at size x size."""
    images = torch.randint(0, 256, (batch * many, 3, 32, 32), dtype=torch.uint8)
    data = ImageDataset(images, torch.zeros(len(images), dtype=torch.int64), tuple(map(str, range(1000))))
    spec = InputSpec(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    model.train()
    evaluate(model, spec, data, batch, CPU, limit_batches=1)  # warm-up: allocator pools, lazy initialisation
    return (peak_memory_growth_mb(lambda: evaluate(model, spec, data, batch, CPU, limit_batches=few)),
            peak_memory_growth_mb(lambda: evaluate(model, spec, data, batch, CPU, limit_batches=many)))


@needs_proc
@pytest.mark.slow
def test_evaluation_memory_does_not_grow_with_the_number_of_batches():
    # resnet18 at 224: a kept autograd graph is ~100 MB per batch of 4, so 8 batches would hold ~800 MB
    model = create_model(ModelConfig(model="resnet18"), num_classes=100)
    few, many = evaluation_growth(model, 224)
    assert many < few + 100, f"peak memory grew {few:.0f} MB over 2 batches but {many:.0f} MB over 8"


# ----------------------------------------------------------------------------------------------------------
# running out of memory


def _inject(monkeypatch, error: Exception, when_training: bool, after: int) -> None:
    """Every model the stages create raises `error` on its forward number `after` + 1 in training (or eval)."""
    import kdforge.train.assemble as assemble  # where every training run's model is built

    real_create = assemble.create_model
    calls = [0]

    def hook(module, inputs):
        if module.training == when_training:
            calls[0] += 1
            if calls[0] > after:
                raise error

    def create(*args, **kwargs):
        model = real_create(*args, **kwargs)
        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(assemble, "create_model", create)


@pytest.mark.slow
@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB in use)"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9663676416 bytes"),
], ids=["cuda", "cpu-allocator"])
def test_out_of_memory_in_training_is_one_error_line_and_resume_continues(make_recipe, tmp_path, monkeypatch,
                                                                          error):
    recipe = make_recipe(TINY_MODELS + "\n[teacher.train]\nepochs = 2\n")
    runs = tmp_path / "runs"
    _inject(monkeypatch, error, when_training=True, after=25)  # epoch 1 is 18 steps: its checkpoint exists
    result = runner.invoke(app, ["teacher", str(recipe), "--runs-dir", str(runs)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output and len(errors) == 1 and errors[0].startswith("error: out of memory")
    message = errors[0]
    for words in ("teacher test_resnet", "training at batch size 50", "lower the batch size", "--resume"):
        assert words in message, words
    stage_dir = runs / "tiny" / "teacher"
    # 900 training images (100 held out for validation) in batches of 50: 18 steps an epoch
    assert (stage_dir / "last").resolve().name == "step-00000018" and not (stage_dir / "result.json").exists()

    monkeypatch.undo()
    resumed = runner.invoke(app, ["teacher", str(recipe), "--runs-dir", str(runs), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((stage_dir / "result.json").read_text())["steps"] == 36


@pytest.mark.slow
def test_out_of_memory_in_evaluation_names_evaluation_and_what_to_change(make_recipe, tmp_path, monkeypatch):
    recipe = make_recipe(TINY_MODELS)
    _inject(monkeypatch, torch.OutOfMemoryError("CUDA out of memory."), when_training=False, after=1)
    result = runner.invoke(app, ["baseline", str(recipe), "--runs-dir", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert "out of memory in baseline test_convnext" in message and "while evaluating at batch size 50" in message
    assert "train.limit_eval_batches" in message


@pytest.mark.slow
def test_other_runtime_errors_are_not_disguised_as_out_of_memory(make_recipe, tmp_path, monkeypatch):
    from kdforge.recipe import load_recipe
    from kdforge.train.stages import train_stage

    _inject(monkeypatch, RuntimeError("mat1 and mat2 shapes cannot be multiplied"), when_training=True, after=0)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train_stage(load_recipe(make_recipe(TINY_MODELS)), "teacher", runs_dir=tmp_path, consumers=[])


# ----------------------------------------------------------------------------------------------------------
# the FP32 reference


def test_the_pytorch_reference_runs_with_tf32_off_and_restores_it(tiny):
    model, spec, data = tiny
    seen = []
    handle = model.register_forward_hook(
        lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the GPU defaults at worst
    try:
        reference = TorchRunner(model, spec, CPU)
        reference.predict(data.test.images[:4])
        assert seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        assert reference.name == "pytorch (cpu, fp32)"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        handle.remove()


# ----------------------------------------------------------------------------------------------------------
# the GPU acceptance script, smoke-run on CPU


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_cpu(tmp_path, capsys):
    import importlib.util

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", script)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--steps", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["passed"] and [r["recipe"] for r in result["recipes"]] == gpu_check.RECIPES
    for row in result["recipes"]:
        assert set(row["stages"]) == {"teacher", "baseline", "student"}, row
        assert all(s["images_per_s"] > 0 for s in row["stages"].values())
        assert {name for name, e in row["exports"].items() if e["passed"]} == {"onnx", "fp16", "int8"}, row
    # each distillation method's training rate on each recipe's pair (informational on a GPU; here: it runs)
    assert sorted(result["methods"]) == sorted(gpu_check.RECIPES)
    assert all(set(rates) == {"kd", "dist", "dkd", "ofa", "fitnet"} and all(r["images_per_s"] > 0 for r in
               rates.values()) for rates in result["methods"].values()), result["methods"]
    printed = capsys.readouterr().out
    assert "| vit_to_mobilevit | teacher |" in printed and "| resnet_to_resnet | int8 |" in printed
    assert "fitnet img/s (GiB)" in printed
