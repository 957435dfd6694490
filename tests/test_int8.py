import json

import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.data import ImageDataset
from kdforge.data.transforms import InputSpec
from kdforge.errors import ExportError, RecipeError
from kdforge.export.artifacts import export_run
from kdforge.export.quantize import keep_sensitive_in_float, select_calibration
from kdforge.recipe import QuantizeConfig, load_recipe

runner = CliRunner()
SPEC = InputSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def dequantized_inputs(proto):
    """Names of tensors produced by DequantizeLinear nodes (inputs of quantized computations)."""
    return {out for node in proto.graph.node if node.op_type == "DequantizeLinear" for out in node.output}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_int8_is_verified_with_pytorch_fp32_and_int8_side_by_side(trained_students, kind):
    result = runner.invoke(app, ["export", str(trained_students[kind]), "--int8"])
    assert result.exit_code == 0, result.output
    assert "int8 is made from the FP32 ONNX export" in result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│")}
    assert "PASS" in lines["onnx"] and "PASS" in lines["int8"]
    export_dir = next(trained_students[kind].parents[2].glob("exports/*"))
    reports = json.loads((export_dir / "verify.json").read_text())
    assert reports["onnx"]["passed"] and reports["int8"]["passed"]
    assert abs(reports["int8"]["top1_delta_points"]) <= 1.0
    if kind == "cnn":  # the tiny ViT learns little in a few seconds; the CNN is well above chance (1%)
        assert reports["int8"]["reference_top1"] > 0.03
    meta = json.loads((export_dir / "metadata.json").read_text())["formats"]["int8"]
    assert meta["calibration_images"] == 192 and meta["target"] == "cpu"  # whole batches of 32
    assert meta["bytes"] < json.loads((export_dir / "metadata.json").read_text())["formats"]["onnx"]["bytes"]

    proto = onnx.load(str(export_dir / "student.int8.onnx"))
    quantized = dequantized_inputs(proto)
    computing = [n for n in proto.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    assert any(set(n.input) & quantized for n in computing)
    # LayerNorm, Softmax, GELU and the like stay float
    for node in proto.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Erf", "Gelu", "ReduceMean"):
            assert not set(node.input) & quantized, node.name


@pytest.mark.slow
def test_tensorrt_target_is_symmetric_int8_with_zero_points_0(trained_students, tmp_path):
    result = export_run(trained_students["cnn"], ["int8"], exports_dir=tmp_path, verify=False,
                        quantize={"target": "tensorrt", "method": "percentile"})
    proto = onnx.load(str(result.artifacts["int8"]))
    initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype.name == "int8" and not z.any() for z in zero_points)


def test_accuracy_aware_search_keeps_the_most_sensitive_layers_in_float():
    # quantizing a layer costs this many points of top-1 (additive, as a stand-in for a real model)
    cost = {"conv1": 0.1, "conv2": 2.0, "fc": 0.8, "conv3": 0.3}
    calls = []

    def drop_of(excluded):
        calls.append(list(excluded))
        return sum(c for n, c in cost.items() if n not in excluded)

    result = keep_sensitive_in_float(list(cost), drop_of, max_drop=0.5)
    assert result.sensitivity == {n: cost[n] for n in cost}  # measured one layer at a time
    assert result.kept == ["conv2", "fc"] and result.final_drop == pytest.approx(0.4)
    assert result.tried == len(calls) == 1 + 4 + 2
    # within tolerance from the start: nothing measured beyond the first try, nothing kept
    assert keep_sensitive_in_float(list(cost), drop_of, max_drop=5.0).kept == []
    # impossible tolerance: every layer ends up in float
    assert keep_sensitive_in_float(list(cost), lambda ex: 1.0 * (len(ex) < 4), max_drop=0.0).kept.__len__() == 4


