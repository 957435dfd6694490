"""Quantization-aware distillation (QAD) with NVIDIA Model Optimizer, escalation to it, and the TensorRT INT8 graph
(symmetric Q/DQ, FP16 everywhere else)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from kdforge.errors import RecipeError
from kdforge.export.artifacts import export_run
from kdforge.export.converters import FP32_OP_TYPES, QDQ_FP16_OPSET
from kdforge.export.int8 import qad_onnx_writer
from kdforge.pipeline import run_distill
from kdforge.recipe import load_recipe
from kdforge.train.qad import calibrate, fix_scales, learn_scales, modules_of_nodes, qad_stage, quant_config

from .conftest import TINY_MODELS
from .test_int8_ships import chain_recipe, fail_int8_verifications

pytest.importorskip("modelopt.torch.quantization", reason="the qad extra (nvidia-modelopt) is part of the dev install")


def qad_student(recipe, stage, qcfg, opset=17, **kwargs):
    """The QAD stage as the INT8 builder runs it (its ONNX file written by the builder's writer)."""
    return qad_stage(recipe, stage, qcfg, opset, qad_onnx_writer(32, opset), **kwargs)


@pytest.mark.slow
def test_qad_gives_the_fp32_answers_more_often_than_ptq_and_its_stage_is_reused(trained_students, tmp_path):
    """The same student, the same test split: INT8 by ONNX Runtime PTQ and INT8 by QAD, both verified against
    the FP32 PyTorch student."""
    stage = trained_students["cnn"]
    ptq = export_run(stage, ["int8"], exports_dir=tmp_path / "ptq", quantize={"escalate": []})
    qad = export_run(stage, ["int8"], exports_dir=tmp_path / "qad", quantize={"mode": "qad", "escalate": []})
    ptq_report, qad_report = ptq.reports["int8"], qad.reports["int8"]
    assert qad_report.count == ptq_report.count == 300
    # closer to the FP32 answers: logits nearer on average, and the same class as often within one answer of 300
    # (this 20-step student agrees on ~99% either way: on an AVX-512 Xeon 297 of 300 by PTQ, 296 by QAD since QAD
    # calibrates on PTQ's 192 images instead of its own 200; one answer is noise at this size, the logits are not)
    assert round(qad_report.agreement * 300) >= round(ptq_report.agreement * 300) - 1
    assert qad_report.mean_abs_diff < ptq_report.mean_abs_diff
    assert qad_report.passed, qad_report.failures

    meta = json.loads((qad.export_dir / "metadata.json").read_text())["formats"]["int8"]
    assert meta["method"] == "qad" and meta["quantizer"] == "modelopt"
    assert meta["qad"]["epochs"] == 1 and meta["qad"]["steps"] > 0 and meta["qad"]["quantizers"] > 0
    proto = onnx.load(str(qad.artifacts["int8"]))
    weights = {t.name for t in proto.graph.initializer}
    quantize_ops = [node for node in proto.graph.node if node.op_type == "QuantizeLinear"]
    dequantize_ops = [node for node in proto.graph.node if node.op_type == "DequantizeLinear"]
    # weights are stored as INT8 (their QuantizeLinear computed at export), activations quantized at run time
    assert quantize_ops and not any(node.input[0] in weights for node in quantize_ops)
    assert len(dequantize_ops) == meta["qad"]["quantizers"]
    assert sum(node.input[0] in weights for node in dequantize_ops) == len(dequantize_ops) - len(quantize_ops)
    onnx_bytes = json.loads((qad.export_dir / "metadata.json").read_text())["formats"]["onnx"]["bytes"]
    assert meta["bytes"] < onnx_bytes
    images = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    raw, shipped = (ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
                    for path in (meta["qad"]["path"], qad.artifacts["int8"]))
    assert np.abs(raw - shipped).max() < 1e-4  # folding the weights' quantization changes no answer

    # the finished stage is reused while its settings hold, and trained again when they change
    recipe = load_recipe(stage / "recipe.toml")
    again = qad_student(recipe, stage, recipe.quantize.model_copy(update={"mode": "qad"}), 17, consumers=[])
    assert again.skipped and again.fingerprint == meta["qad"]["fingerprint"]
    longer = qad_student(recipe, stage, recipe.quantize.model_copy(update={"mode": "qad", "qad_epochs": 2}), 17,
                         consumers=[])
    assert not longer.skipped and longer.steps == 2 * again.steps


@pytest.mark.slow
@pytest.mark.parametrize("escalate,failing,steps", [
    (["qad"], 1, [("ptq", False), ("qad", True)]),
    (["accuracy_aware", "qad"], 2, [("ptq", False), ("accuracy_aware", False), ("qad", True)]),
])
def test_a_failing_ptq_in_the_chain_ends_with_a_shipped_qad_file(make_recipe, tmp_path, monkeypatch, escalate,
                                                                   failing, steps):
    fail_int8_verifications(monkeypatch, failing)
    recipe = chain_recipe(make_recipe, tmp_path, [f"quantize.escalate={json.dumps(escalate)}"])
    summary = run_distill(recipe, runs_dir=tmp_path / "runs", consumers=[])

    assert summary.failures == {}
    assert [(s["step"], s["passed"]) for s in summary.exports["int8"]["int8_steps"]] == steps
    meta = json.loads((tmp_path / "exports" / "tiny" / "metadata.json").read_text())["formats"]["int8"]
    assert meta["method"] == "qad" and meta["qad"]["teacher"] is None  # learned from the FP32 student itself
    assert (tmp_path / "runs" / "tiny" / "qad" / "student.qad.onnx").is_file()
    assert json.loads((tmp_path / "exports" / "tiny" / "verify.json").read_text())["int8"]["passed"]
    report = (tmp_path / "runs" / "tiny" / "report" / "report.md").read_text()
    assert "INT8 quantization steps" in report and "qad" in report


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "vit"])
@pytest.mark.parametrize("mode", ["ptq", "qad"])
def test_tensorrt_int8_graph_is_symmetric_qdq_and_fp16_everywhere_else(trained_students, tmp_path, kind, mode):
    result = export_run(trained_students[kind], ["int8"], exports_dir=tmp_path,
                        quantize={"target": "tensorrt", "mode": mode, "escalate": []})
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(result.artifacts["int8"])))
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == QDQ_FP16_OPSET
    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:  # symmetric INT8: zero points 0 of type int8; FP16 scales
        assert constants[node.input[1]].dtype.name == "float16", node.name
        zero_point = constants[node.input[2]]
        assert zero_point.dtype.name == "int8" and not zero_point.any(), node.name

    types = {v.name: v.type.tensor_type.elem_type for v in (*proto.graph.value_info, *proto.graph.input,
                                                            *proto.graph.output)}
    fp32_compute = [n.name for n in proto.graph.node
                    if n.op_type not in ("Cast", "QuantizeLinear", "DequantizeLinear", "Constant", *FP32_OP_TYPES)
                    and any(types.get(t) == TensorProto.FLOAT for t in (*n.input, *n.output))]
    assert fp32_compute == []  # every float op outside the kept-FP32 list computes in FP16
    assert [types[i.name] for i in proto.graph.input] == [TensorProto.FLOAT]  # callers and TensorRT I/O stay FP32
    assert [types[o.name] for o in proto.graph.output] == [TensorProto.FLOAT]
    report = result.reports["int8"]  # verified on ONNX Runtime CPU like every format
    assert report.count == 300 and (report.passed or kind == "vit"), report.failures


