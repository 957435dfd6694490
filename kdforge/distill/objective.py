"""What a model learns from: an objective maps (logits, labels, augmented uint8 images) to a loss and its named
parts. The training loop (train/loop.py) calls one and knows nothing else about it. Labels are class indices
(N,), or mixed targets (N, C) under mixup / CutMix: cross-entropy reads them as they are, a method that needs a
class (DKD's target class) gets the larger share of each mix.

    objective = cross_entropy_objective(label_smoothing=0.1)                       # labels alone
    objective = create_distill_objective(recipe.distill, teacher, label_smoothing=0.1)
    loss, parts = objective(student_logits, labels, augmented_uint8_images, epoch=1)   # {"ce": ..., "kd": ...}

Distillation methods are chosen by name from `losses.METHODS`; each maps (student logits, teacher logits,
labels, config, epoch counted from 1) to {term name: (weight, value)}; cross-entropy on labels is added here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from kdforge.distill.features import FeatureHints, StageProjectors
from kdforge.distill.losses import METHODS, Terms, ce_weight
from kdforge.distill.teacher import FrozenTeacher

if TYPE_CHECKING:
    from kdforge.recipe import DistillConfig


class Objective(Protocol):
    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
        teacher_logits: torch.Tensor | None = None, epoch: int = 1,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...  # epoch counts from 1 (DKD's warm-up reads it)


Logits = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # one head, or (class head, distillation head)


def heads(logits: Logits) -> tuple[torch.Tensor, torch.Tensor]:
    """(class head, distillation head) of a student's training output. A student with a distillation token (timm's
    distilled DeiT and PiT, `set_distilled_training`) answers both while it trains: the labels teach the class
    head, the teacher the distillation head (DeiT, Touvron et al. 2021). Any other student's one tensor is both."""
    return (logits[0], logits[1]) if isinstance(logits, tuple) else (logits, logits)


def prediction(logits: Logits) -> torch.Tensor:
    """What the student answers: a two-headed student the average of its heads (as it does in eval mode, so also
    in evaluation, export and serving)."""
    return (logits[0] + logits[1]) / 2 if isinstance(logits, tuple) else logits


def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class indices of labels that may be soft (mixup / CutMix targets, (N, C)): the larger share of each mix."""
    return labels.argmax(1) if labels.ndim == 2 else labels


def cross_entropy_objective(label_smoothing: float = 0.0) -> Objective:
    """Training on labels alone (a teacher, a baseline student)."""
    def objective(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor, teacher_logits=None, epoch=1):
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        return loss, {"ce": loss}

    return objective


def create_distill_objective(cfg: DistillConfig, teacher: FrozenTeacher | None,
                             label_smoothing: float = 0.0,
                             projectors: StageProjectors | FeatureHints | None = None) -> Objective:
    """The objective; the teacher answers each batch unless the loop passes its cached `teacher_logits`
    (then `teacher` may be None). `projectors`: the student's intermediate stages (method ofa: each distilled as
    its own logits, `ofa1`, `ofa2`, ... weighted by `ofa_weight`; method fitnet: regressed onto the teacher's
    stages, `hint`, weighted by `hint_weight`; see distill/features.py)."""
    terms_of = METHODS.get(cfg.method)

    def objective(logits: Logits, labels: torch.Tensor, images: torch.Tensor,
                  teacher_logits: torch.Tensor | None = None, epoch: int = 1):
        if teacher_logits is None:
            if teacher is None:
                raise ValueError("no teacher and no cached teacher logits for this batch")
            teacher_logits = teacher(images)
        class_head, distillation_head = heads(logits)
        ce = F.cross_entropy(class_head.float(), labels, label_smoothing=label_smoothing)
        terms: Terms = {"ce": (ce_weight(cfg), ce)}
        terms.update(terms_of(distillation_head, teacher_logits, hard_labels(labels), cfg, epoch=epoch))
        if projectors is not None:  # ofa: one term per student stage; fitnet: the feature hints
            terms.update(projectors.terms(teacher_logits, hard_labels(labels), cfg))
        total = sum(weight * value for weight, value in terms.values() if weight)
        return total, {name: value.detach() for name, (_, value) in terms.items()}

    return objective
