"""The OpenVINO IR format: converted from the FP32 ONNX, verified against the PyTorch student like every format,
measured by `kdforge bench`, and refused when either of its two files was replaced."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kdforge.cli import app

runner = CliRunner()
needs_openvino = pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None,
                                    reason="the openvino extra is part of the dev install (make test)")


@needs_openvino
@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_openvino_export_verifies_against_pytorch(trained_students, tmp_path, kind):
    from kdforge.backends import OpenVinoRunner, open_runner
    from kdforge.export.artifacts import export_run

    result = export_run(trained_students[kind], ["openvino"], exports_dir=tmp_path)
    assert list(result.artifacts) == ["onnx", "openvino"]  # made from the FP32 ONNX, which comes along
    report = result.reports["openvino"]
    assert report.passed and report.agreement >= 0.99 and abs(report.top1_delta_points) <= 0.5, report.failures
    print(f"openvino {kind}: agreement {report.agreement:.4f}, top-1 delta {report.top1_delta_points:+.2f} points, "
          f"max |dlogit| {report.max_abs_diff:.1e}, {report.count} images")
    xml = result.artifacts["openvino"]
    assert xml.name == "student.openvino.xml" and xml.with_suffix(".bin").is_file()
    runner_ = open_runner(xml, threads=1)
    assert isinstance(runner_, OpenVinoRunner) and runner_.spec.size == 32 and "openvino" in runner_.name
    assert not [p for p in result.export_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


@needs_openvino
def test_openvino_int8_is_quantized_by_nncf_and_verified(trained_students, tmp_path):
    import json

    from kdforge.export.artifacts import export_run

    result = export_run(trained_students["cnn"], ["openvino_int8"], exports_dir=tmp_path)
    report = result.reports["openvino_int8"]
    print(f"openvino_int8 cnn: agreement {report.agreement:.4f}, top-1 delta {report.top1_delta_points:+.2f} "
          f"points, {report.count} images")
    # verified like every format (on this tiny, barely trained student INT8 moves a few of 300 answers either way:
    # its pass/fail is the tolerance's call, not this test's); far above chance (1%) agreement with FP32
    assert report.count == 300 and report.agreement > 0.6
    assert json.loads((result.export_dir / "verify.json").read_text())["openvino_int8"]["passed"] == report.passed
    entry = json.loads((result.export_dir / "metadata.json").read_text())["formats"]["openvino_int8"]
    assert 0 < entry["calibration_images"] <= 200 and entry["quantizer"] == "nncf.quantize"  # whole batches
    import openvino as ov

    ops = {op.get_type_name() for op in ov.Core().read_model(str(result.artifacts["openvino_int8"])).get_ops()}
    assert "FakeQuantize" in ops  # quantized: OpenVINO runs the marked layers in INT8


@needs_openvino
def test_openvino_is_benchmarked_and_a_replaced_weights_file_is_refused(trained_students, tmp_path):
    from kdforge.export.artifacts import export_run

    result = export_run(trained_students["cnn"], ["openvino"], exports_dir=tmp_path)
    export_dir = result.export_dir
    bench = runner.invoke(app, ["bench", str(export_dir), "--format", "openvino", "--repeats", "2", "--warmup", "0",
                                "--batch-size", "4", "--threads", "1"])
    assert bench.exit_code == 0, bench.output
    assert "openvino" in bench.stdout and "PASS" in bench.stdout
    weights = export_dir / "student.openvino.bin"
    weights.write_bytes(weights.read_bytes()[::-1])  # same size, other weights
    verify = runner.invoke(app, ["verify", str(export_dir / "student.openvino.xml")])
    assert verify.exit_code == 1 and "student.openvino.bin changed since it was exported" in " ".join(
        verify.stderr.split())


def test_without_openvino_the_other_formats_are_made_and_it_exits_3(trained_students, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    result = runner.invoke(app, ["export", str(trained_students["cnn"]), "--format", "openvino", "--out",
                                 str(tmp_path)])
    assert result.exit_code == 3, result.output
    assert 'openvino not built: openvino not installed: pip install "kdforge[openvino]"' in " ".join(
        result.stderr.split())
    assert (tmp_path / "cnn" / "student.onnx").is_file()  # its source was still made and verified
