"""FP16 ONNX and TensorRT engines. Everything except building and running a real engine runs on CPU: the FP16
graphs are verified on ONNX Runtime; the engine build is driven against a strict stand-in of TensorRT's API
(calls outside the documented API fail); real engines are built and verified behind the `gpu` marker."""

import json
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.errors import ExportError, RecipeError, UnavailableError
from kdforge.export.artifacts import export_run, requested_formats
from kdforge.export.tensorrt import count_precisions, onnx_to_trt
from kdforge.recipe import load_recipe
from kdforge.runners.tensorrt import check_engine_runs_here, split_batches

from .test_export import trained_student

runner = CliRunner()


def _trained(make_recipe, tmp_path, model, steps=2):
    overrides = [f"student.model={model}", "student.input_size=32", "train.batch_size=16",
                 f"train.max_steps={steps}", "verify.limit_batches=8"]
    if model.startswith("vit"):
        overrides += ["student.model_kwargs.img_size=32", "student.model_kwargs.patch_size=4"]
    return trained_student(make_recipe, tmp_path, overrides)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet18", "vit_tiny_patch16_224", "mobilevit_s"])
def test_fp16_onnx_of_the_reference_students_matches_pytorch_on_onnx_runtime(make_recipe, tmp_path, model):
    stage = _trained(make_recipe, tmp_path, model, steps=20)
    result = export_run(stage, ["fp16"])
    report = result.reports["fp16"]
    assert report.passed, report.failures
    assert report.count == 128 and report.agreement >= 0.98
    assert abs(report.candidate_top1 - report.reference_top1) <= 0.02

    proto = onnx.load(str(result.artifacts["fp16"]))
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert proto.graph.input[0].type.tensor_type.elem_type == fp32  # callers and TensorRT I/O stay FP32
    assert proto.graph.output[0].type.tensor_type.elem_type == fp32
    weights = [t for t in proto.graph.initializer if len(t.dims) == 4 or len(t.dims) == 2]
    assert weights and all(t.data_type == fp16 for t in weights)
    assert result.artifacts["fp16"].stat().st_size < 0.6 * result.artifacts["onnx"].stat().st_size
    if model.startswith("vit"):  # LayerNorm and Softmax are computed in FP32 behind Casts
        inferred = onnx.shape_inference.infer_shapes(proto)
        types_of = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
        sensitive = [n for n in inferred.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
        assert sensitive and all(types_of.get(n.output[0]) == fp32 for n in sensitive)


@pytest.mark.slow
def test_export_trt_without_tensorrt_verifies_the_fp16_onnx_then_says_what_to_install(
        make_recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError, GPU or not
    stage = trained_student(make_recipe, tmp_path)
    result = runner.invoke(app, ["export", str(stage.parent), "--trt"])
    assert result.exit_code == UnavailableError.exit_code == 3, result.output
    export_dir = tmp_path / "exports" / "tiny"
    verified = json.loads((export_dir / "verify.json").read_text())
    assert verified["onnx"]["passed"] and verified["fp16"]["passed"]
    assert not (export_dir / "student.fp16.engine").exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "trt_fp16 not built: TensorRT is not installed" in errors[0]
    assert 'pip install "kdforge[trt]"' in result.stderr and "Traceback" not in result.output
    assert "fp16" in result.stdout and "PASS" in result.stdout  # the table of what was done still prints


@pytest.mark.slow
def test_tensorrt_without_a_gpu_says_so(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stage = trained_student(make_recipe, tmp_path)
    result = export_run(stage, ["trt_int8"], quantize={"calibration": 50})
    assert result.unavailable == {"trt_int8": result.unavailable["trt_int8"]}
    assert "need a CUDA GPU and none is visible" in result.unavailable["trt_int8"]
    assert set(result.reports) == {"onnx", "int8"} and all(r.passed for r in result.reports.values())
    meta = json.loads((result.export_dir / "metadata.json").read_text())
    assert meta["formats"]["int8"]["target"] == "tensorrt"  # the engine's source: symmetric int8 Q/DQ
    assert any("tensorrt target" in note for note in result.notes)


@pytest.mark.slow
def test_trt_int8_refuses_the_cpu_int8_target(make_recipe, tmp_path):
    stage = trained_student(make_recipe, tmp_path)
    with pytest.raises(ExportError, match="trt_int8 is built from the tensorrt-target INT8 ONNX"):
        export_run(stage, ["trt_int8"], quantize={"target": "cpu"})


def test_export_flags_name_the_formats():
    assert requested_formats(None) is None  # the recipe's formats
    assert requested_formats(None, trt=True) == ["trt_fp16"]
    assert requested_formats(None, int8=True, trt=True) == ["trt_int8"]
    assert requested_formats(None, fp16=True, int8=True, trt=True) == ["trt_fp16", "trt_int8"]
    assert requested_formats(["onnx"], fp16=True) == ["onnx", "fp16"]


def test_tensorrt_profile_is_validated_in_the_recipe(make_recipe):
    path = make_recipe("[export.tensorrt]\nmin_batch = 8\nopt_batch = 4\nmax_batch = 64\n")
    with pytest.raises(RecipeError, match="min_batch <= opt_batch <= max_batch, got 8 / 4 / 64"):
        load_recipe(path)


def test_batches_are_split_to_the_engine_profile_and_padded_to_its_minimum():
    assert split_batches(10, 1, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert split_batches(3, 4, 8) == [(0, 3, 4)]  # padded to the profile's minimum, padding dropped after
    assert split_batches(8, 1, 8) == [(0, 8, 8)]
    assert split_batches(0, 1, 8) == []


def test_engines_from_another_tensorrt_version_or_gpu_are_refused(tmp_path):
    here = {"tensorrt_version": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    engine = tmp_path / "student.fp16.engine"
    assert check_engine_runs_here(engine, dict(here), here) == []
    with pytest.raises(ExportError, match=r"built with TensorRT 11\.0\.0; this machine has TensorRT 10\.3\.0"):
        check_engine_runs_here(engine, {**here, "tensorrt_version": "11.0.0"}, here)
    with pytest.raises(ExportError, match=r"compute capability 8\.7.*Rebuild it here"):
        check_engine_runs_here(engine, {**here, "gpu": "Orin", "compute_capability": "8.7"}, here)
    notes = check_engine_runs_here(engine, {**here, "gpu": "NVIDIA H100 PCIe"}, here)
    assert notes and "same architecture" in notes[0]


def test_layer_precisions_are_read_from_tensorrt_10_and_11_inspector_documents():
    fp16, int8 = "Channel major FP16 format where channel % 8 == 0", "Channel major INT8 format where channel % 32 == 0"
    trt10 = {"Layers": [
        {"Name": "conv1", "Outputs": [{"Name": "a", "Format/Datatype": fp16}]},
        {"Name": "q", "Outputs": [{"Name": "b", "Format/Datatype": int8}]},
        {"Name": "fc", "Outputs": [{"Name": "logits_fp16", "Format/Datatype": "Row major linear FP32"}]},
    ], "Bindings": ["input", "logits"]}
    trt11 = {"Layers": [{"Name": "ln", "Outputs": [{"Name": "x", "Format": "Row major linear", "DataType": "Half"}]}]}
    assert count_precisions(trt10) == {"fp16": 1, "int8": 1, "fp32": 1}  # tensor names are not read
    assert count_precisions(trt11) == {"fp16": 1}
    assert count_precisions({"Layers": ["conv1", "fc"]}) == {}  # built without detailed verbosity


# ----------------------------------------------------------------------------------------------------------
# the engine build against a strict stand-in for TensorRT's Python API (only the calls kdforge makes exist)


def fake_tensorrt(calls: list):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"

    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            pass

    class Dims(tuple):
        pass

    class Input:
        shape = Dims((-1, 3, 32, 32))

    class Network:
        def __init__(self, flags):
            calls.append(("create_network", flags))

        def get_input(self, index):
            return Input()

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            return True

    class Profile:
        def set_shape(self, name, min_shape, opt_shape, max_shape):
            calls.append(("set_shape", name, min_shape, opt_shape, max_shape))

    class Cache:
        def serialize(self):
            return b"timing-cache"

    class Config:
        __slots__ = ("profiling_verbosity", "_cache")  # set_flag, int8_calibrator, ... do not exist

        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool, size))

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile",))

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", data))
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            self._cache = cache
            return True

        def get_timing_cache(self):
            return self._cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network", config.profiling_verbosity))
            return b"engine-bytes"

    class Inspector:
        def get_engine_information(self, fmt):
            return json.dumps({"Layers": [{"Name": "c", "Outputs": [{"Format/Datatype": "Row major linear FP16"}]}]})

    class Engine:
        def create_engine_inspector(self):
            return Inspector()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            assert data == b"engine-bytes"
            return Engine()

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, Parser, Runtime
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="detailed")
    trt.LayerInformationFormat = types.SimpleNamespace(JSON="json")
    return trt


def test_engine_build_is_strongly_typed_with_the_recipe_profile(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    source = tmp_path / "student.fp16.onnx"
    source.write_bytes(b"onnx")
    engine, cache = tmp_path / "student.fp16.engine", tmp_path / "cache" / "timing.cache"

    info = onnx_to_trt(source, engine, (1, 32, 256), workspace_mb=1024, timing_cache=cache)

    assert ("create_network", 1 << 1) in calls  # STRONGLY_TYPED; no precision flags (Config has no set_flag)
    assert ("set_shape", "input", (1, 3, 32, 32), (32, 3, 32, 32), (256, 3, 32, 32)) in calls
    assert ("set_memory_pool_limit", "workspace", 1024 << 20) in calls
    assert ("create_timing_cache", b"") in calls and cache.read_bytes() == b"timing-cache"
    assert ("build_serialized_network", "detailed") in calls
    assert engine.read_bytes() == b"engine-bytes" and not list(tmp_path.glob(".*tmp*"))
    assert info["tensorrt_version"] == "10.3.0" and info["compute_capability"] == "9.0"
    assert info["precision_built"] == "fp16" and info["profile"] == {"min_batch": 1, "opt_batch": 32,
                                                                      "max_batch": 256}


# ----------------------------------------------------------------------------------------------------------
# real engines (wherever TensorRT and a CUDA GPU are)


def _tensorrt_and_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _tensorrt_and_gpu(), reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("model", ["resnet18", "vit_tiny_patch16_224"])
def test_tensorrt_engines_build_and_match_pytorch(make_recipe, tmp_path, model):
    from kdforge.runners.tensorrt import TrtRunner

    stage = _trained(make_recipe, tmp_path, model, steps=20)
    result = export_run(stage, ["trt_fp16", "trt_int8"], quantize={"calibration": 200},
                        tensorrt={"max_batch": 64, "opt_batch": 16})
    assert not result.unavailable
    for name in ("fp16", "trt_fp16", "int8", "trt_int8"):
        assert result.reports[name].passed, (name, result.reports[name].failures)
    sidecar = json.loads((result.export_dir / "student.fp16.engine.json").read_text())
    assert sidecar["tensorrt"]["precision_built"] == "fp16" and sidecar["tensorrt"]["profile"]["max_batch"] == 64
    engine = TrtRunner(result.export_dir / "student.fp16.engine")
    images = torch.randint(0, 256, (150, 3, 32, 32), dtype=torch.uint8)  # 150 > max_batch: split in 3
    assert engine.predict(images).shape == (150, 100)
    sidecar["tensorrt"]["tensorrt_version"] = "0.0.0"
    (result.export_dir / "student.fp16.engine.json").write_text(json.dumps(sidecar))
    with pytest.raises(ExportError, match="built with TensorRT 0.0.0"):
        TrtRunner(result.export_dir / "student.fp16.engine")
    assert np.isfinite(engine.predict(images[:1]).numpy()).all()
