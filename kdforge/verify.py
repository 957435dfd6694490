"""Parity: the same test images through two runners, logits compared first, metrics derived from them.

    ref, labels = predict_all(TorchRunner(...), data.test, batch_size=256)    # the reference, once per export
    cand, _ = predict_all(OnnxRunner(...), data.test, batch_size=256)
    report = judge("pytorch", "onnxruntime", ref, cand, labels, tolerance=recipe.verify.fp32)

Reports top-1/top-5 of each runner, the top-1 delta, argmax agreement and max/mean absolute logit difference,
and passes or fails against the recipe's [verify] tolerance for the artifact's precision.
"""

from __future__ import annotations

import math
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
    for idx in eval_batches(len(dataset), batch_size)[:limit_batches]:
        logits.append(runner.predict(dataset.images[idx]))
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

