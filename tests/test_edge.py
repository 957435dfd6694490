"""On-device runtimes: ExecuTorch (XNNPACK, FP32 and PT2E INT8), LiteRT (FP32 and full-integer INT8) and NCNN, made
from the PyTorch student, verified against it like every format, timed by `kdforge bench`, served where the runtime
runs without torch, and refused with the extra to install when missing. (Every format, the CNN included, is also
exported, opened and, when servable, served in tests/test_registries.py.)"""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.errors import ExportError

pytestmark = pytest.mark.slow
heavy = pytest.mark.heavy  # ExecuTorch's lowering takes 10-30 s a program on 2 cores
runner = CliRunner()
needs = {module: pytest.mark.skipif(importlib.util.find_spec(module) is None,
                                    reason=f"{module} is part of the dev install (make test)")
         for module in ("executorch", "pnnx", "litert_torch")}


@heavy
@needs["executorch"]
@needs["pnnx"]
@needs["litert_torch"]
def test_a_vit_student_on_executorch_litert_and_ncnn_is_verified_and_benchmarked(make_recipe, tmp_path):
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
        "student.model_kwargs.dynamic_img_size=false", "student.model_kwargs.depth=2", "train.max_steps=20",
        "verify.batch_size=100",
        "quantize.calibration=200"])
    stage = Path(train_stage(recipe, "baseline", runs_dir=tmp_path / "runs", consumers=[]).stage_dir)
    formats = ["executorch", "executorch_int8", "litert", "litert_int8"]
    result = export_run(stage, formats, exports_dir=tmp_path / "exports")
    assert list(result.artifacts) == formats  # made from PyTorch, no ONNX
    for fp32 in ("executorch", "litert"):  # FP32: the same answers
        report = result.reports[fp32]
        assert report.passed and report.agreement == 1.0 and report.max_abs_diff < 1e-3, (fp32, report)
    for name in ("executorch_int8", "litert_int8"):
        int8 = result.reports[name]
        assert int8.count == 300 and int8.agreement > 0.5, (name, int8)
    meta = read_metadata(result.export_dir)["formats"]
    # a ViT's reshapes hold LiteRT's batch of 1: found at export, its runner goes one image at a time
    assert meta["litert"]["batch_axis"] is False and meta["litert"]["input_layout"] == "NCHW"
    assert meta["litert_int8"]["io"].startswith("int8")
    assert meta["litert_int8"]["calibration_images"] == meta["executorch_int8"]["calibration_images"] > 0
    assert meta["litert_int8"]["bytes"] < meta["litert"]["bytes"] / 2
    steps = meta["executorch_int8"]["steps"]  # recorded like every INT8 format's
    assert steps[0]["step"] == "ptq" and steps[-1]["passed"] == result.reports["executorch_int8"].passed
    assert meta["executorch_int8"]["bytes"] < meta["executorch"]["bytes"] / 2  # INT8 weights
    assert (result.export_dir / "student.pte.json").is_file()  # the input spec, beside the program

    # NCNN holds tensors of at most 4 dimensions: timm's attention (5) is refused in one line, nothing written
    with pytest.raises(ExportError, match="NCNN cannot run this model: pnnx left .*Tensor.reshape"):
        export_run(stage, ["ncnn"], exports_dir=tmp_path / "exports")
    assert not (result.export_dir / "student.ncnn.param").exists()

    bench = bench_export(result.export_dir, BenchSettings(batch_size=8, repeats=5, warmup=1))
    rows = {row.format: row for row in bench.rows}
    assert {"pytorch", *formats} == set(rows)
    assert rows["executorch"].runtime.startswith("executorch 1.") and rows["executorch_int8"].precision == "int8"
    assert rows["litert_int8"].runtime.startswith("litert 2.") and "INT8 I/O" in rows["litert_int8"].runtime
    assert all(rows[name].latency_p50_ms > 0 and rows[name].throughput > 0 for name in rows)


@heavy
@needs["executorch"]
def test_a_failing_pt2e_int8_escalates_to_the_accuracy_aware_search(make_recipe, tmp_path):
    """The escalation rule of the ONNX INT8 on a PT2E format: when PTQ fails verification, the accuracy-aware step
    (sensitive layers in float, judged on held-out images) is tried, verified and recorded."""
    from pathlib import Path

    from kdforge.export.artifacts import export_run
    from kdforge.fileio import read_metadata
    from kdforge.recipe import load_recipe
    from kdforge.train.stages import train_stage

    from .conftest import TINY_MODELS

    recipe = load_recipe(make_recipe(TINY_MODELS.replace('model = "test_convnext"', 'model = "test_vit"')), [
        "student.model_kwargs.img_size=32", "student.model_kwargs.patch_size=4",
        "student.model_kwargs.dynamic_img_size=false", "student.model_kwargs.depth=1", "train.max_steps=10",
        "verify.batch_size=100", "quantize.calibration=64", "verify.int8.min_agreement=1.0"])
    stage = Path(train_stage(recipe, "baseline", runs_dir=tmp_path / "runs", consumers=[]).stage_dir)
    result = export_run(stage, ["executorch_int8"], exports_dir=tmp_path / "exports")
    entry = read_metadata(result.export_dir)["formats"]["executorch_int8"]
    assert [s["step"] for s in entry["steps"]] == ["ptq", "accuracy_aware"]  # 100% agreement: PTQ cannot pass
    assert entry["method"] == "accuracy_aware" and entry["trials"] >= 1 and isinstance(entry["float_layers"], list)
    assert any(note.startswith("executorch_int8: ") and ": accuracy_aware (ptq: top-1" in note
               for note in result.notes), result.notes


