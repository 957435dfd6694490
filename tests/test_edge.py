"""On-device runtimes: ExecuTorch (XNNPACK, FP32 and PT2E INT8) and NCNN, made from the PyTorch student, verified
against it like every format, timed by `kdforge bench`, and refused with the extra to install when missing. (Every
format, the CNN included, is also exported and opened in tests/test_registries.py.)"""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.errors import ExportError

pytestmark = pytest.mark.slow  # ExecuTorch's lowering takes 10-30 s a program on 2 cores
runner = CliRunner()
needs = {module: pytest.mark.skipif(importlib.util.find_spec(module) is None,
                                    reason=f"{module} is part of the dev install (make test)")
         for module in ("executorch", "pnnx")}


@needs["executorch"]
@needs["pnnx"]
def test_a_vit_student_on_executorch_and_ncnn_is_verified_and_benchmarked(make_recipe, tmp_path):
    """A ViT at a fixed input size (timm's dynamic_img_size resamples the position embedding with an operator
    ExecuTorch lacks: that export is one clear error, tested below)."""
    from pathlib import Path

    from kdforge.bench import BenchSettings, bench_export
    from kdforge.export.artifacts import export_run
    from kdforge.fileio import read_metadata
    from kdforge.recipe import load_recipe
    from kdforge.train.stages import train_stage

    from .conftest import TINY_MODELS

    recipe = load_recipe(make_recipe(TINY_MODELS.replace('model = "test_convnext"', 'model = "test_vit"')), [
        "student.model_kwargs.img_size=32", "student.model_kwargs.patch_size=4",
        "student.model_kwargs.dynamic_img_size=false", "train.max_steps=20", "verify.batch_size=100",
        "quantize.calibration=200"])
    stage = Path(train_stage(recipe, "baseline", runs_dir=tmp_path / "runs", consumers=[]).stage_dir)
    result = export_run(stage, ["executorch", "executorch_int8"], exports_dir=tmp_path / "exports")
    assert list(result.artifacts) == ["executorch", "executorch_int8"]  # made from PyTorch, no ONNX
    report = result.reports["executorch"]  # FP32: the same answers
    assert report.passed and report.agreement == 1.0 and report.max_abs_diff < 1e-3, report
    int8 = result.reports["executorch_int8"]
    assert int8.count == 300 and int8.agreement > 0.5
    meta = read_metadata(result.export_dir)["formats"]
    steps = meta["executorch_int8"]["steps"]  # recorded like every INT8 format's (no remedy of its own yet)
    assert [s["step"] for s in steps] == ["ptq"] and steps[0]["passed"] == int8.passed
    assert meta["executorch_int8"]["bytes"] < meta["executorch"]["bytes"] / 2  # INT8 weights
    assert (result.export_dir / "student.pte.json").is_file()  # the input spec, beside the program

    # NCNN holds tensors of at most 4 dimensions: timm's attention (5) is refused in one line, nothing written
    with pytest.raises(ExportError, match="NCNN cannot run this model: pnnx left .*Tensor.reshape"):
        export_run(stage, ["ncnn"], exports_dir=tmp_path / "exports")
    assert not (result.export_dir / "student.ncnn.param").exists()

    bench = bench_export(result.export_dir, BenchSettings(batch_size=8, repeats=5, warmup=1))
    rows = {row.format: row for row in bench.rows}
    assert {"pytorch", "executorch", "executorch_int8"} == set(rows)
    assert rows["executorch"].runtime.startswith("executorch 1.") and rows["executorch_int8"].precision == "int8"
    assert all(rows[name].latency_p50_ms > 0 and rows[name].throughput > 0 for name in rows)


@needs["pnnx"]
def test_a_cnn_on_ncnn_is_verified_and_benchmarked(trained_students, tmp_path):
    from kdforge.bench import BenchSettings, bench_export
    from kdforge.export.artifacts import export_run
    from kdforge.fileio import read_metadata

    result = export_run(trained_students["cnn"], ["ncnn"], exports_dir=tmp_path)
    report = result.reports["ncnn"]  # weights stored in FP16: the fp16 tolerance
    assert report.passed and report.agreement >= 0.99 and report.max_abs_diff < 1e-2, report
    entry = read_metadata(result.export_dir)["formats"]["ncnn"]
    assert entry["precision"] == "fp16" and entry["weights_file"] == "student.ncnn.bin"
    assert all((result.export_dir / f).is_file() for f in ("student.ncnn.bin", "student.ncnn.param.json"))
    rows = {row.format: row for row in bench_export(result.export_dir, BenchSettings(8, 5, 1)).rows}
    assert rows["ncnn"].runtime.startswith("ncnn 1.") and rows["ncnn"].latency_p50_ms > 0


@pytest.mark.parametrize("module,fmt,extra", [("executorch", "executorch", "executorch"), ("pnnx", "ncnn", "ncnn")])
def test_without_its_runtime_a_format_exits_3_naming_the_extra(trained_students, tmp_path, monkeypatch, module,
                                                               fmt, extra):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    result = runner.invoke(app, ["export", str(trained_students["cnn"]), "--format", fmt, "--format", "onnx",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 3, result.output
    assert f'pip install "kdforge[{extra}]"' in " ".join(result.stderr.split())
    assert (tmp_path / "cnn" / "student.onnx").is_file()  # the other formats were still made and verified


@needs["executorch"]
def test_a_model_executorch_cannot_lower_is_one_error_naming_the_fix(trained_students, tmp_path):
    """The shared ViT is built with timm's dynamic_img_size: its export names the setting that makes it lowerable."""
    result = runner.invoke(app, ["export", str(trained_students["vit"]), "--format", "executorch", "--out",
                                 str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "ExecuTorch cannot lower this model" in result.stderr and "dynamic_img_size = false" in result.stderr
    assert not (tmp_path / "vit" / "student.pte").exists()