def test_qad_settings_are_validated_and_exclude_names_reach_the_pytorch_modules(make_recipe):
    with pytest.raises(RecipeError, match="mode"):
        load_recipe(make_recipe(), ["quantize.mode=qat"])
    with pytest.raises(RecipeError, match="escalate"):
        load_recipe(make_recipe(), ['quantize.escalate=["retrain"]'])
    names = ["/layer1/layer1.0/conv1/Conv", "/stages/stages.0/blocks/blocks.1/conv_dw/Conv",
             "/blocks/blocks.0/blocks.0.0/se/conv_reduce/Conv", "/head/fc/Gemm", "odd"]
    assert modules_of_nodes(names) == ["layer1.0.conv1", "stages.0.blocks.1.conv_dw", "blocks.0.0.se.conv_reduce",
                                       "head.fc"]


def test_learned_scales_quantize_as_model_optimizer_does_and_get_gradients():
    """qad_scales = "learned": with its calibrated ranges the LSQ forward gives Model Optimizer's own answer, every
    range gets a gradient and stays out of weight decay, and the learned ranges written back are what the model
    (and so its ONNX export) then uses."""
    import modelopt.torch.quantization as mtq
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 5))
    images = torch.randn(16, 3, 8, 8)
    model = mtq.quantize(model, quant_config(), forward_loop=None)
    calibrate(model, lambda quantized: quantized(images))
    calibrated = model(images).detach()
    assert learn_scales(model, lr=0.03) == 4  # weights and inputs of the Conv and the Linear
    learned = {name: p for name, p in model.named_parameters() if name.endswith("log_range")}
    assert torch.allclose(model(images), calibrated, atol=1e-5)
    model(images).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned.values())
    from kdforge.recipe import TrainConfig
    from kdforge.runtime import Runtime
    from kdforge.train.loop import Plan, TrainState

    state = TrainState.create(model, TrainConfig(optimizer="adamw", lr=1e-4, weight_decay=0.05),
                              Plan(steps_per_epoch=10, total_steps=10, epochs=1),
                              Runtime(device=torch.device("cpu"), amp_dtype=None))
    groups = {id(p): group for group in state.optimizer.param_groups for p in group["params"]}
    assert all(groups[id(p)]["lr"] == 0.03 and groups[id(p)]["weight_decay"] == 0 for p in learned.values())
    assert groups[id(model[0].weight)]["lr"] == 1e-4 and groups[id(model[0].weight)]["weight_decay"] == 0.05

    with torch.no_grad():
        for p in learned.values():
            p.fill_(-0.2)  # as if training had narrowed every range
    narrowed = model(images).detach()
    assert not torch.allclose(narrowed, calibrated, atol=1e-3)
    fix_scales(model)
    assert not any(name.endswith("log_range") for name, _ in model.named_parameters())
    assert torch.allclose(model(images), narrowed, atol=1e-5)  # Model Optimizer's quantizers, the learned ranges


