"""Accuracy from logits: the one top-k both the training loop's evaluation and export verification use."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """k -> per-image bool: the label is among the k highest logits (k capped at the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices == labels[:, None]
    return {k: top[:, :k].any(dim=1) for k in ks}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": ..., "top5": ...}: the fraction of images with a top-k hit."""
    return {f"top{k}": hits.float().mean().item() for k, hits in topk_hits(logits, labels, ks).items()}