@heavy
@needs["executorch"]
def test_the_pt2e_search_keeps_layers_in_float_until_the_held_out_drop_is_within_bounds():
    """Calibrated on black images, INT8 clamps every activation and answers one class: the search keeps 1, 2, 4, ...
    layers in float, the first and last layer first, and stops when no held-out answer is lost or all are float."""
    import numpy as np
    import torch
    from torch import nn

    from kdforge.export.edge import pt2e_sensitive_layers, quantizable_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, bias=False), nn.Flatten(), nn.Linear(8 * 2 * 2, 8, bias=False),
                          nn.Linear(8, 5, bias=False)).eval()
    heldout = [torch.randn(64, 3, 8, 8).numpy()]
    with torch.no_grad():
        labels = model(torch.from_numpy(heldout[0])).argmax(1).numpy()  # FP32 is right on every image
    assert len(set(labels.tolist())) > 1
    layers = quantizable_layers(model)
    search = pt2e_sensitive_layers(model, 8, [np.zeros((8, 3, 8, 8), np.float32)], "executorch", heldout, labels,
                                   max_drop=0.0)
    assert search.kept[:2] == [layers[0], layers[-1]] and set(search.kept) <= set(layers)
    sizes = [0, 1, 2, 4, 8, 16, 32, 64][:search.tried]
    assert len(search.kept) == min(sizes[-1], len(layers)), (search.tried, len(search.kept))
    assert search.final_drop <= 0.0 or len(search.kept) == len(layers)
    assert set(search.sensitivity) == set(layers) and all(v >= 0 for v in search.sensitivity.values())


@heavy
@needs["pnnx"]
@needs["litert_torch"]
def test_a_cnn_on_ncnn_and_litert_is_verified_benchmarked_and_served(every_format, monkeypatch):
    import numpy as np

    from kdforge.bench import BenchSettings, bench_export
    from kdforge.errors import ServingError
    from kdforge.fileio import read_metadata
    from kdforge.serve.model import ServedModel

    result = every_format[0]  # the small CNN exported to every format, ncnn, litert and litert_int8 among them
    report = result.reports["ncnn"]  # weights stored in FP16: the fp16 tolerance
    assert report.passed and report.agreement >= 0.99 and report.max_abs_diff < 1e-2, report
    assert result.reports["litert"].passed and result.reports["litert"].agreement == 1.0
    assert result.reports["litert_int8"].agreement > 0.5
    meta = read_metadata(result.export_dir)["formats"]
    entry = meta["ncnn"]
    assert entry["precision"] == "fp16" and entry["weights_file"] == "student.ncnn.bin"
    assert all((result.export_dir / f).is_file() for f in ("student.ncnn.bin", "student.ncnn.param.json"))
    # LiteRT's converter fails on this ConvNeXt at batch 1 (a channels-last linear on its 1x1 last map): converted at
    # 2, run in chunks of 2 (the last padded), and verified like any file
    assert meta["litert"]["converted_batch"] == 2 and meta["litert"]["batch_axis"] is False
    measured = BenchSettings(8, 5, 1, formats=("ncnn", "litert"))
    rows = {row.format: row for row in bench_export(result.export_dir, measured).rows}
    assert rows["ncnn"].runtime.startswith("ncnn 1.") and rows["ncnn"].latency_p50_ms > 0
    assert rows["litert"].runtime.startswith("litert 2.") and rows["litert"].throughput > 0

    # the server loads both without torch's runners (the same sessions); one without the runtime names its extra
    served = ServedModel.load(result.export_dir, "litert_int8")
    assert served.info["format"] == "litert_int8" and served.info["provider"].startswith("litert")
    assert served.run(np.zeros((2, 3, served.size, served.size), np.float32)).shape == (2, served.info["num_classes"])
    real = importlib.util.find_spec
    monkeypatch.setattr("kdforge.serve.model.find_spec", lambda name, *a: None if name == "ncnn" else real(name))
    with pytest.raises(ServingError, match=r'pip install "kdforge\[serve-ncnn\]"'):
        ServedModel.load(result.export_dir, "ncnn")


@pytest.mark.parametrize("module,fmt,extra", [("executorch", "executorch", "executorch"), ("pnnx", "ncnn", "ncnn"),
                                              ("litert_torch", "litert_int8", "litert")])
def test_without_its_runtime_a_format_exits_3_naming_the_extra(trained_students, tmp_path, monkeypatch, module,
                                                               fmt, extra):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    result = runner.invoke(app, ["export", str(trained_students["cnn"]), "--format", fmt, "--format", "onnx",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 3, result.output
    assert f'pip install "kdforge[{extra}]"' in " ".join(result.stderr.split())
    assert (tmp_path / "cnn" / "student.onnx").is_file()  # the other formats were still made and verified


@heavy
@needs["executorch"]
def test_a_model_executorch_cannot_lower_is_one_error_naming_the_fix(trained_students, tmp_path):
    """The shared ViT is built with timm's dynamic_img_size: its export names the setting that makes it lowerable."""
    result = runner.invoke(app, ["export", str(trained_students["vit"]), "--format", "executorch", "--out",
                                 str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "ExecuTorch cannot lower this model" in result.stderr and "dynamic_img_size = false" in result.stderr
    assert not (tmp_path / "vit" / "student.pte").exists()
