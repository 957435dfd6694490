"""Parity: the same test images through two runners, logits compared first, metrics derived from them.

    report = verify_export(Path("exports/quickstart"), "onnx")   # writes verify.json, raises if it fails

    ref, labels = predict_all(TorchRunner(...), data.test, batch_size=256)    # the reference, once per export
    cand, _ = predict_all(OnnxRunner(...), data.test, batch_size=256)
    report = judge("pytorch", "onnxruntime", ref, cand, labels, tolerance=recipe.verify.fp32)

Reports top-1/top-5 of each runner, the top-1 delta, argmax agreement and max/mean absolute logit difference,
and passes or fails against the recipe's [verify] tolerance for the artifact's precision.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kdforge.backends import Runner, TorchRunner, open_runner
from kdforge.checkpoint import final_weights
from kdforge.data import DataSplits, ImageDataset, eval_batches, load_dataset
from kdforge.data.loader import read_batches
from kdforge.errors import CheckpointError, ExportError, VerificationError
from kdforge.fileio import check_artifact, file_hash, read_json, read_metadata, write_json
from kdforge.formats import FORMATS
from kdforge.layout import METADATA, RECIPE, VERIFY
from kdforge.metrics import topk_accuracy
from kdforge.models import load_stage_model, resolve_input_spec
from kdforge.recipe import Tolerance, VerifyConfig, load_recipe
from kdforge.runtime import out_of_memory_as_error, runtime_scope


@dataclass(frozen=True)
class VerifyReport:
    reference: str
    candidate: str
    count: int
    reference_top1: float
    reference_top5: float
    candidate_top1: float
    candidate_top5: float
    top1_delta_points: float  # candidate - reference, in percentage points
    agreement: float  # share of images with the same top-1 class
    max_abs_diff: float  # largest absolute logit difference
    mean_abs_diff: float
    tolerance: dict
    passed: bool
    failures: list[str] = field(default_factory=list)
    # paired view of the top-1 change: images the candidate got wrong that the reference got right (lost) and
    # the reverse (gained), and McNemar's exact test on them: a large p-value means the change is within noise
    lost: int = 0
    gained: int = 0
    mcnemar_p: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def predict_all(
    runner: Runner, dataset: ImageDataset, batch_size: int, limit_batches: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one runner on the dataset's evaluation batches (the same batches for every runner), and labels."""
    logits, labels = [], []
    batches = eval_batches(len(dataset), batch_size)[:limit_batches]
    # streamed data is decoded by the data's workers, ahead of the runner
    for idx, images in zip(batches, read_batches(dataset.images, batches), strict=True):
        logits.append(runner.predict(images))
        labels.append(dataset.labels[idx])
    return torch.cat(logits), torch.cat(labels)


def judge(
    reference: str, candidate: str, ref: torch.Tensor, cand: torch.Tensor, labels: torch.Tensor,
    tolerance: Tolerance,
) -> VerifyReport:
    """Compare a reference's and a candidate's logits on the same images (runner names for the report)."""
    diff = (ref - cand).abs()
    ref_acc, cand_acc = topk_accuracy(ref, labels), topk_accuracy(cand, labels)
    agreement = (ref.argmax(1) == cand.argmax(1)).float().mean().item()
    delta = (cand_acc["top1"] - ref_acc["top1"]) * 100
    ref_right, cand_right = ref.argmax(1) == labels, cand.argmax(1) == labels
    lost, gained = int((ref_right & ~cand_right).sum()), int((~ref_right & cand_right).sum())
    failures = []
    if agreement < tolerance.min_agreement:
        failures.append(f"top-1 agreement {agreement:.2%} is below the required {tolerance.min_agreement:.2%}")
    if abs(delta) > tolerance.max_top1_delta:
        failures.append(f"top-1 changed by {delta:+.2f} points, more than the allowed {tolerance.max_top1_delta:.2f}")
    return VerifyReport(
        reference=reference, candidate=candidate, count=len(labels),
        reference_top1=ref_acc["top1"], reference_top5=ref_acc["top5"],
        candidate_top1=cand_acc["top1"], candidate_top5=cand_acc["top5"],
        top1_delta_points=delta, agreement=agreement,
        max_abs_diff=diff.max().item(), mean_abs_diff=diff.mean().item(),
        tolerance=tolerance.model_dump(), passed=not failures, failures=failures,
        lost=lost, gained=gained, mcnemar_p=mcnemar_exact_p(lost, gained),
    )


