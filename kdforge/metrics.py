"""Accuracy from logits: the one top-k that the training loop's evaluation, export verification and (through the
same tie rule) the server's ranking share.

Ties go to the lower class index, as `argmax` and the server's stable ranking (`serve/model.py`) break them. An
INT8 model whose output is quantized ties often (the demo's INT8 student: 430 of 2,000 test images have two equal
top logits); with `torch.topk`'s own order, verification once reported 25.10% top-1 for a file the server answers
25.75% correctly with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """k -> per-image bool: the label is among the k highest logits (k capped at the number of classes; equal
    logits ranked by class index)."""
    ranked = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :min(max(ks), logits.shape[1])]
    top = ranked == labels[:, None]
    return {k: top[:, :k].any(dim=1) for k in ks}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": ..., "top5": ...}: the fraction of images with a top-k hit."""
    return {f"top{k}": hits.float().mean().item() for k, hits in topk_hits(logits, labels, ks).items()}
