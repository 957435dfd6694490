"""The OpenVINO IR format: converted from the FP32 ONNX, verified against the PyTorch student like every format,
measured by `kdforge bench`, and refused when either of its two files was replaced."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kdforge.cli import app

pytestmark = pytest.mark.slow  # every test exports and verifies OpenVINO IRs (NNCF's INT8 takes ~10 s)

runner = CliRunner()
needs_openvino = pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None,
                                    reason="the openvino extra is part of the dev install (make test)")


@needs_openvino
@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_openvino_export_verifies_against_pytorch(trained_students, tmp_path, kind):
    from kdforge.export.artifacts import export_run
    from kdforge.runners import OpenVinoRunner, open_runner

    result = export_run(trained_students[kind], ["openvino"], exports_dir=tmp_path)
    assert list(result.artifacts) == ["onnx", "openvino"]  # made from the FP32 ONNX, which comes along
    report = result.reports["openvino"]
    assert report.passed and report.agreement >= 0.99 and abs(report.top1_delta_points) <= 0.5, report.failures
    print(f"openvino {kind}: agreement {report.agreement:.4f}, top-1 delta {report.top1_delta_points:+.2f} points, "
          f"max |dlogit| {report.max_abs_diff:.1e}, {report.count} images")
    xml = result.artifacts["openvino"]
    assert xml.name == "student.openvino.xml" and xml.with_suffix(".bin").is_file()
    runner_ = open_runner(xml, "openvino", threads=1)
    assert isinstance(runner_, OpenVinoRunner) and runner_.spec.size == 32 and "openvino" in runner_.name
    assert not [p for p in result.export_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


@needs_openvino
def test_openvino_int8_is_quantized_by_nncf_verified_and_escalates_to_accuracy_control(trained_students, tmp_path):
    import json

    import openvino as ov

    from kdforge.export.artifacts import export_recipe, export_run

    # plain NNCF post-training quantization (escalation off, so what is measured is nncf.quantize's own file)
    source = trained_students["cnn"]
    result = export_run(source, ["openvino_int8"], exports_dir=tmp_path / "plain", quantize={"escalate": []})
    report = result.reports["openvino_int8"]
    print(f"openvino_int8 cnn: agreement {report.agreement:.4f}, top-1 delta {report.top1_delta_points:+.2f} "
          f"points, {report.count} images")
    # verified like every format (on this tiny, barely trained student INT8 moves a few of 300 answers either way:
    # its pass/fail is the tolerance's call, not this test's); far above chance (1%) agreement with FP32
    assert report.count == 300 and report.agreement > 0.6
    assert json.loads((result.export_dir / "verify.json").read_text())["openvino_int8"]["passed"] == report.passed
    plain = json.loads((result.export_dir / "metadata.json").read_text())["formats"]["openvino_int8"]
    assert 0 < plain["calibration_images"] <= 200 and plain["quantizer"] == "nncf.quantize"  # whole batches
    assert plain["method"] == "ptq" and plain["fake_quantize_ops"] > 0
    ops = [op.get_type_name() for op in ov.Core().read_model(str(result.artifacts["openvino_int8"])).get_ops()]
    assert ops.count("FakeQuantize") == plain["fake_quantize_ops"]  # OpenVINO runs those layers in INT8

    # a tolerance PTQ cannot meet (no answer may change): the export tries NNCF's accuracy-controlled quantization
    # on the held-out training images and records both steps
    strict = export_recipe(source, overrides=["verify.int8.max_top1_delta=0", "verify.int8.min_agreement=1"])
    result = export_run(source, ["openvino_int8"], exports_dir=tmp_path / "strict", recipe=strict)
    entry = json.loads((result.export_dir / "metadata.json").read_text())["formats"]["openvino_int8"]
    print(f"openvino_int8 steps: {entry['steps']}; FakeQuantize ops {plain['fake_quantize_ops']} -> "
          f"{entry['fake_quantize_ops']}")
    assert [s["step"] for s in entry["steps"]] == ["ptq", "accuracy_aware"] and not entry["steps"][0]["passed"]
    assert entry["method"] == "accuracy_aware" and entry["quantizer"] == "nncf.quantize_with_accuracy_control"
    assert entry["max_top1_drop"] == 0 and entry["heldout_images"] > 0
    # NNCF reverts layers only for a drop it measures on the held-out images (on this barely trained student INT8
    # may not lose any there, and then everything stays quantized)
    assert entry["fake_quantize_ops"] <= plain["fake_quantize_ops"]
    assert any(n.startswith("openvino_int8: ") and "accuracy_aware" in n for n in result.notes)
    assert entry["steps"][-1]["passed"] == result.reports["openvino_int8"].passed
    assert json.loads((result.export_dir / "verify.json").read_text())["openvino_int8"]["passed"] == entry[
        "steps"][-1]["passed"]
    # the steps reach the command's output and the chain's summary as the ONNX INT8's do (one escalation routine)
    from kdforge.pipeline import export_rows

    assert result.steps["openvino_int8"] == entry["steps"] == export_rows(result)["openvino_int8"]["int8_steps"]


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


@needs_openvino
def test_the_server_serves_the_openvino_ir_as_verified(trained_students, served_export, tmp_path, monkeypatch):
    """`kdforge serve --format openvino` answers like the verified FP32 ONNX it was converted from; `auto` picks
    it only when bench.json measured it fastest; without the OpenVINO runtime the error names the extra."""
    import importlib.util
    import json

    from fastapi.testclient import TestClient

    from kdforge.export.artifacts import export_run
    from kdforge.serve.app import create_app
    from kdforge.serve.model import ServedModel, ServingError, choose_format

    _, pngs = served_export  # test-split images as PNG files
    export_dir = export_run(trained_students["cnn"], ["openvino"], exports_dir=tmp_path).export_dir
    client = TestClient(create_app(export_dir, fmt="openvino"))
    meta = client.get("/metadata").json()
    assert meta["format"] == "openvino" and meta["verified"] is True and meta["provider"].startswith("openvino")
    served = [client.post("/predict", content=p.read_bytes(), headers={"Content-Type": "image/png"}).json()[
        "predictions"] for p in pngs]
    expected = ServedModel.load(export_dir, "onnx").predict([p.read_bytes() for p in pngs])
    for got, want in zip(served, expected, strict=True):  # FP16-stored weights, FP32 arithmetic
        assert [p["index"] for p in got[:3]] == [p["index"] for p in want[:3]]
        assert max(abs(g["probability"] - w["probability"]) for g, w in zip(got, want, strict=True)) < 1e-3

    verified = json.loads((export_dir / "verify.json").read_text())
    rows = [{"format": "onnx", "latency_p50_ms": 2.0}, {"format": "openvino", "latency_p50_ms": 1.0}]
    assert choose_format(export_dir, verified, {"rows": rows})[0] == "openvino"
    assert choose_format(export_dir, verified, {})[0] == "onnx"  # without timings: ONNX formats first

    real = importlib.util.find_spec
    monkeypatch.setattr("kdforge.serve.model.find_spec", lambda name, *a: None if name == "openvino" else real(name))
    assert choose_format(export_dir, verified, {"rows": rows})[0] == "onnx"  # what this server can run
    with pytest.raises(ServingError, match=r'pip install "kdforge\[serve-openvino\]"'):
        ServedModel.load(export_dir, "openvino")