def mcnemar_exact_p(lost: int, gained: int) -> float:
    """Two-sided exact McNemar test: the probability, if both models were equally accurate, of a split of the
    `lost + gained` discordant images at least as uneven as this one (binomial, p = 1/2)."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(lost, gained) + 1))
    return min(1.0, 2 * tail / 2**n)



def resolve_verify_batch(batch_size: int | None, cfg) -> int:
    """`verify.batch_size`, or by default 256 images at inputs up to 64x64 and as many pixels a batch above (at 224:
    20 images; a batch of 256 there held about 1 GB of runner activations for nothing)."""
    if batch_size is not None:
        return batch_size
    size = resolve_input_spec(cfg).size
    return max(1, min(256, 256 * 64 * 64 // (size * size)))


def verify_export(export_dir: Path, fmt_name: str, device: str | None = None,
                  references: dict | None = None, data: DataSplits | None = None) -> VerifyReport:
    """Verify one artifact of an export against the PyTorch student it came from; writes verify.json either way
    and raises VerificationError (saying by how much) when it fails.

    `references` (a dict the caller keeps between calls) holds the PyTorch student's logits once computed, so
    verifying several formats of one export runs the reference once, not once per format; `data` is the dataset
    the caller already holds (the export job's), read from the recipe when None."""
    meta = read_metadata(export_dir)
    if fmt_name not in meta["formats"]:
        raise ExportError(f"{export_dir}: no {fmt_name} export recorded in {METADATA}; run `kdforge export` first")
    entry = meta["formats"][fmt_name]
    artifact = check_artifact(export_dir, entry)
    stage_dir = Path(meta["run"])
    weights = final_weights(stage_dir)
    if not weights.is_file() or file_hash(weights) != meta["checkpoint_sha256"]:
        raise CheckpointError(f"the PyTorch student {weights} is missing or changed since export; export again")

    recipe = load_recipe(stage_dir / RECIPE)
    cfg = recipe.model_for(stage_dir.name)
    checks = VerifyConfig.model_validate(meta["settings"]["verify"]) if "settings" in meta else recipe.verify
    references = {} if references is None else references
    started = time.perf_counter()
    batch_size, limit = resolve_verify_batch(checks.batch_size, cfg), checks.limit_batches
    with runtime_scope(recipe.runtime, device) as runtime:
        data = data if data is not None else load_dataset(recipe.data, recipe.seed)
        candidate = open_runner(artifact, FORMATS.get(fmt_name).runner,
                                str(runtime.device) if runtime.device.type == "cuda" else None, many_batches=True)
        key = (meta["checkpoint_sha256"], str(runtime.device), candidate.spec, batch_size, limit)
        with out_of_memory_as_error(
            f"verifying {fmt_name} of {cfg.model} on {runtime.device} at batch size {batch_size}",
            "lower verify.batch_size (or compare fewer batches with verify.limit_batches)",
        ):
            if key not in references:
                model = load_stage_model(stage_dir, data.num_classes, recipe=recipe)
                reference = TorchRunner(model, candidate.spec, runtime)
                references[key] = (reference.name, *predict_all(reference, data.test, batch_size, limit))
            reference_name, ref, labels = references[key]
            cand, _ = predict_all(candidate, data.test, batch_size, limit)
        tolerance = getattr(checks, entry["precision"])  # the export's own [verify] settings
        report = judge(reference_name, candidate.name, ref, cand, labels, tolerance)
    record = {**report.to_dict(), "format": fmt_name, "artifact": entry["file"], "artifact_sha256": entry["sha256"],
              "seconds": round(time.perf_counter() - started, 3)}
    reports = read_json(export_dir / VERIFY)
    write_json(export_dir / VERIFY, {**reports, fmt_name: record})
    if not report.passed:
        raise VerificationError(f"{artifact} FAILED verification against the PyTorch student: "
                                + "; ".join(report.failures), report)
    return report


def verify_formats(export_dir: Path, names: list[str] | None = None,
                   device: str | None = None) -> dict[str, VerifyReport]:
    """Verify `names` (default: every format the export recorded), the PyTorch reference computed once; raises
    at the first failure, after writing its report."""
    names = names or list(read_metadata(export_dir)["formats"])
    references: dict = {}
    return {name: verify_export(export_dir, name, device=device, references=references) for name in names}