@pytest.mark.slow
def test_qad_with_learned_scales_exports_the_learned_ranges(trained_students, tmp_path):
    import shutil

    run_dir = tmp_path / trained_students["cnn"].parent.name  # a private copy: QAD writes beside the student
    shutil.copytree(trained_students["cnn"].parent, run_dir, symlinks=True,
                    ignore=shutil.ignore_patterns("qad", ".stale"))
    stage = run_dir / trained_students["cnn"].name
    recipe = load_recipe(stage / "recipe.toml")
    qcfg = recipe.quantize.model_copy(update={"mode": "qad"})
    scales = {}
    for kind in ("calibrated", "learned"):
        result = qad_student(recipe, stage, qcfg.model_copy(update={"qad_scales": kind}), consumers=[])
        assert result.scales == kind and not result.skipped
        proto = onnx.load(str(result.path))
        weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        constants = {node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in proto.graph.node
                     if node.op_type == "Constant"}  # the exporter writes activation scales as Constant nodes
        scales[kind] = [float({**weights, **constants}[node.input[1]].max()) for node in proto.graph.node
                        if node.op_type == "QuantizeLinear" and node.input[0] not in weights]
    # the same quantizers, the activations' ranges moved by training (calibrated ones stay where calibration put them)
    assert len(scales["learned"]) == len(scales["calibrated"]) > 0
    assert scales["learned"] != pytest.approx(scales["calibrated"], rel=1e-4)


