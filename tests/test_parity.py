"""The judge's arithmetic (kdforge/parity.py, numpy) gives the numbers torch gave: top-k with ties to the lower class
index, float32 shares, the paired lost/gained count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdforge.metrics import topk_accuracy
from kdforge.parity import compare, mcnemar_exact_p, topk_hits
from kdforge.recipe import Tolerance


def logits_with_ties(seed: int, n: int = 997, classes: int = 10) -> np.ndarray:
    """Quantized logits (what an INT8 model answers): many images with two or more equal top logits."""
    return (np.random.default_rng(seed).integers(0, 4, (n, classes)) * 0.5).astype(np.float32)


def test_top_k_and_shares_equal_torchs_on_tied_logits():
    labels = np.random.default_rng(2).integers(0, 10, 997)
    for seed in range(5):
        logits = logits_with_ties(seed)
        ours = topk_hits(logits, labels)
        theirs = topk_accuracy(torch.from_numpy(logits), torch.from_numpy(labels))  # {"top1": ..., "top5": ...}
        report = compare("a", "b", logits, logits, labels, Tolerance(min_agreement=1, max_top1_delta=0))
        assert report.reference_top1 == theirs["top1"] and report.reference_top5 == theirs["top5"]
        assert ours[1].sum() == round(theirs["top1"] * 997)


def test_agreement_lost_gained_and_the_verdict():
    labels = np.array([0, 1, 2, 3])
    ref = np.eye(4, dtype=np.float32)[[0, 1, 2, 0]]  # right, right, right, wrong
    cand = np.eye(4, dtype=np.float32)[[0, 2, 2, 3]]  # right, wrong (lost), right, right (gained)
    report = compare("pytorch", "onnx", ref, cand, labels, Tolerance(min_agreement=0.9, max_top1_delta=1.0))
    assert (report.agreement, report.lost, report.gained, report.top1_delta_points) == (0.5, 1, 1, 0.0)
    assert report.max_abs_diff == 1.0 and report.mean_abs_diff == pytest.approx(4 / 16)
    assert not report.passed and report.failures == ["top-1 agreement 50.00% is below the required 90.00%"]
    assert report.mcnemar_p == mcnemar_exact_p(1, 1) == 1.0
    assert report.tolerance == {"min_agreement": 0.9, "max_top1_delta": 1.0}


def test_a_change_of_exactly_the_allowed_points_passes():
    """One image of 100 gained is a change of exactly 1 point (1.0000001 in float32 shares): within a tolerance of
    1.0 point, as the recipe says; two images are not."""
    labels = np.arange(100) % 10
    ref = np.eye(10, dtype=np.float32)[(labels + 1) % 10]  # every image wrong
    one, two = ref.copy(), ref.copy()
    one[0], two[:2] = np.eye(10, dtype=np.float32)[labels[0]], np.eye(10, dtype=np.float32)[labels[:2]]
    assert compare("a", "b", ref, one, labels, Tolerance(min_agreement=0, max_top1_delta=1.0)).passed
    assert not compare("a", "b", ref, two, labels, Tolerance(min_agreement=0, max_top1_delta=1.0)).passed
