import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.errors import CheckpointError, ExportError, VerificationError
from kdforge.export.artifacts import export_run, sha256
from kdforge.locate import resolve_export_source
from kdforge.recipe import load_recipe
from kdforge.runners import OnnxRunner
from kdforge.train.stages import train_stage
from kdforge.verify import verify_export

from .conftest import TINY_MODELS

runner = CliRunner()
SMALL_VERIFY = ["verify.batch_size=16", "verify.limit_batches=2"]


def trained_student(make_recipe, tmp_path, overrides=(), body=TINY_MODELS):
    recipe = load_recipe(make_recipe(body), ["train.max_steps=2", "train.limit_eval_batches=1", *SMALL_VERIFY,
                                             f"export.dir={tmp_path / 'exports'}", *overrides])
    train_stage(recipe, "baseline", runs_dir=tmp_path / "runs", consumers=[])
    return tmp_path / "runs" / recipe.name / "baseline"


@pytest.mark.slow
@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("model", ["resnet18", "vit_tiny_patch16_224", "mobilevit_s"])
def test_reference_students_export_and_verify(make_recipe, tmp_path, model, size):
    overrides = [f"student.model={model}", f"student.input_size={size}", "train.batch_size=4"]
    if model.startswith("vit") and size == 32:
        overrides += ["student.model_kwargs.img_size=32", "student.model_kwargs.patch_size=4"]
    stage = trained_student(make_recipe, tmp_path, overrides)
    result = export_run(stage, ["onnx"])
    report = result.reports["onnx"]
    assert report.passed, report.failures
    assert report.count == 32 and report.agreement == 1.0 and report.max_abs_diff < 1e-3
    proto = onnx.load(str(result.artifacts["onnx"]))
    assert proto.opset_import[0].version == 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch axis


@pytest.mark.slow
def test_artifacts_carry_their_metadata(make_recipe, tmp_path):
    stage = trained_student(make_recipe, tmp_path)
    result = export_run(stage, ["onnx"])
    export_dir = tmp_path / "exports" / "tiny"
    assert result.export_dir == export_dir
    assert sorted(p.name for p in export_dir.iterdir()) == ["README.md", "metadata.json", "student.onnx", "verify.json"]
    props = {p.key: p.value for p in onnx.load(str(export_dir / "student.onnx")).metadata_props}
    sidecar = json.loads((export_dir / "metadata.json").read_text())
    for key in ("model", "input_size", "mean", "std", "class_names", "recipe_hash", "checkpoint_sha256",
                "torch_version", "timm_version", "kdforge_version"):
        assert key in props and key in sidecar, key
    assert props["precision"] == "fp32" and len(json.loads(props["class_names"])) == 100
    assert sidecar["formats"]["onnx"]["sha256"] == sha256(export_dir / "student.onnx")
    runner_ = OnnxRunner(export_dir / "student.onnx")
    assert runner_.spec.size == 32 and runner_.provider == "CPUExecutionProvider"
    assert json.loads((export_dir / "verify.json").read_text())["onnx"]["passed"] is True


@pytest.mark.slow
def test_tampered_and_truncated_onnx_are_refused_cleanly(make_recipe, tmp_path):
    stage = trained_student(make_recipe, tmp_path)
    export_run(stage, ["onnx"], verify=False)
    artifact = tmp_path / "exports" / "tiny" / "student.onnx"
    blob = artifact.read_bytes()

    artifact.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(ExportError, match="cannot load it"):
        OnnxRunner(artifact)
    result = runner.invoke(app, ["verify", str(artifact)])
    assert result.exit_code == 1 and "changed since it was exported" in result.stderr
    assert "Traceback" not in result.output

    tampered = bytearray(blob)
    tampered[-100] ^= 0xFF
    artifact.write_bytes(bytes(tampered))
    with pytest.raises(ExportError, match="changed since it was exported"):
        verify_export(artifact.parent, "onnx")


@pytest.mark.slow
def test_failed_verification_exits_non_zero_and_is_recorded_as_failed(make_recipe, tmp_path):
    stage = trained_student(make_recipe, tmp_path)
    export_run(stage, ["onnx"], verify=False)
    export_dir = tmp_path / "exports" / "tiny"
    artifact = export_dir / "student.onnx"
    # change the exported classifier (as a broken converter would) and record the file as exported
    proto = onnx.load(str(artifact))
    bias = next(t for t in proto.graph.initializer if tuple(t.dims) == (100,))
    values = onnx.numpy_helper.to_array(bias).copy()
    values[np.arange(0, 100, 2)] += 50.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(proto, str(artifact))
    meta = json.loads((export_dir / "metadata.json").read_text())
    meta["formats"]["onnx"]["sha256"] = sha256(artifact)
    (export_dir / "metadata.json").write_text(json.dumps(meta))

    with pytest.raises(VerificationError, match=r"FAILED verification.*agreement .* below the required 99.90%"):
        verify_export(export_dir, "onnx")
    assert json.loads((export_dir / "verify.json").read_text())["onnx"]["passed"] is False
    result = runner.invoke(app, ["verify", str(export_dir)])
    assert result.exit_code == 1 and "FAILED verification" in result.stderr


