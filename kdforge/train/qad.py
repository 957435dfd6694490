"""Quantization-aware distillation (QAD): the finished student fine-tuned as an INT8 model against its teacher.

    result = qad_stage(recipe, Path("runs/quickstart/student"), qcfg, 17, write_onnx)   # runs/quickstart/qad/

Post-training quantization rounds weights and activations once and hopes the answers survive; on small students
it moves many decisions (a third of the quickstart's test answers) and sometimes top-1 by points. QAD trains
through the rounding instead:

1. NVIDIA Model Optimizer (`modelopt.torch.quantization`) puts fake quantizers where the INT8 export does:
   per-channel symmetric INT8 weights and per-tensor symmetric INT8 inputs of every Conv and Linear (pooling and
   normalization stay float; `[quantize] exclude` nodes stay float), with BatchNorm frozen first (its running
   statistics and affine terms become constants, as QAT does: fine-tuning batches are too few to re-estimate them).
2. Ranges are calibrated on `[quantize] calibration` training images, prepared as at inference: weights by their
   max per output channel, inputs at the 99.9th percentile of their histogram (see `calibrate`).
3. The student trains `qad_epochs` more on the training split, at `qad_lr` (default: 1/100 of the student's lr),
   through the one training loop (validation each epoch, test at the end: the fake-quantized model's top-1),
   learning from `qad_teacher`: its own FP32 weights (KL divergence at T = 1, no labels: it learns to give the
   answers it is verified against), or the recipe's teacher with the [distill] objective (online, or the cache).
4. The fake-quantized model is handed to `write_onnx`, which the INT8 builder gives (export/int8.py: the TorchScript
   ONNX exporter writes QuantizeLinear/DequantizeLinear pairs, zero points 0, in front of each quantized layer, the
   placement TensorRT's explicit quantization fuses and ONNX Runtime runs on CPU): runs/<name>/qad/student.qad.onnx
   is the stage's output.

The stage lives in runs/<name>/qad/ and follows the rules of every training stage (`plan_stage`,
`prepare_stage_dir`): reused while its fingerprint (the student's and teacher's weights, data, seed, [distill] and
the QAD settings) is unchanged; an unfinished one (killed) resumes from its last checkpoint; one with other
settings is moved to runs/<name>/.stale/ and deleted only once its successor finished. The export then writes the
ONNX file into the export folder as the `int8` format, weights stored as INT8 (`converters.qad_to_int8`), and
verifies it like every format.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kdforge import layout
from kdforge.checkpoint import final_weights
from kdforge.data import DataSplits, load_dataset
from kdforge.data.calibration import draw_calibration
from kdforge.distill.teacher import load_frozen_teacher
from kdforge.errors import ExportError
from kdforge.fileio import file_hash, write_json
from kdforge.models import load_stage_model, resolve_input_spec
from kdforge.optional import require
from kdforge.phases import Consumer
from kdforge.recipe import DistillConfig, QuantizeConfig, Recipe, data_fingerprint
from kdforge.runtime import runtime_scope
from kdforge.train.assemble import assemble_run
from kdforge.train.events import MetricsLog, ProgressDisplay
from kdforge.train.loop import evaluate
from kdforge.train.stages import StagePlan, drop_stale, plan_stage, prepare_stage_dir, teacher_weights_for

QAD_STAGE = layout.QAD
# qad_teacher = "student": the fake-quantized student matches its own FP32 logits (KL at T = 1, no label term)
SELF_DISTILL = DistillConfig(method="kd", temperature=1.0, alpha=1.0, baseline=False)
# (the fake-quantized model, the file to write, what to record in it): the INT8 builder's ONNX export
WriteOnnx = Callable[[torch.nn.Module, Path, dict[str, Any]], None]
# Activation ranges: the 99.9th percentile of each input's histogram, not its max. On the quickstart student
# (seed 2), max ranges left 67% of test answers unchanged before fine-tuning, the 99.9th percentile 79%, the 99.99th
# 78%; entropy 81% but took 6 minutes on 2 CPU cores (percentile: 2 s)
ACTIVATION_PERCENTILE = 99.9
# pooling and normalization modules Model Optimizer would also quantize: kept float, as in the ONNX Runtime INT8
# export
FLOAT_MODULES = ("nn.AvgPool1d", "nn.AvgPool2d", "nn.AdaptiveAvgPool1d", "nn.AdaptiveAvgPool2d", "nn.MaxPool1d",
                 "nn.MaxPool2d", "nn.BatchNorm1d", "nn.BatchNorm2d", "nn.LayerNorm")


@dataclass(frozen=True)
class QadResult:
    path: Path  # runs/<name>/qad/student.qad.onnx (layout.QAD_ONNX)
    fingerprint: str
    top1: float  # the fake-quantized student on the test split (ONNX Runtime is verified against the FP32 student)
    calibrated_top1: float  # before fine-tuning: fake-quantized and calibrated only (what PTQ would give)
    epochs: int
    lr: float
    steps: int
    quantizers: int  # fake quantizers enabled (weights and inputs)
    scales: str  # calibrated | learned ([quantize] qad_scales)
    float_modules: list[str]  # modules kept in float by [quantize] exclude
    teacher: str | None  # the teacher's weights it learned from; None: its FP32 self (or labels, for a baseline)
    wall_s: float
    onnx_sha256: str
    skipped: bool = False  # reused from an earlier run

    def to_metadata(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "skipped"}


def quant_config(float_modules: list[str] = ()) -> dict[str, Any]:
    """Model Optimizer's INT8 placement (its INT8_DEFAULT_CFG: weights per output channel, inputs per tensor),
    restricted to Conv and Linear, with `float_modules` (module names) left unquantized; input ranges from
    histograms (see `calibrate`)."""
    entries: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None, "calibrator": "histogram"}},
        *({"quantizer_name": "*", "parent_class": name, "enable": False} for name in FLOAT_MODULES),
        *({"quantizer_name": f"{name}.*", "enable": False} for name in float_modules),
    ]
    return {"quant_cfg": entries, "algorithm": None}  # calibrated by `calibrate`


def calibrate(model, forward_loop) -> None:
    """Weights: max per output channel. Inputs: the ACTIVATION_PERCENTILE of their histogram over the calibration
    images. Model Optimizer's "max" algorithm does not take histogram calibrators, so its two steps (collect
    statistics, load each quantizer's range) are run here."""
    from modelopt.torch.quantization.calib import HistogramCalibrator
    from modelopt.torch.quantization.model_calib import enable_stats_collection
    from modelopt.torch.quantization.nn import TensorQuantizer

    enable_stats_collection(model)
    forward_loop(model)
    for quantizer in model.modules():
        if isinstance(quantizer, TensorQuantizer) and quantizer.is_enabled:
            if isinstance(quantizer._calibrator, HistogramCalibrator):
                quantizer.load_calib_amax("percentile", percentile=ACTIVATION_PERCENTILE)
            else:
                quantizer.load_calib_amax()
            quantizer.enable_quant()
            quantizer.disable_calib()


