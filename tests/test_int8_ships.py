"""INT8 that ships: a failing INT8 escalates (bias correction, then the accuracy-aware mode) instead of ending the
chain, the chain
writes its summary and report even when an export fails, export settings apply to reused training, paired
significance of the top-1 change, the serving format chosen from measured speed, bench marks and merges."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.parity import mcnemar_exact_p
from kdforge.pipeline import run_distill
from kdforge.recipe import load_recipe

from .conftest import TINY_MODELS

runner = CliRunner()
CHAIN = TINY_MODELS + """
[export]
formats = ["onnx"]

[quantize]
enabled = true
calibration = 64
sensitivity_images = 200

[verify]
batch_size = 100
"""


def chain_recipe(make_recipe, tmp_path, extra=()):
    return load_recipe(make_recipe(CHAIN), ["train.max_steps=6", "train.limit_eval_batches=1",
                                            f"export.dir={tmp_path / 'exports'}", *extra])


def fail_int8_verifications(monkeypatch, failing: int = 1):
    """The first `failing` verifications of the INT8 file fail (as plain PTQ did on the demo); the others are real.
    Returns the real reports of every INT8 verification."""
    import kdforge.export.job as job_module

    real, calls = job_module.verify_runner, []

    def verify(*args, what, **kwargs):
        report = real(*args, what=what, **kwargs)
        if what.startswith("int8 of"):
            calls.append(report)
            if len(calls) <= failing:
                from dataclasses import replace

                return replace(report, passed=False, failures=["top-1 changed by -1.15 points (injected)"])
        return report

    monkeypatch.setattr(job_module, "verify_runner", verify)
    return calls


@pytest.mark.slow
def test_a_failing_ptq_in_the_chain_escalates_and_ships_the_accuracy_aware_file(make_recipe, tmp_path,
                                                                                monkeypatch):
    calls = fail_int8_verifications(monkeypatch)
    quantized = []
    import kdforge.export.quantize as quantize_module  # export_run imports it when it runs

    real_quantize = quantize_module.quantize_student
    monkeypatch.setattr(quantize_module, "quantize_student",
                        lambda *a, **k: quantized.append(a[4]) or real_quantize(*a, **k))
    summary = run_distill(chain_recipe(make_recipe, tmp_path, ['quantize.escalate=["accuracy_aware", "qad"]']),
                          runs_dir=tmp_path / "runs", consumers=[])

    assert [cfg.max_top1_drop for cfg in quantized] == [None, 0.5]  # PTQ, then accuracy-aware at tolerance / 2
    assert len(calls) == 2 and summary.failures == {}
    steps = summary.exports["int8"]["int8_steps"]
    assert [(s["step"], s["passed"]) for s in steps] == [("ptq", False), ("accuracy_aware", True)]
    assert all({"top1_delta_points", "agreement", "lost", "gained", "mcnemar_p"} <= set(s) for s in steps)
    meta = json.loads((tmp_path / "exports" / "tiny" / "metadata.json").read_text())["formats"]["int8"]
    assert meta["method"] == "accuracy_aware" and meta["steps"] == steps
    assert json.loads((tmp_path / "exports" / "tiny" / "verify.json").read_text())["int8"]["passed"]
    report = (tmp_path / "runs" / "tiny" / "report" / "report.md").read_text()
    assert "INT8 quantization steps" in report and "accuracy_aware" in report


@pytest.mark.slow
def test_a_failing_ptq_is_first_remedied_by_bias_correction_without_training(make_recipe, tmp_path, monkeypatch):
    """The default escalation's first remedy: NNCF's post-training quantization with bias correction of the same
    ONNX graph on the same calibration images, verified, recorded in metadata.json and verify.json; nothing
    trains (no QAD stage folder)."""
    import onnx

    calls = fail_int8_verifications(monkeypatch)
    summary = run_distill(chain_recipe(make_recipe, tmp_path), runs_dir=tmp_path / "runs", consumers=[])

    assert len(calls) == 2 and summary.failures == {}
    steps = summary.exports["int8"]["int8_steps"]
    assert [(s["step"], s["passed"]) for s in steps] == [("ptq", False), ("bias_correction", True)]
    export = tmp_path / "exports" / "tiny"
    meta = json.loads((export / "metadata.json").read_text())["formats"]["int8"]
    assert meta["method"] == "bias_correction" and meta["quantizer"].startswith("nncf.quantize")
    assert meta["calibration_images"] == 64 and meta["quantize_linear_ops"] > 0
    verified = json.loads((export / "verify.json").read_text())["int8"]
    assert verified["passed"] and verified["method"] == "bias_correction"
    assert verified["artifact_sha256"] == meta["sha256"]
    graph = onnx.load(str(export / "student.int8.onnx")).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == meta["quantize_linear_ops"]
    assert not (tmp_path / "runs" / "tiny" / "qad").exists()


def test_bias_correction_is_refused_for_the_tensorrt_target_before_anything_runs(make_recipe):
    from kdforge.errors import RecipeError

    with pytest.raises(RecipeError, match="bias_correction"):
        load_recipe(make_recipe(CHAIN), ["quantize.mode=bias_correction", "quantize.target=tensorrt"])


@pytest.mark.slow
def test_when_every_allowed_step_fails_the_summary_and_report_are_still_written(make_recipe, tmp_path,
                                                                                monkeypatch):
    fail_int8_verifications(monkeypatch)
    recipe = make_recipe(CHAIN)
    args = ["distill", str(recipe), "--runs-dir", str(tmp_path / "runs"), "--set", "train.max_steps=6",
            "--set", "train.limit_eval_batches=1", "--set", f"export.dir={tmp_path / 'exports'}",
            "--set", "quantize.escalate=[]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "student.int8.onnx FAILED verification" in result.stderr and "Traceback" not in result.output
    assert "tiny: test accuracy" in result.stdout  # the summary table was printed before the error
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert set(summary["failures"]) == {"int8"} and summary["exports"]["onnx"]["passed"]
    assert summary["student"]["model"] == "test_convnext" and 0 <= summary["student"]["top1"] <= 1  # trained
    assert (tmp_path / "runs" / "tiny" / "report" / "report.md").is_file()
    assert (tmp_path / "exports" / "tiny" / "student.onnx").is_file()


@pytest.mark.slow
def test_changed_export_settings_apply_to_a_reused_run(make_recipe, tmp_path):
    first = run_distill(chain_recipe(make_recipe, tmp_path), runs_dir=tmp_path / "runs", consumers=[])
    assert first.reused == []
    again = run_distill(chain_recipe(make_recipe, tmp_path, ["quantize.calibration=128",
                                                             "verify.int8.max_top1_delta=5.0"]),
                        runs_dir=tmp_path / "runs", consumers=[])
    assert set(again.reused) == {"teacher", "baseline", "student"}  # no retraining for an export setting
    meta = json.loads((tmp_path / "exports" / "tiny" / "metadata.json").read_text())
    assert meta["formats"]["int8"]["calibration_images"] == 128
    assert meta["settings"]["quantize"]["calibration"] == 128
    verified = json.loads((tmp_path / "exports" / "tiny" / "verify.json").read_text())
    assert verified["int8"]["tolerance"]["max_top1_delta"] == 5.0

    run_dir = str(tmp_path / "runs" / "tiny")
    result = runner.invoke(app, ["export", run_dir, "--int8", "--set", "quantize.calibration=96"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "exports" / "tiny" / "metadata.json").read_text())
    assert meta["formats"]["int8"]["calibration_images"] == 96
    refused = runner.invoke(app, ["export", run_dir, "--set", "train.epochs=3"])
    assert refused.exit_code == 2 and "an export only takes [export], [quantize], [verify] keys" in refused.stderr


def test_mcnemar_exact_p_values():
    assert mcnemar_exact_p(0, 0) == 1.0 and mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_exact_p(7, 3) == pytest.approx(2 * (1 + 10 + 45 + 120) / 2**10)
    # the demo's failure: 23 images lost more than gained on 2,000 is no coin flip
    assert mcnemar_exact_p(40, 17) < 0.01 < mcnemar_exact_p(12, 6)


# ----------------------------------------------------------------------------------------------------------
# serving choice and bench


def bench_rows(**p50):
    rows = [{"format": name, "latency_p50_ms": ms} for name, ms in p50.items()]
    return {"machine": {"cpu": "test-cpu"}, "rows": rows}


def test_serve_auto_serves_the_fastest_verified_format_measured_here(export_copy):
    from kdforge.serve.model import ServedModel

    assert ServedModel.load(export_copy).info["format"] == "int8"  # no bench.json: verified INT8 first
    (export_copy / "bench.json").write_text(json.dumps(bench_rows(pytorch=1.0, onnx=2.0, int8=3.4)))
    served = ServedModel.load(export_copy)
    assert served.info["format"] == "onnx" and "fastest verified format" in served.info["chosen_because"]
    assert "onnx 2.00 ms, int8 3.40 ms" in served.info["chosen_because"]
    verified = json.loads((export_copy / "verify.json").read_text())
    verified["onnx"]["passed"] = False  # a failed format is never chosen, however fast
    (export_copy / "verify.json").write_text(json.dumps(verified))
    assert ServedModel.load(export_copy).info["format"] == "int8"


def test_bench_marks_failed_formats_and_a_subset_merges_into_bench_json(export_copy):
    from kdforge.bench import BenchSettings, bench_export
    from kdforge.cli import bench_table

    quick = {"repeats": 2, "warmup": 0, "batch_size": 4}
    bench_export(export_copy, BenchSettings(**quick, formats=("pytorch", "onnx")))
    verified = json.loads((export_copy / "verify.json").read_text())
    verified["int8"]["passed"] = False
    (export_copy / "verify.json").write_text(json.dumps(verified))
    result = bench_export(export_copy, BenchSettings(**quick, formats=("int8",)))
    assert [row.format for row in result.rows] == ["int8", "pytorch", "onnx"]
    assert [r["format"] for r in json.loads((export_copy / "bench.json").read_text())["rows"]] == \
        ["int8", "pytorch", "onnx"]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(bench_table(result))
    lines = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if "│" in line}
    assert "FAILED" in lines["int8"] and "PASS" in lines["onnx"] and "reference" in lines["pytorch"]