@pytest.mark.slow
def test_int8_accuracy_benchmark_smoke(make_recipe, tmp_path):
    """benchmarks/int8_accuracy.py in smoke form: one seed of a tiny recipe, a table row with both methods."""
    import subprocess
    import sys
    from pathlib import Path

    recipe = make_recipe(TINY_MODELS)
    script = Path(__file__).parents[1] / "benchmarks" / "int8_accuracy.py"
    done = subprocess.run([sys.executable, str(script), "--recipes", str(recipe), "--seeds", "0", "--runs",
                           str(tmp_path / "runs"), "--set", "train.max_steps=6", "--set", "quantize.calibration=64"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(f"| {recipe} | 0 |")]
    # FP32 top-1 and the agreement of PTQ, bias correction, accuracy-aware, QAD and QAD with learned scales
    assert len(rows) == 1 and rows[0].count("%") == 6
    assert (tmp_path / "runs" / "tiny-seed0" / "qad" / "student.qad.onnx").is_file()


@pytest.mark.slow
def test_qad_can_learn_from_the_recipes_teacher_and_its_cache(make_recipe, tmp_path):
    recipe = chain_recipe(make_recipe, tmp_path, ["distill.teacher_cache.views=2", "quantize.enabled=false"])
    run_distill(recipe, runs_dir=tmp_path / "runs", consumers=[])
    student = tmp_path / "runs" / "tiny" / "student"
    qcfg = recipe.quantize.model_copy(update={"mode": "qad", "qad_teacher": "teacher"})
    result = qad_student(recipe, student, qcfg, 17, consumers=[])
    assert result.teacher == str(tmp_path / "runs" / "tiny" / "teacher" / "last" / "model.safetensors")
    assert result.steps > 0 and result.path.is_file()
    # the FP32 student as its own teacher is another stage: trained again, not reused
    itself = qad_student(recipe, student, qcfg.model_copy(update={"qad_teacher": "student"}), 17, consumers=[])
    assert not itself.skipped and itself.teacher is None and itself.fingerprint != result.fingerprint


@pytest.mark.slow
def test_a_killed_qad_stage_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(trained_students, tmp_path):
    """QAD follows the training stages' rules: a killed stage keeps its last checkpoint and the next call resumes
    from it (it was trained from scratch before), with the same outcome as a run never interrupted."""
    import shutil

    runs = {}
    for copy in ("killed", "straight"):  # two private copies of the shared run (QAD writes beside the student)
        run_dir = tmp_path / copy / trained_students["cnn"].parent.name
        shutil.copytree(trained_students["cnn"].parent, run_dir, symlinks=True,
                        ignore=shutil.ignore_patterns("qad", ".stale"))
        runs[copy] = run_dir / trained_students["cnn"].name
    recipe = load_recipe(runs["killed"] / "recipe.toml")
    qcfg = recipe.quantize.model_copy(update={"mode": "qad", "qad_epochs": 2})

    class Killed(Exception):
        pass

    per_epoch = []

    def kill_in_the_second_epoch(event):
        if event["event"] == "start":
            per_epoch.append(event["steps_per_epoch"])
        if event["event"] == "step" and event["step"] == per_epoch[0] + 1:
            raise Killed

    with pytest.raises(Killed):
        qad_student(recipe, runs["killed"], qcfg, consumers=[kill_in_the_second_epoch])
    stage_dir = runs["killed"].parent / "qad"
    assert (stage_dir / "last").exists() and not (stage_dir / "result.json").exists()

    events = []
    resumed = qad_student(recipe, runs["killed"], qcfg, consumers=[events.append])
    assert next(e for e in events if e["event"] == "start")["step"] == per_epoch[0]  # resumed, not from scratch
    straight = qad_student(recipe, runs["straight"], qcfg, consumers=[])
    assert not resumed.skipped and resumed.steps == straight.steps == 2 * per_epoch[0]
    assert resumed.top1 == straight.top1 and resumed.fingerprint == straight.fingerprint
    assert not (stage_dir / "last").exists() and (stage_dir / "result.json").is_file()
