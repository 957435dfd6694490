"""Parity: the same test images through two runners, logits compared first, metrics derived from them.

    report = compare(TorchRunner(...), OnnxRunner(...), data.test, batch_size=256, tolerance=recipe.verify.fp32)

Reports top-1/top-5 of each runner, the top-1 delta, argmax agreement and max/mean absolute logit difference,
and passes or fails against the recipe's [verify] tolerance for the artifact's precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from kdforge.backends import Runner
from kdforge.data import ImageDataset, eval_batches
from kdforge.recipe import Tolerance
from kdforge.train.loop import topk_accuracy


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

    def to_dict(self) -> dict:
        return asdict(self)


def run_both(
    reference: Runner, candidate: Runner, dataset: ImageDataset, batch_size: int, limit_batches: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of both runners on identical batches, and the labels."""
    ref, cand, labels = [], [], []
    for idx in eval_batches(len(dataset), batch_size)[:limit_batches]:
        images = dataset.images[idx]
        ref.append(reference.predict(images))
        cand.append(candidate.predict(images))
        labels.append(dataset.labels[idx])
    return torch.cat(ref), torch.cat(cand), torch.cat(labels)


def judge(
    reference: Runner, candidate: Runner, ref: torch.Tensor, cand: torch.Tensor, labels: torch.Tensor,
    tolerance: Tolerance,
) -> VerifyReport:
    diff = (ref - cand).abs()
    ref_acc, cand_acc = topk_accuracy(ref, labels), topk_accuracy(cand, labels)
    agreement = (ref.argmax(1) == cand.argmax(1)).float().mean().item()
    delta = (cand_acc["top1"] - ref_acc["top1"]) * 100
    failures = []
    if agreement < tolerance.min_agreement:
        failures.append(f"top-1 agreement {agreement:.2%} is below the required {tolerance.min_agreement:.2%}")
    if abs(delta) > tolerance.max_top1_delta:
        failures.append(f"top-1 changed by {delta:+.2f} points, more than the allowed {tolerance.max_top1_delta:.2f}")
    return VerifyReport(
        reference=reference.name, candidate=candidate.name, count=len(labels),
        reference_top1=ref_acc["top1"], reference_top5=ref_acc["top5"],
        candidate_top1=cand_acc["top1"], candidate_top5=cand_acc["top5"],
        top1_delta_points=delta, agreement=agreement,
        max_abs_diff=diff.max().item(), mean_abs_diff=diff.mean().item(),
        tolerance=tolerance.model_dump(), passed=not failures, failures=failures,
    )


def compare(
    reference: Runner, candidate: Runner, dataset: ImageDataset, batch_size: int, tolerance: Tolerance,
    limit_batches: int | None = None,
) -> VerifyReport:
    ref, cand, labels = run_both(reference, candidate, dataset, batch_size, limit_batches)
    return judge(reference, candidate, ref, cand, labels, tolerance)
