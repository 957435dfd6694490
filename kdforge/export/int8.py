"""INT8, end to end: how the `int8` and `openvino_int8` files are made, and what happens when one fails its
verification (the escalation `[quantize] escalate` allows), then how fast the shipped file is.

    int8: PTQ with ONNX Runtime (quantize.py; accuracy-aware when max_top1_drop is set), NNCF's PTQ with bias
          correction, or QAD with Model Optimizer (the `qad` training stage, train/qad.py, whose ONNX file is
          written here); on failure: bias_correction, then accuracy_aware, then qad; then a latency check against
          the FP32 ONNX
    openvino_int8: NNCF PTQ of the FP32 ONNX's IR; on failure: NNCF's accuracy control

One routine (`escalate`) tries the remedies for either format; every step is verified like any format and recorded
(method, steps, what each measured) in metadata.json, the export's result and the chain's summary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdforge.export.job import ExportJob
from kdforge.recipe import QuantizeConfig

QAD_CPU_NOTE = ("int8 by QAD is symmetric INT8 Q/DQ (Model Optimizer's placement, TensorRT's format) whatever "
                "quantize.target says; ONNX Runtime runs it on CPU")
# the remedies each INT8 format can try, in the order `[quantize] escalate` lists them (QAD's trained weights reach
# the ONNX INT8 only: its fake quantization is Model Optimizer's, not PT2E's). bias_correction is the ONNX INT8's:
# NNCF's OpenVINO quantization already applies it in its first step, and PT2E's XNNPACK quantizer has none
REMEDIES = {"int8": ("bias_correction", "accuracy_aware", "qad"), "openvino_int8": ("accuracy_aware",),
            "executorch_int8": ("accuracy_aware",), "litert_int8": ("accuracy_aware",)}
PT2E_FORMATS = {"executorch_int8": "executorch", "litert_int8": "litert"}  # INT8 by PT2E, for this backend


def make_int8(job: ExportJob, name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The INT8 ONNX as [quantize] asks (mode ptq or qad)."""
    return _make(job, job.qcfg, path, meta)