def _lsq_fake_quantize(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    """A Model Optimizer quantizer's fake quantization with a learned range, called through Model Optimizer's
    backend hook while `qad_scales = "learned"` trains. LSQ's quantizer (Esser et al. 2020): q = clamp(round(x / s))
    x s, the rounding passed straight through so that s gets the gradient of the clipping and rounding error; here
    s = calibrated range x exp(log_range) / 127, the range learned in log space (a relative step, the same for a
    range of 0.1 and of 50) at its own learning rate, `qad_scale_lr`."""
    bound = quantizer.maxbound
    low = 0 if quantizer.unsigned else -bound if quantizer._narrow_range else -bound - 1
    step = learned_range(quantizer) / bound
    levels = torch.clamp(inputs / step, low, bound)
    return (levels + (levels.round() - levels).detach()) * step


def learned_range(quantizer) -> torch.Tensor:
    return (quantizer._amax.reshape(-1) * torch.exp(quantizer.log_range)).reshape(quantizer._amax.shape)


LSQ_BACKEND = "kdforge_lsq"


def learn_scales(model: torch.nn.Module, lr: float) -> int:
    """Give every enabled quantizer a learned range: `log_range`, a 1-D parameter (0: the calibrated range) the
    training loop updates at `lr` without weight decay (`own_lr`, see loop.TrainState). Returns how many
    quantizers learn."""
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        is_registered_quant_backend,
        register_quant_backend,
    )

    if not is_registered_quant_backend(LSQ_BACKEND):
        register_quant_backend(LSQ_BACKEND, _lsq_fake_quantize)
    learning = 0
    for quantizer in model.modules():
        if isinstance(quantizer, TensorQuantizer) and quantizer.is_enabled and quantizer.amax is not None:
            quantizer.log_range = torch.nn.Parameter(torch.zeros(quantizer.amax.numel(),
                                                                 device=quantizer.amax.device))
            quantizer.log_range.own_lr = lr
            quantizer.backend = LSQ_BACKEND
            learning += 1
    return learning