def test_a_reparameterizable_student_is_exported_fused_with_the_same_answers(tmp_path):
    """MobileOne trains parallel branches and runs one convolution: the ONNX file holds the fused graph (fewer
    convolutions than the PyTorch model has), and gives the PyTorch model's answers."""
    import timm
    import torch

    from kdforge.export.converters import torch_to_onnx

    torch.manual_seed(0)
    model = timm.create_model("mobileone_s0", num_classes=10, exportable=True).eval()
    path = torch_to_onnx(model, 32, tmp_path / "mobileone.onnx", 17, {})
    convolutions = sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)
    assert convolutions < sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) / 2
    images = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    import onnxruntime as ort

    fused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    with torch.no_grad():
        unfused = model(torch.from_numpy(images)).numpy()
    assert np.abs(fused - unfused).max() <= 1e-4 * np.abs(unfused).max()
    assert (fused.argmax(1) == unfused.argmax(1)).all()
    assert any(hasattr(m, "reparameterize") for m in model.modules())  # the PyTorch student itself is untouched


def test_export_without_a_trained_student_is_a_clear_error(tmp_path, make_recipe):
    with pytest.raises(CheckpointError, match="no trained student"):
        resolve_export_source(tmp_path / "runs" / "nothing", tmp_path / "runs")
    result = runner.invoke(app, ["export", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1 and "no finished student" in result.stderr
    result = runner.invoke(app, ["export", str(make_recipe(TINY_MODELS)), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1 and "no trained student" in result.stderr and "Traceback" not in result.output


def test_wrong_input_size_is_a_clear_error_on_the_command_line(make_recipe, tmp_path):
    body = TINY_MODELS.replace('model = "test_convnext"', 'model = "vit_tiny_patch16_224"')
    result = runner.invoke(app, ["baseline", str(make_recipe(body)), "--runs-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "does not accept 32x32 inputs" in result.stderr and "Traceback" not in result.output


@pytest.mark.slow
def test_export_command_uses_the_most_recent_run_and_says_which(make_recipe, tmp_path):
    trained_student(make_recipe, tmp_path)
    result = runner.invoke(app, ["export", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "exporting the most recent run" in result.stderr and "PASS" in result.stdout
    result = runner.invoke(app, ["verify", "--exports-dir", str(tmp_path / "exports")])
    assert result.exit_code == 0 and "verifying the most recent export" in result.stderr


@pytest.mark.slow
def test_unknown_format_is_rejected_before_work_starts(make_recipe, tmp_path):
    stage = trained_student(make_recipe, tmp_path)
    result = runner.invoke(app, ["export", str(stage), "--format", "onxx"])
    assert result.exit_code == 2 and "unknown export format 'onxx' (did you mean: onnx?)" in result.stderr
    assert not (tmp_path / "exports").exists()


@pytest.mark.slow
def test_distill_chain_ends_with_verified_onnx_and_int8_students(make_recipe, tmp_path):
    path = make_recipe(TINY_MODELS)
    result = runner.invoke(app, ["distill", str(path), "--set", "train.max_steps=2", "--set", "export.formats=['onnx']",
                                 "--set", "quantize.enabled=true", "--set", "quantize.calibration=64",
                                 "--set", f"export.dir={tmp_path / 'exports'}", "--runs-dir", str(tmp_path / "runs"),
                                 *[a for o in SMALL_VERIFY for a in ("--set", o)]])
    assert result.exit_code == 0, result.output
    assert "PyTorch top-1" in result.stdout and "exported top-1" in result.stdout and "PASS" in result.stdout
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    row = summary["exports"]["onnx"]
    assert row["passed"] and row["exported_top1"] == pytest.approx(row["pytorch_top1"], abs=1e-3)
    assert summary["exports"]["int8"]["verified"] and "int8" in result.stdout  # [quantize] enabled adds INT8


def test_missing_onnxruntime_says_which_extra_to_install(monkeypatch, tmp_path):
    import sys

    from kdforge.errors import KdforgeError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(KdforgeError, match=r'onnxruntime is not installed.*pip install "kdforge\[export\]"'):
        OnnxRunner(tmp_path / "student.onnx")


@pytest.mark.slow
def test_triton_model_repository_is_valid_for_triton(make_recipe, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    stage = trained_student(make_recipe, tmp_path)
    result = export_run(stage, ["triton"])
    assert "triton is made from the FP32 ONNX export" in result.notes[0]
    assert result.reports["triton"].passed  # the model inside the repository is verified like any export
    model_dir = tmp_path / "exports" / "tiny" / "triton" / "student"
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("student", "onnxruntime_onnx", 64)
    assert config.HasField("dynamic_batching")
    assert (config.input[0].name, list(config.input[0].dims)) == ("input", [3, 32, 32])
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert (config.output[0].name, list(config.output[0].dims)) == ("logits", [100])
    labels = (model_dir / config.output[0].label_filename).read_text().splitlines()
    assert len(labels) == 100 and labels[0] == "red_disk"
    proto = onnx.load(str(model_dir / "1" / "model.onnx"))
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    result = runner.invoke(app, ["verify", str(model_dir / "1" / "model.onnx")])
    assert result.exit_code == 0, result.output


def test_verifying_every_format_reads_the_data_and_hashes_the_weights_once(export_copy, monkeypatch):
    import kdforge.verify
    from kdforge.verify import verify_formats

    from .conftest import count_reads

    hashed = []
    real_hash = kdforge.verify.file_hash
    monkeypatch.setattr(kdforge.verify, "file_hash", lambda path: hashed.append(path) or real_hash(path))
    reads = count_reads(monkeypatch, "synthetic")
    reports = verify_formats(export_copy)
    assert set(reports) == {"onnx", "int8"} and all(report.passed for report in reports.values())
    assert len(reads) == 1 and len(hashed) == 1
    with pytest.raises(ExportError, match="no openvino export recorded"):
        verify_formats(export_copy, ["onnx", "openvino"])
    assert len(reads) == 1  # refused before the data is read