def _make(job: ExportJob, step_cfg: QuantizeConfig, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    from kdforge.export.quantize import quantize_student

    if step_cfg.mode == "qad":
        return _make_qad(job, step_cfg, path, meta)
    if step_cfg.mode == "bias_correction":
        return _make_bias_corrected(job, step_cfg, path, meta)
    calibration = calibration_for(job, step_cfg)
    job.quantization = quantize_student(job.source_of("int8"), path, calibration, job.spec, step_cfg, meta,
                                        job.phases)
    for note in job.quantization.notes:
        job.note(note)
    return {"target": step_cfg.target, "calibration_method": step_cfg.method,
            "calibration_images": calibration.count, **job.quantization.to_metadata(),
            "method": "ptq" if step_cfg.max_top1_drop is None else "accuracy_aware",
            **int8_opset(step_cfg, job.opset)}


def calibration_for(job: ExportJob, step_cfg: QuantizeConfig):
    """The calibration and held-out images, drawn once per export (the INT8 formats share them)."""
    from kdforge.export.quantize import select_calibration

    if job.calibration is None:
        job.calibration = select_calibration(job.data.train, job.spec, step_cfg, job.recipe.seed, job.data.val)
    return job.calibration


def _make_bias_corrected(job: ExportJob, step_cfg: QuantizeConfig, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The INT8 file by NNCF's post-training quantization with bias correction, on the same calibration images as
    PTQ (no training)."""
    from kdforge.export.converters import onnx_to_int8_bias_corrected

    calibration = calibration_for(job, step_cfg)
    job.quantization = None  # no ONNX Runtime quantization (and no layers kept in float by its search) ships
    extra = {"target": step_cfg.target, "calibration_images": calibration.count, "method": "bias_correction"}
    with job.phases("int8: NNCF quantization with bias correction"):
        extra.update(onnx_to_int8_bias_corrected(job.source_of("int8"), path, calibration.batches, step_cfg.exclude,
                                                 {**meta, **extra}))
    return extra


def _make_qad(job: ExportJob, step_cfg: QuantizeConfig, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The INT8 file of quantization-aware distillation: the `qad` stage (reused when it is finished) trained on
    this export's data, its model written as ONNX here, then copied in with this export's metadata."""
    from kdforge.export.converters import qad_to_int8
    from kdforge.train.qad import qad_stage

    job.quantization = None  # no ONNX Runtime quantization (and no layers kept in float by its search) ships
    if step_cfg.target == "cpu":
        job.note(QAD_CPU_NOTE)
    with job.phases("int8: quantization-aware distillation"):
        qad = qad_stage(job.recipe, job.source, step_cfg, job.opset, qad_onnx_writer(job.spec.size, job.opset),
                        job.device, job.consumers, job.data)
    if qad.skipped:
        job.phases.report(f"int8: QAD finished earlier with these settings in {qad.path.parent}: reused")
    job.note(f"int8 by QAD: {qad.epochs} epoch(s) ({qad.steps} steps, lr {qad.lr:g}) learning from the "
             f"{'teacher' if qad.teacher else 'FP32 student'} in {qad.wall_s:.0f} s; the fake-quantized student "
             f"scores {qad.top1:.2%} on the test split ({qad.calibrated_top1:.2%} calibrated, before fine-tuning)")
    extra = {"quantizer": "modelopt", "target": step_cfg.target, "qad": qad.to_metadata(), "method": "qad",
             **int8_opset(step_cfg, job.opset)}
    qad_to_int8(qad.path, path, {**meta, **extra}, job.spec.size,
                fp16=step_cfg.target == "tensorrt")
    return extra


def qad_onnx_writer(size: int, opset: int) -> Callable[[Any, Path, dict[str, Any]], None]:
    """How the QAD stage's fake-quantized model becomes its ONNX file: the TorchScript exporter at `opset`."""
    from kdforge.export.converters import torch_to_onnx

    return lambda model, path, metadata: torch_to_onnx(model, size, path, opset, metadata)


@dataclass(frozen=True)
class Step:
    name: str  # ptq | bias_correction | accuracy_aware | qad: what metadata.json and the summary record
    how: str  # said when the step is tried
    cfg: QuantizeConfig  # the [quantize] settings it makes the file with


def first_step(qcfg: QuantizeConfig, name: str) -> str:
    """How format `name` is made first: QAD or bias-corrected PTQ (ONNX INT8 only), accuracy-aware PTQ (with
    max_top1_drop) or PTQ."""
    if name == "int8" and qcfg.mode in ("qad", "bias_correction"):
        return qcfg.mode
    return "accuracy_aware" if qcfg.max_top1_drop is not None else "ptq"


def remedies(job: ExportJob, name: str) -> list[Step]:
    """The steps `[quantize] escalate` allows format `name` after its first, in order: bias_correction (ONNX INT8
    for the CPU target: NNCF's PTQ with bias correction, no training), accuracy_aware (at half the INT8 tolerance,
    on the held-out images; NNCF's accuracy control for OpenVINO, the same greedy search as the ONNX INT8's for the
    PT2E formats), qad (ONNX INT8 only)."""
    qcfg, first = job.qcfg, first_step(job.qcfg, name)
    steps = []
    for remedy in (r for r in qcfg.escalate if r in REMEDIES[name] and r != first):
        if remedy == "bias_correction" and qcfg.target == "tensorrt":
            job.note(f"{name}: bias_correction skipped: NNCF's ONNX quantization here makes the CPU target's file, "
                     f"not TensorRT's symmetric FP16 Q/DQ")
            continue
        if remedy == "bias_correction":
            cfg = qcfg.model_copy(update={"mode": "bias_correction", "max_top1_drop": None})
            how = "NNCF post-training quantization with fast bias correction, no training"
        elif remedy == "qad":
            cfg = qcfg.model_copy(update={"mode": "qad"})
            how = (f"{cfg.qad_epochs} epoch(s) of quantization-aware distillation from the "
                   f"{'FP32 student' if cfg.qad_teacher == 'student' else 'teacher'}")
        else:
            cfg = qcfg.model_copy(update={"mode": "ptq", "max_top1_drop": job.recipe.verify.int8.max_top1_delta / 2})
            tool = {"openvino_int8": "NNCF accuracy control, "}.get(
                name, "sensitive layers kept in float (PT2E simulated in PyTorch), " if name in PT2E_FORMATS else "")
            how = f"{tool}max_top1_drop {cfg.max_top1_drop:.2f} on {_heldout(job)}"
        steps.append(Step(remedy, how, cfg))
    return steps


def escalate(job: ExportJob, name: str, path: Path, extra: dict[str, Any],
             make: Callable[[QuantizeConfig], dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """After the INT8 file `name` was made and verified: while it fails, its next remedy makes it again (`make`
    with the remedy's settings), each verified and recorded. Returns what every step measured and the metadata
    of the file that stays."""
    steps = [int8_step(first_step(job.qcfg, name), job.reports[name])]
    for step in remedies(job, name):
        if name not in job.failures:
            break
        job.phases.report(f"{name}: {steps[-1]['step']} failed verification "
                          f"({'; '.join(job.reports[name].failures)}): trying {step.name} ({step.how})")
        job.drop_verification(name)
        with job.phases(f"{name}: escalation to {step.name}"):
            extra = make(step.cfg)
        job.record(name, path, extra)
        job.check(name)
        steps.append(int8_step(step.name, job.reports[name]))
    if len(steps) > 1:
        job.note(steps_note(name, steps))
    job.steps[name] = steps
    return steps, extra


def finish_int8(job: ExportJob, name: str, path: Path, meta: dict[str, Any], extra: dict[str, Any]) -> None:
    """After the INT8 file was verified: the escalation steps the recipe allows while it fails, a latency check
    against the FP32 ONNX, and the metadata that records them."""
    steps, extra = escalate(job, name, path, extra, lambda cfg: _make(job, cfg, path, meta))
    with job.phases("int8: latency check against the FP32 ONNX"):
        speed = int8_speed(job.artifacts["onnx"], path, job.spec.size)
    if speed["batch1"] > 1.0:
        job.note(f"int8 is {speed['batch1']:.2f}x the FP32 ONNX latency at batch 1 and "
                 f"{speed['batchN']:.2f}x at batch {speed['batch_size']} on this machine: slower, not "
                 f"faster; after `kdforge bench`, `kdforge serve --format auto` serves the fastest "
                 f"verified format")
    job.record("int8", path, {**extra, "method": steps[-1]["step"], "steps": steps, "latency_vs_fp32": speed})


def make_openvino_int8(job: ExportJob, name: str, path: Path, meta: dict[str, Any],
                       step_cfg: QuantizeConfig | None = None) -> dict[str, Any]:
    """OpenVINO INT8 by NNCF on the same calibration images as the ONNX INT8 export (accuracy-controlled on the
    held-out images when `step_cfg` sets max_top1_drop)."""
    from kdforge.export.converters import onnx_to_openvino, weights_beside

    step_cfg = step_cfg or job.qcfg
    calibration = calibration_for(job, step_cfg)
    validation = [(job.spec.prepare(image[None]).numpy(), int(label))
                  for image, label in zip(calibration.heldout_images, calibration.heldout_labels, strict=True)]
    extra = {"calibration_images": calibration.count,
             "method": "ptq" if step_cfg.max_top1_drop is None else "accuracy_aware",
             **onnx_to_openvino(job.source_of("openvino_int8"), path, meta, calibration.batches, validation,
                                step_cfg.max_top1_drop)}
    return {**extra, **weights_beside(path)}


def make_pt2e_int8(job: ExportJob, name: str, path: Path, meta: dict[str, Any],
                   step_cfg: QuantizeConfig | None = None) -> dict[str, Any]:
    """ExecuTorch or LiteRT INT8 by PT2E on the same calibration images as the other INT8 formats; with
    `max_top1_drop` (the recipe's, or the escalation's), the layers the accuracy-aware search finds sensitive on the
    held-out images stay in float."""
    from kdforge.export.edge import pt2e_sensitive_layers, torch_to_executorch, torch_to_litert

    step_cfg = step_cfg or job.qcfg
    calibration, backend = calibration_for(job, step_cfg), PT2E_FORMATS[name]
    found: dict[str, Any] = {"method": "ptq"}
    if step_cfg.max_top1_drop is not None:
        heldout = [job.spec.prepare(images).numpy() for images in calibration.heldout_images.split(step_cfg.batch_size)]
        with job.phases(f"{name}: sensitivity search (PT2E in PyTorch, {len(calibration.heldout_labels)} "
                        f"{calibration.heldout_source})"):
            search = pt2e_sensitive_layers(job.model, job.spec.size, calibration.batches, backend, heldout,
                                           calibration.heldout_labels.numpy(), step_cfg.max_top1_drop)
        found = {"method": "accuracy_aware", "float_layers": search.kept, "trials": search.tried,
                 "heldout_drop_bound_points": round(search.final_drop, 3)}
    convert = torch_to_executorch if backend == "executorch" else torch_to_litert
    return {**convert(job.model, job.spec.size, path, meta, calibration.batches, found.get("float_layers", ())),
            **found}


def escalate_and_record(job: ExportJob, name: str, path: Path, meta: dict[str, Any], extra: dict[str, Any]) -> None:
    """After an INT8 file other than the ONNX one was verified: the remedies of its format while it fails (OpenVINO:
    NNCF's accuracy control at half the INT8 tolerance; ExecuTorch and LiteRT: sensitive layers kept in float), and
    the steps recorded."""
    remake = {"openvino_int8": make_openvino_int8}.get(name, make_pt2e_int8)
    steps, extra = escalate(job, name, path, extra, lambda cfg: remake(job, name, path, meta, cfg))
    job.record(name, path, {**extra, "method": steps[-1]["step"], "steps": steps})


def _heldout(job: ExportJob) -> str:
    return "validation images" if job.data.val is not None else "held-out training images"


def int8_speed(fp32_path: Path, int8_path: Path, size: int, batch_size: int = 8) -> dict[str, Any]:
    """A short timing on this machine with `kdforge bench`'s measurement: INT8 latency as a multiple of the FP32
    ONNX's at batch 1 (p50) and batch N (median); above 1 means INT8 is slower."""
    from kdforge.runners import OnnxRunner
    from kdforge.timing import measure, torch_threads

    with torch_threads(1):  # as `kdforge bench` times ONNX Runtime
        (fp32_p50, _, fp32_rate), (int8_p50, _, int8_rate) = [
            measure(OnnxRunner(path), size, batch_size=batch_size, repeats=15, warmup=3)
            for path in (fp32_path, int8_path)]
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
