"""Parity, judged: the same test images through the PyTorch student and a candidate runner, logits compared first,
metrics derived from them. Pure: it reads no file; the export job calls it with what it holds (student, data,
the runner on the file it just made), `kdforge verify` (verify.py) with what it read from an export folder.

    report = verify_runner(candidate, lambda: student, data.test, recipe.verify, "fp32", runtime, references={},
                           batch_size=20, what="onnx of resnet18")
    ref, labels = predict_all(TorchRunner(...), data.test, batch_size=256)    # the pieces
    report = judge("pytorch", "onnxruntime", ref, cand, labels, tolerance=recipe.verify.fp32)

Reports top-1/top-5 of each runner, the top-1 delta, argmax agreement and max/mean absolute logit difference,
and passes or fails against the recipe's [verify] tolerance for the artifact's precision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdforge.data import ImageDataset, eval_batches
from kdforge.data.loader import read_batches
from kdforge.errors import VerificationError
from kdforge.fileio import read_json, write_json
from kdforge.layout import VERIFY
from kdforge.metrics import topk_accuracy
from kdforge.models import resolve_input_spec
from kdforge.runners import Runner, TorchRunner
from kdforge.runtime import Runtime, out_of_memory_as_error

if TYPE_CHECKING:
    from kdforge.recipe import ModelConfig, Tolerance, VerifyConfig


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

    def row(self) -> dict[str, Any]:
        """What a results table (and summary.json's export rows) shows of a verification."""
        return {"verified": True, "pytorch_top1": self.reference_top1, "exported_top1": self.candidate_top1,
                "agreement": self.agreement, "max_abs_diff": self.max_abs_diff, "passed": self.passed,
                "top1_delta_points": self.top1_delta_points, "mcnemar_p": self.mcnemar_p}


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


def resolve_verify_batch(batch_size: int | None, cfg: ModelConfig) -> int:
    """`verify.batch_size`, or by default 256 images at inputs up to 64x64 and as many pixels a batch above (at 224:
    20 images; a batch of 256 there held about 1 GB of runner activations for nothing)."""
    if batch_size is not None:
        return batch_size
    size = resolve_input_spec(cfg).size
    return max(1, min(256, 256 * 64 * 64 // (size * size)))


def verify_runner(candidate: Runner, student: Callable[[], torch.nn.Module], data: ImageDataset,
                  checks: VerifyConfig, precision: str, runtime: Runtime, references: dict[Any, Any],
                  batch_size: int, what: str) -> VerifyReport:
    """Judge `candidate` against the PyTorch student (`student()` gives it, called only when its logits are not in
    `references` yet) on `data` (the test split) with the tolerance of `precision` in `checks` ([verify]).

    `references` (a dict the caller keeps for one student) holds the student's logits per (device, input spec,
    batch, limit), so verifying several formats runs the PyTorch student once, not once per format."""
    limit = checks.limit_batches
    key = (str(runtime.device), candidate.spec, batch_size, limit)
    with out_of_memory_as_error(
        f"verifying {what} on {runtime.device} at batch size {batch_size}",
        "lower verify.batch_size (or compare fewer batches with verify.limit_batches)",
    ):
        if key not in references:
            reference = TorchRunner(student(), candidate.spec, runtime)
            references[key] = (reference.name, *predict_all(reference, data, batch_size, limit))
        reference_name, ref, labels = references[key]
        cand, _ = predict_all(candidate, data, batch_size, limit)
    return judge(reference_name, candidate.name, ref, cand, labels, getattr(checks, precision))


def record_verification(export_dir: Path, name: str, entry: dict[str, Any], report: VerifyReport,
                        started: float) -> None:
    """Add format `name`'s report (with the artifact it judged, metadata.json's `entry`) to verify.json."""
    record = {**report.to_dict(), "format": name, "artifact": entry["file"], "artifact_sha256": entry["sha256"],
              "seconds": round(time.perf_counter() - started, 3)}
    write_json(export_dir / VERIFY, {**read_json(export_dir / VERIFY), name: record})


def verification_failed(artifact: Path, report: VerifyReport) -> VerificationError:
    return VerificationError(f"{artifact} FAILED verification against the PyTorch student: "
                             + "; ".join(report.failures), report)