@pytest.mark.slow
def test_accuracy_aware_export_keeps_layers_float_in_the_artifact_and_records_why(trained_students, tmp_path,
                                                                                  monkeypatch):
    import kdforge.export.quantize as quantize_module

    real_predicted, real_drop = quantize_module.predicted_classes, quantize_module.heldout_drop
    last = {}

    def predicted(path, batches):
        proto = onnx.load(str(path))
        quantized = dequantized_inputs(proto)
        last["convs"] = sum(1 for n in proto.graph.node if n.op_type == "Conv" and set(n.input) & quantized)
        return real_predicted(path, batches)

    def drop_with_known_costs(reference, candidate, labels):
        """The real held-out drop bound, plus 1 point for every quantized Conv (a model where INT8 hurts)."""
        return real_drop(reference, candidate, labels) + 1.0 * last["convs"]

    monkeypatch.setattr(quantize_module, "predicted_classes", predicted)
    monkeypatch.setattr(quantize_module, "heldout_drop", drop_with_known_costs)
    result = export_run(trained_students["cnn"], ["int8"], exports_dir=tmp_path, verify=False,
                        quantize={"max_top1_drop": 2.5, "sensitivity_images": 300})
    q = result.quantization
    assert q.tried > 1 and q.float_nodes
    assert all({"node", "sensitivity_points", "why"} <= set(n) for n in q.float_nodes)
    points = [n["sensitivity_points"] for n in q.float_nodes]
    assert points == sorted(points, reverse=True)  # most sensitive first
    assert q.heldout_drop_bound <= 2.5 and 0 <= q.heldout_int8_top1 <= 1
    proto = onnx.load(str(result.artifacts["int8"]))
    quantized = dequantized_inputs(proto)
    kept = {n["node"] for n in q.float_nodes}
    assert any(n.op_type == "Conv" and set(n.input) & quantized for n in proto.graph.node)  # others still int8
    for node in proto.graph.node:
        if node.name in kept:
            assert not set(node.input) & quantized, node.name
    meta = json.loads((result.export_dir / "metadata.json").read_text())["formats"]["int8"]
    assert meta["float_nodes"] == q.float_nodes and meta["quantizations_tried"] == q.tried


def images(n):
    return ImageDataset(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64), ("a",))


def test_calibration_adjustments_are_reported_never_silent():
    small = select_calibration(images(100), SPEC, QuantizeConfig(calibration=10, batch_size=32), seed=0)
    assert small.count == 10 and [b.shape[0] for b in small.batches] == [10]
    assert "fewer than one batch of 32" in small.notes[0]
    capped = select_calibration(images(100), SPEC, QuantizeConfig(calibration=512), seed=0)
    assert "the training split has 100: using 100" in capped.notes[0]
    assert capped.count == 96 and "using 96 of 100" in capped.notes[1]
    ragged = select_calibration(images(100), SPEC, QuantizeConfig(calibration=70, batch_size=32), seed=0)
    assert ragged.count == 64 and "using 64 of 70 calibration images" in ragged.notes[0]
    assert {b.shape for b in ragged.batches} == {(32, 3, 32, 32)}
    normal = select_calibration(images(1000), SPEC, QuantizeConfig(calibration=64, sensitivity_images=100), seed=0)
    assert normal.notes == [] and normal.count == 64 and len(normal.heldout_labels) == 100


def test_int8_held_out_checks_use_the_validation_split_when_there_is_one():
    train = ImageDataset(torch.zeros(200, 3, 32, 32, dtype=torch.uint8), torch.zeros(200, dtype=torch.int64), ("a",))
    val = ImageDataset(torch.full((30, 3, 32, 32), 7, dtype=torch.uint8), torch.ones(30, dtype=torch.int64), ("a",))
    cfg = QuantizeConfig(calibration=64, sensitivity_images=100)
    with_val = select_calibration(train, SPEC, cfg, seed=0, val=val)
    assert with_val.heldout_source == "validation images" and len(with_val.heldout_labels) == 30
    assert bool((with_val.heldout_images == 7).all())  # images the student never trained on
    without = select_calibration(train, SPEC, cfg, seed=0)
    assert without.heldout_source == "held-out training images" and len(without.heldout_labels) == 100


def test_empty_calibration_split_and_test_split_requests_are_refused(tmp_path):
    with pytest.raises(ExportError, match="training split is empty"):
        select_calibration(images(0), SPEC, QuantizeConfig(), seed=0)
    path = tmp_path / "r.toml"
    path.write_text('[quantize]\nsplit = "test"\n')
    with pytest.raises(RecipeError, match="quantize.split: calibration images come from the training split only"):
        load_recipe(path)


def test_export_options_are_checked_against_the_format_table(trained_students):
    result = runner.invoke(app, ["export", str(trained_students["cnn"]), "--format", "onnx", "--target", "cpu"])
    assert result.exit_code == 1 and "option 'target' applies to none of the formats onnx" in result.stderr
    result = runner.invoke(app, ["export", str(trained_students["cnn"]), "--int8", "--method", "kl"])
    assert result.exit_code == 2 and "method" in result.stderr and "Traceback" not in result.output
