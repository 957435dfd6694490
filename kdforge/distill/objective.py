"""The distillation objective: named loss terms, each with a weight, summed; every part is returned for logging.

    objective = create_distill_objective(recipe.distill, teacher, label_smoothing=0.1)
    loss, parts = objective(student_logits, labels, augmented_uint8_images, epoch=1)   # {"ce": ..., "kd": ...}

Methods are chosen by name from METHODS; each maps (student logits, teacher logits, labels, config, epoch counted
from 1) to {term name: (weight, value)}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kdforge.distill.losses import dkd_parts, hard_distillation_loss, kd_loss
from kdforge.distill.teacher import FrozenTeacher
from kdforge.registry import Registry

if TYPE_CHECKING:
    from kdforge.recipe import DistillConfig
    from kdforge.train.loop import Objective

Terms = dict[str, tuple[float, torch.Tensor]]
METHODS: Registry[Callable[..., Terms]] = Registry("distillation method")


@METHODS.register("kd")
def _kd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig,
        epoch: int = 1) -> Terms:
    return {"kd": (cfg.alpha, kd_loss(student, teacher, cfg.temperature))}


@METHODS.register("hard")
def _hard(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig,
          epoch: int = 1) -> Terms:
    return {"hard": (cfg.alpha, hard_distillation_loss(student, teacher))}


@METHODS.register("dkd")
def _dkd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig,
         epoch: int = 1) -> Terms:
    tckd, nckd = dkd_parts(student, teacher, labels, cfg.temperature)
    warmup = min(epoch / cfg.dkd_warmup_epochs, 1.0) if cfg.dkd_warmup_epochs else 1.0
    return {"tckd": (warmup * cfg.dkd_alpha, tckd), "nckd": (warmup * cfg.dkd_beta, nckd)}


def ce_weight(cfg: DistillConfig) -> float:
    """Cross-entropy on labels gets 1 - alpha for kd/hard (Hinton's and DeiT's mix), 1 for dkd (as in the paper)."""
    return 1.0 if cfg.method == "dkd" else 1.0 - cfg.alpha


def create_distill_objective(cfg: DistillConfig, teacher: FrozenTeacher | None,
                             label_smoothing: float = 0.0) -> Objective:
    """The objective; the teacher answers each batch unless the loop passes its cached `teacher_logits`
    (then `teacher` may be None)."""
    terms_of = METHODS.get(cfg.method)

    def objective(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
                  teacher_logits: torch.Tensor | None = None, epoch: int = 1):
        if teacher_logits is None:
            if teacher is None:
                raise ValueError("no teacher and no cached teacher logits for this batch")
            teacher_logits = teacher(images)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        terms: Terms = {"ce": (ce_weight(cfg), ce)}
        terms.update(terms_of(logits, teacher_logits, labels, cfg, epoch=epoch))
        total = sum(weight * value for weight, value in terms.values() if weight)
        return total, {name: value.detach() for name, (_, value) in terms.items()}

    return objective