def fix_scales(model: torch.nn.Module) -> None:
    """The learned ranges written into the quantizers' amax buffers (what the ONNX export reads) and Model
    Optimizer's own fake quantization restored."""
    for quantizer in model.modules():
        if isinstance(getattr(quantizer, "log_range", None), torch.nn.Parameter):
            with torch.no_grad():
                quantizer.amax = learned_range(quantizer)
            del quantizer.log_range
            quantizer.backend = None


def modules_of_nodes(nodes: list[str]) -> list[str]:
    """ONNX node names of the TorchScript export -> PyTorch module names: how `[quantize] exclude` (ONNX names, as
    accuracy-aware mode reports them) reaches the model. A name is the module's scopes, then the op; a child of a
    Sequential is written "<parent scope>.<index>": "/stages/stages.0/blocks/blocks.1/conv_dw/Conv" is the module
    "stages.0.blocks.1.conv_dw"."""
    modules = []
    for node in nodes:
        scopes, parts, previous = [p for p in node.split("/") if p][:-1], [], None
        for scope in scopes:
            parts.append(scope[len(previous) + 1:] if previous and scope.startswith(previous + ".") else scope)
            previous = scope
        if parts:
            modules.append(".".join(parts))
    return modules


def qad_settings(qcfg: QuantizeConfig, student_lr: float) -> tuple[int, float]:
    return qcfg.qad_epochs, qcfg.qad_lr if qcfg.qad_lr is not None else student_lr / 100


