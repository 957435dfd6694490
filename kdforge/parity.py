"""Parity, the arithmetic: a reference's and a candidate's logits on the same images -> top-1/top-5 of each, the
top-1 delta, argmax agreement, max/mean |logit difference|, the paired lost/gained images with McNemar's exact
test, and pass or fail against a tolerance. Numpy only (torch-free): the judge (judge.py, which runs the PyTorch
student) uses it, and what runs without torch (the serving image, a device) can judge with the same arithmetic.

    report = compare("pytorch (cpu, fp32)", "onnxruntime (CPU)", ref, cand, labels, tolerance)

Ties go to the lower class index, as in `metrics.topk_hits` and the server's ranking; accuracies and agreement are
float32 means, as torch computed them before this module existed (the same values in verify.json); the mean
|logit difference| is a float64 mean (it differs from torch's float32 one in the 8th digit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np


class Tolerance(Protocol):  # recipe.Tolerance: what the recipe's [verify] allows for one precision
    min_agreement: float  # share of images whose top-1 class is the same
    max_top1_delta: float  # |top-1 difference| in percentage points


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
    # the top-1 agreement with the reference of a sample run one image per call, as the server's /predict runs it
    # (kdforge/judge.py checks it against the batched run's); None where not measured (the device probe runs every
    # image one per call)
    one_per_call_agreement: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def row(self) -> dict[str, Any]:
        """What a results table (and summary.json's export rows) shows of a verification."""
        return {"verified": True, "pytorch_top1": self.reference_top1, "exported_top1": self.candidate_top1,
                "agreement": self.agreement, "max_abs_diff": self.max_abs_diff, "passed": self.passed,
                "top1_delta_points": self.top1_delta_points, "mcnemar_p": self.mcnemar_p}


def share(hits: np.ndarray) -> float:
    """The fraction of True in `hits`, as a float32 mean (torch's `hits.float().mean()`)."""
    return float(np.float32(np.count_nonzero(hits)) / np.float32(max(len(hits), 1)))


def topk_hits(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, np.ndarray]:
    """k -> per-image bool: the label is among the k highest logits (k capped at the number of classes; equal
    logits ranked by class index)."""
    ranked = np.argsort(-logits, axis=1, kind="stable")[:, :min(max(ks), logits.shape[1])]
    top = ranked == labels[:, None]
    return {k: top[:, :k].any(axis=1) for k in ks}


def compare(reference: str, candidate: str, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray,
            tolerance: Tolerance) -> VerifyReport:
    """Judge a candidate's logits against a reference's on the same images (runner names for the report)."""
    ref, cand = np.asarray(ref, np.float32), np.asarray(cand, np.float32)
    labels = np.asarray(labels)
    diff = np.abs(ref - cand)
    ref_hits, cand_hits = topk_hits(ref, labels), topk_hits(cand, labels)
    ref_top1, cand_top1 = share(ref_hits[1]), share(cand_hits[1])
    agreement = share(ref.argmax(1) == cand.argmax(1))
    delta = (cand_top1 - ref_top1) * 100
    lost = int(np.count_nonzero(ref_hits[1] & ~cand_hits[1]))  # right before, wrong now
    gained = int(np.count_nonzero(~ref_hits[1] & cand_hits[1]))
    failures = []
    if agreement < tolerance.min_agreement:
        failures.append(f"top-1 agreement {agreement:.2%} is below the required {tolerance.min_agreement:.2%}")
    if round(abs(delta), 4) > tolerance.max_top1_delta:  # float32 shares: 1 of 100 images is 1.0000005 points
        failures.append(f"top-1 changed by {delta:+.2f} points, more than the allowed {tolerance.max_top1_delta:.2f}")
    return VerifyReport(
        reference=reference, candidate=candidate, count=len(labels),
        reference_top1=ref_top1, reference_top5=share(ref_hits[5]),
        candidate_top1=cand_top1, candidate_top5=share(cand_hits[5]),
        top1_delta_points=delta, agreement=agreement,
        max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean(dtype=np.float64)),
        tolerance={"min_agreement": tolerance.min_agreement, "max_top1_delta": tolerance.max_top1_delta},
        passed=not failures, failures=failures,
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
