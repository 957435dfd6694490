"""INT8, end to end: how the `int8` and `openvino_int8` files are made, and what happens when one fails its
verification (the escalation `[quantize] escalate` allows), then how fast the shipped file is.

    int8: PTQ with ONNX Runtime (quantize.py; accuracy-aware when max_top1_drop is set) or QAD with Model
          Optimizer (qad.py); on failure: accuracy_aware, then qad; then a latency check against the FP32 ONNX
    openvino_int8: NNCF PTQ of the FP32 ONNX's IR; on failure: NNCF's accuracy control

Every step is verified like any format and recorded (method, steps, what each measured) in metadata.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge.export.job import ExportJob
from kdforge.recipe import QuantizeConfig

QAD_CPU_NOTE = ("int8 by QAD is symmetric INT8 Q/DQ (Model Optimizer's placement, TensorRT's format) whatever "
                "quantize.target says; ONNX Runtime runs it on CPU")


def make_int8(job: ExportJob, name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The INT8 ONNX as [quantize] asks (mode ptq or qad)."""
    return _make(job, job.qcfg, path, meta)


def _make(job: ExportJob, step_cfg: QuantizeConfig, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    from kdforge.export.quantize import quantize_student

    if step_cfg.mode == "qad":
        return _make_qad(job, step_cfg, path, meta)
    calibration = calibration_for(job, step_cfg)
    job.quantization = quantize_student(job.source_of("int8"), path, calibration, job.spec, step_cfg, meta,
                                        job.phases)
    job.notes.extend(n for n in job.quantization.notes if n not in job.notes)
    return {"target": step_cfg.target, "calibration_method": step_cfg.method,
            "calibration_images": calibration.count, **job.quantization.to_metadata(),
            **int8_opset(step_cfg, job.opset)}


def calibration_for(job: ExportJob, step_cfg: QuantizeConfig):
    """The calibration and held-out images, drawn once per export (the INT8 formats share them)."""
    from kdforge.export.quantize import select_calibration

    if job.calibration is None:
        job.calibration = select_calibration(job.data.train, job.spec, step_cfg, job.recipe.seed, job.data.val)
    return job.calibration


def _make_qad(job: ExportJob, step_cfg: QuantizeConfig, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The INT8 file of quantization-aware distillation (the `qad` stage, reused when it is finished), with
    this export's metadata."""
    from kdforge.export.converters import qad_to_int8
    from kdforge.export.qad import qad_student

    job.quantization = None  # no ONNX Runtime quantization (and no layers kept in float by its search) ships
    if step_cfg.target == "cpu":
        job.note(QAD_CPU_NOTE)
    with job.phases("int8: quantization-aware distillation"):
        qad = qad_student(job.recipe, job.source, step_cfg, job.opset, job.device)
    if qad.skipped:
        job.phases.report(f"int8: QAD finished earlier with these settings in {qad.path.parent}: reused")
    job.note(f"int8 by QAD: {qad.epochs} epoch(s) ({qad.steps} steps, lr {qad.lr:g}) learning from the "
             f"{'teacher' if qad.teacher else 'FP32 student'} in {qad.wall_s:.0f} s; the fake-quantized student "
             f"scores {qad.top1:.2%} on the test split ({qad.calibrated_top1:.2%} calibrated, before fine-tuning)")
    extra = {"quantizer": "modelopt", "target": step_cfg.target, "qad": qad.to_metadata(),
             **int8_opset(step_cfg, job.opset)}
    qad_to_int8(qad.path, path, {**meta, **extra, "method": "qad"}, job.spec.size,
                fp16=step_cfg.target == "tensorrt")
    return extra


def finish_int8(job: ExportJob, name: str, path: Path, meta: dict[str, Any], extra: dict[str, Any]) -> None:
    """After the INT8 file was verified: the escalation steps the recipe allows while it fails, a latency check
    against the FP32 ONNX, and the metadata that records them (every step's measurements in `job.int8_steps`)."""
    qcfg, recipe = job.qcfg, job.recipe
    first = "qad" if qcfg.mode == "qad" else "accuracy_aware" if qcfg.max_top1_drop is not None else "ptq"
    steps = [int8_step(first, job.reports["int8"])]
    for remedy in (r for r in qcfg.escalate if "int8" in job.failures):
        if remedy == first:
            continue  # that is what just failed
        if remedy == "qad":
            step_cfg = qcfg.model_copy(update={"mode": "qad"})
            how = (f"{step_cfg.qad_epochs} epoch(s) of quantization-aware distillation from the "
                   f"{'FP32 student' if step_cfg.qad_teacher == 'student' else 'teacher'}")
        else:
            step_cfg = qcfg.model_copy(update={"mode": "ptq", "max_top1_drop": recipe.verify.int8.max_top1_delta / 2})
            how = f"max_top1_drop {step_cfg.max_top1_drop:.2f} on {_heldout(job)}"
        job.phases.report(f"int8: {steps[-1]['step']} failed verification "
                          f"({'; '.join(job.reports['int8'].failures)}): trying {remedy} ({how})")
        job.drop_verification("int8")
        with job.phases(f"int8: escalation to {remedy}"):
            extra = _make(job, step_cfg, path, meta)
        job.record("int8", path, extra)
        job.check("int8")
        steps.append(int8_step(remedy, job.reports["int8"]))
    with job.phases("int8: latency check against the FP32 ONNX"):
        speed = int8_speed(job.artifacts["onnx"], path, job.spec.size)
    if speed["batch1"] > 1.0:
        job.notes.append(f"int8 is {speed['batch1']:.2f}x the FP32 ONNX latency at batch 1 and "
                         f"{speed['batchN']:.2f}x at batch {speed['batch_size']} on this machine: slower, not "
                         f"faster; after `kdforge bench`, `kdforge serve --format auto` serves the fastest "
                         f"verified format")
    job.record("int8", path, {**extra, "method": steps[-1]["step"], "steps": steps, "latency_vs_fp32": speed})
    if len(steps) > 1:
        job.notes.append(steps_note("int8", steps))
    job.int8_steps = steps


def make_openvino_int8(job: ExportJob, name: str, path: Path, meta: dict[str, Any],
                       step_cfg: QuantizeConfig | None = None) -> dict[str, Any]:
    """OpenVINO INT8 by NNCF on the same calibration images as the ONNX INT8 export (accuracy-controlled on the
    held-out images when `step_cfg` sets max_top1_drop)."""
    from kdforge.export.converters import onnx_to_openvino, openvino_weights

    step_cfg = step_cfg or job.qcfg
    calibration = calibration_for(job, step_cfg)
    validation = [(job.spec.prepare(image[None]).numpy(), int(label))
                  for image, label in zip(calibration.heldout_images, calibration.heldout_labels, strict=True)]
    extra = {"calibration_images": calibration.count,
             "method": "ptq" if step_cfg.max_top1_drop is None else "accuracy_aware",
             **onnx_to_openvino(job.source_of("openvino_int8"), path, meta, calibration.batches, validation,
                                step_cfg.max_top1_drop)}
    return {**extra, **openvino_weights(path)}


def escalate_openvino_int8(job: ExportJob, name: str, path: Path, meta: dict[str, Any],
                           extra: dict[str, Any]) -> None:
    """A failing NNCF INT8 is quantized again with NNCF's accuracy control at half the INT8 tolerance, when
    the recipe allows accuracy-aware escalation and did not already ask for it."""
    qcfg = job.qcfg
    if "openvino_int8" not in job.failures or "accuracy_aware" not in qcfg.escalate or qcfg.max_top1_drop is not None:
        return
    step_cfg = qcfg.model_copy(update={"max_top1_drop": job.recipe.verify.int8.max_top1_delta / 2})
    first = int8_step("ptq", job.reports["openvino_int8"])
    job.phases.report(f"openvino_int8: nncf.quantize failed verification "
                      f"({'; '.join(job.reports['openvino_int8'].failures)}): trying NNCF's accuracy control "
                      f"(max_top1_drop {step_cfg.max_top1_drop:.2f} on {_heldout(job)})")
    job.drop_verification("openvino_int8")
    with job.phases("openvino_int8: escalation to accuracy_aware"):
        extra = make_openvino_int8(job, name, path, meta, step_cfg)
    job.record("openvino_int8", path, extra)
    job.check("openvino_int8")
    steps = [first, int8_step("accuracy_aware", job.reports["openvino_int8"])]
    job.record("openvino_int8", path, {**extra, "method": "accuracy_aware", "steps": steps})
    job.notes.append(steps_note("openvino_int8", steps))


def _heldout(job: ExportJob) -> str:
    return "validation images" if job.data.val is not None else "held-out training images"


def int8_speed(fp32_path: Path, int8_path: Path, size: int, batch_size: int = 8) -> dict[str, Any]:
    """A short timing on this machine with `kdforge bench`'s measurement: INT8 latency as a multiple of the FP32
    ONNX's at batch 1 (p50) and batch N (median); above 1 means INT8 is slower."""
    from kdforge.backends import OnnxRunner, measure

    (fp32_p50, _, fp32_rate), (int8_p50, _, int8_rate) = (
        measure(OnnxRunner(path), size, batch_size=batch_size, repeats=15, warmup=3) for path in (fp32_path, int8_path))
    return {"batch1": round(int8_p50 / fp32_p50, 3), "batchN": round(fp32_rate / int8_rate, 3),
            "batch_size": batch_size}


def int8_opset(cfg: QuantizeConfig, opset: int) -> dict[str, int]:
    """The tensorrt-target INT8 file is written at opset 19 at least (FP16 Q/DQ scales)."""
    from kdforge.export.converters import QDQ_FP16_OPSET

    return {"opset": max(opset, QDQ_FP16_OPSET)} if cfg.target == "tensorrt" else {}


def steps_note(name: str, steps: list[dict[str, Any]]) -> str:
    """One line on an escalation: which step ships (or that none passed) and what each measured."""
    outcome = "shipped" if steps[-1]["passed"] else "every allowed step failed; last tried"
    return (f"{name}: {outcome}: {steps[-1]['step']} ("
            + "; ".join(f"{s['step']}: top-1 {s['top1_delta_points']:+.2f} points, McNemar p {s['mcnemar_p']:.2g}, "
                        f"{'PASS' if s['passed'] else 'FAIL'}" for s in steps) + ")")


def int8_step(step: str, report) -> dict[str, Any]:
    """What one INT8 step measured in verification, for the metadata and the summary."""
    return {"step": step, "top1_delta_points": round(report.top1_delta_points, 3), "agreement": report.agreement,
            "lost": report.lost, "gained": report.gained, "mcnemar_p": report.mcnemar_p, "passed": report.passed}