def qad_fingerprint(recipe: Recipe, source: Path, qcfg: QuantizeConfig, teacher_weights: Path | None,
                    opset: int) -> str:
    """What the QAD stage's file depends on: the student's weights, the teacher's, data, seed, the distillation
    settings and the quantization settings QAD reads."""
    epochs, lr = qad_settings(qcfg, recipe.model_for(source.name).train.lr)
    parts = {
        "student": file_hash(final_weights(source))[:16],
        "teacher": file_hash(teacher_weights)[:16] if teacher_weights else None,
        "seed": recipe.seed, "data": data_fingerprint(recipe.data),
        "distill": recipe.distill.model_dump(mode="json", exclude={"baseline"}),
        "quantize": {"calibration": qcfg.calibration, "batch_size": qcfg.batch_size, "exclude": qcfg.exclude,
                     "epochs": epochs, "lr": lr, "teacher": qcfg.qad_teacher, "scales": qcfg.qad_scales,
                     **({"scale_lr": qcfg.qad_scale_lr} if qcfg.qad_scales == "learned" else {})},
        "opset": opset, "activation_percentile": ACTIVATION_PERCENTILE,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def qad_stage(recipe: Recipe, source: Path, qcfg: QuantizeConfig, opset: int, write_onnx: WriteOnnx,
              device: str | None = None, consumers: list[Consumer] | None = None,
              data: DataSplits | None = None) -> QadResult:
    """Fine-tune the finished stage `source` (runs/<name>/student, or baseline) as a fake-quantized INT8 model and
    write it with `write_onnx` to runs/<name>/qad/student.qad.onnx; a finished QAD stage with the same fingerprint
    (and its ONNX file intact) is reused, an unfinished one resumed. `data`: the dataset the caller holds (the
    export's), read from the recipe when None."""
    require("modelopt.torch.quantization")
    runs_dir = source.parent.parent
    stage_dir = source.parent / QAD_STAGE
    teacher_weights = teacher_weights_for(recipe, runs_dir) \
        if source.name == "student" and qcfg.qad_teacher == "teacher" else None
    fingerprint = qad_fingerprint(recipe, source, qcfg, teacher_weights, opset)
    plan = plan_stage(stage_dir, QAD_STAGE, fingerprint, runs_dir, resume=True, retrain_stale=True)
    onnx_path = stage_dir / layout.QAD_ONNX
    if plan.action == "reuse":
        if onnx_path.is_file() and plan.previous.get("onnx_sha256") == file_hash(onnx_path):
            return QadResult(**{**plan.previous, "path": onnx_path, "skipped": True})
        plan = StagePlan("train", discard=f"its output {layout.QAD_ONNX} is missing or changed")
    consumers = [ProgressDisplay()] if consumers is None else consumers
    return _train_qad(recipe, source, qcfg, write_onnx, device, consumers, data, plan, teacher_weights, fingerprint)


def _train_qad(recipe: Recipe, source: Path, qcfg: QuantizeConfig, write_onnx: WriteOnnx, device: str | None,
               consumers: list[Consumer], data: DataSplits | None, plan: StagePlan, teacher_weights: Path | None,
               fingerprint: str) -> QadResult:
    import modelopt.torch.quantization as mtq
    from timm.layers import freeze_batch_norm_2d

    cfg = recipe.model_for(source.name)
    epochs, lr = qad_settings(qcfg, cfg.train.lr)
    float_modules = modules_of_nodes(qcfg.exclude)
    stage_dir = source.parent / QAD_STAGE
    metrics = MetricsLog(stage_dir / layout.METRICS)
    started = time.perf_counter()
    with runtime_scope(recipe.runtime, device) as runtime:
        data = data if data is not None else load_dataset(recipe.data, recipe.seed)
        spec = resolve_input_spec(cfg)
        model = load_stage_model(source, data.num_classes, exportable=True, recipe=recipe)
        model = runtime.place(freeze_batch_norm_2d(model))
        calibration = draw_calibration(len(data.train), qcfg, recipe.seed).batches  # the PTQ export's images

        def forward_loop(quantized: torch.nn.Module) -> None:
            with torch.no_grad():
                for idx in calibration:
                    quantized(runtime.format_input(quantized, spec.prepare(data.train.images[idx]).to(runtime.device)))

        model.eval()
        model = mtq.quantize(model, quant_config(float_modules), forward_loop=None)
        calibrate(model, forward_loop)
        quantizers = sum(1 for m in model.modules() if type(m).__name__ == "TensorQuantizer" and m.is_enabled)
        if quantizers == 0:
            raise ExportError(f"{cfg.model}: no Conv or Linear layer to quantize (or every one is in quantize.exclude)")
        calibrated = evaluate(model, spec, data.test.to(runtime.device), cfg.train.batch_size, runtime,
                              cfg.train.limit_eval_batches)["top1"]
        if qcfg.qad_teacher == "student":  # the finished FP32 student, frozen, answers for itself
            teacher, distill = load_frozen_teacher(cfg, final_weights(source), data.num_classes), SELF_DISTILL
        else:  # the recipe's teacher with the recipe's [distill] (none for a baseline: labels alone)
            teacher = load_frozen_teacher(recipe.model_for("teacher"), teacher_weights, data.num_classes) \
                if teacher_weights is not None else None
            distill = None
        # the exported graph holds no OFA/FitNets projectors: the quantized student learns from the logits alone
        if qcfg.qad_scales == "learned":  # before the loop builds its optimizer (and loads a checkpoint)
            learn_scales(model, qcfg.qad_scale_lr)
        run = assemble_run(recipe, source.name, data.num_classes, model=model, teacher=teacher, projectors=False)
        run.learn(recipe, data, runtime, source.parent.parent, consumers, teacher_weights, distill)
        train = cfg.train.model_copy(update={"epochs": epochs, "lr": lr, "min_lr": 0.0, "warmup_epochs": 0.0,
                                             "max_steps": None, "checkpoint_every": 0})
        prepare_stage_dir(plan, stage_dir, recipe, metrics, consumers)
        result = run.fit(recipe, data, train, runtime, stage_dir, title=f"qad {cfg.model}",
                         resume_from=plan.resume_from, consumers=[metrics, *consumers],
                         checkpoint_metadata={"fingerprint": fingerprint, "stage": QAD_STAGE})
        model = model.to("cpu", memory_format=torch.contiguous_format).eval()
        fix_scales(model)
        write_onnx(model, stage_dir / layout.QAD_ONNX, {"stage": QAD_STAGE, "fingerprint": fingerprint})
    shutil.rmtree(stage_dir / layout.CHECKPOINTS, ignore_errors=True)  # the ONNX file is this stage's output
    for link in (layout.LAST, layout.BEST):
        (stage_dir / link).unlink(missing_ok=True)
    outcome = QadResult(
        path=stage_dir / layout.QAD_ONNX, fingerprint=fingerprint, top1=result.final["top1"],
        calibrated_top1=calibrated, epochs=epochs, lr=lr, steps=result.steps, quantizers=quantizers,
        scales=qcfg.qad_scales,
        float_modules=float_modules, teacher=str(teacher_weights) if teacher_weights else None,
        wall_s=round(time.perf_counter() - started, 1), onnx_sha256=file_hash(stage_dir / layout.QAD_ONNX),
    )
    write_json(stage_dir / layout.RESULT, outcome.to_metadata())
    drop_stale(source.parent, QAD_STAGE)
    return outcome
