"""Distillation losses: pure functions of logits (and labels), no state, no modules; and the methods by name.

Each loss has a golden-value test. A method (METHODS, what `[distill] method` names) weights them; the objective
(`objective.py`) adds cross-entropy. This module sits below the recipe, which validates method names here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kdforge.registry import Registry

if TYPE_CHECKING:
    from kdforge.recipe import DistillConfig

Terms = dict[str, tuple[float, torch.Tensor]]
METHODS: Registry[Callable[..., Terms]] = Registry("distillation method")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): KL(teacher || student) of temperature-softened distributions, times T^2.

    The T^2 factor keeps the gradient scale independent of T, so alpha means the same at any temperature.
    Averaged over the batch.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def hard_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DeiT (Touvron et al., 2021) hard-label distillation: cross-entropy against the teacher's argmax."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=1))


def dkd_parts(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD (Zhao et al., 2022): (TCKD, NCKD), each times T^2 and averaged over the batch.

    TCKD: KL between the binary (target, all others) distributions of teacher and student.
    NCKD: KL between the distributions over the non-target classes only.
    """
    t = temperature
    s, te = student_logits.float() / t, teacher_logits.float() / t
    target = F.one_hot(labels, s.shape[1]).bool()

    def binary(logits: torch.Tensor) -> torch.Tensor:  # log [p_target, p_others]
        log_p = F.log_softmax(logits, dim=1)
        log_target = log_p.masked_select(target)
        log_others = torch.logsumexp(log_p.masked_fill(target, float("-inf")), dim=1)
        return torch.stack([log_target, log_others], dim=1)

    tckd = F.kl_div(binary(s), binary(te), reduction="batchmean", log_target=True) * (t * t)
    # non-target distribution: drop the target class (a -inf logit) and renormalize
    log_s_nt = F.log_softmax(s.masked_fill(target, float("-inf")), dim=1).masked_fill(target, 0.0)
    log_t_nt = F.log_softmax(te.masked_fill(target, float("-inf")), dim=1).masked_fill(target, 0.0)
    nckd = (log_t_nt.exp() * (log_t_nt - log_s_nt)).sum(dim=1).mean() * (t * t)
    return tckd, nckd


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of `a` with the same row of `b` (cosine similarity of the centred rows;
    `eps` keeps a constant row finite, as in DIST's reference code)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_parts(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST (Huang et al., 2022): (inter, intra), each times T^2, on softmax(z / T) of student and teacher.

    inter: 1 - the mean over images of the Pearson correlation of their class probabilities (the ranking of
    classes for one image); intra: the same over classes, each class's probabilities across the batch (which
    images look most like that class). Matching correlations instead of the probabilities themselves is what
    lets a much stronger teacher help (the paper's point).
    """
    t = temperature
    p_s = F.softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    inter = 1 - pearson_rows(p_s, p_t).mean()
    intra = 1 - pearson_rows(p_s.T, p_t.T).mean()
    return inter * (t * t), intra * (t * t)


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, eps: float,
             temperature: float = 1.0) -> torch.Tensor:
    """OFA (Hao et al., 2023): cross-entropy of the student's softmax(z / T) against the teacher's, the target
    class's share modulated: weights (p_teacher + onehot)^eps - onehot. eps = 1 is the plain soft cross-entropy;
    eps > 1 raises the target class's weight where the teacher is unsure of it (the paper's remedy for a teacher
    of another architecture). Averaged over the batch."""
    target = F.one_hot(labels, student_logits.shape[1]).float()
    p_teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    weights = (p_teacher + target).pow(eps) - target
    return -(weights * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(dim=1).mean()


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Logit standardization (Sun et al., 2024): each logit vector z-scored, (z - mean) / (std + 1e-7) with the
    unbiased standard deviation, as the reference code's `normalize`. The temperature then divides a vector of
    unit spread, so the student matches the teacher's ranking of classes, not its logits' range."""
    logits = logits.float()
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + 1e-7)


def _standardized(student: torch.Tensor, teacher: torch.Tensor,
                  cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logit vectors standardized when `[distill] logit_standardization` asks for it."""
    if cfg.logit_standardization:
        return standardize(student), standardize(teacher)
    return student, teacher


# ----------------------------------------------------------------------------------------------------------
# methods by name


@METHODS.register("kd")
def _kd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig,
        epoch: int = 1) -> Terms:
    student, teacher = _standardized(student, teacher, cfg)
    return {"kd": (cfg.alpha, kd_loss(student, teacher, cfg.temperature))}


@METHODS.register("hard")
def _hard(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig,
          epoch: int = 1) -> Terms:
    return {"hard": (cfg.alpha, hard_distillation_loss(student, teacher))}


@METHODS.register("dkd")
def _dkd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig,
         epoch: int = 1) -> Terms:
    student, teacher = _standardized(student, teacher, cfg)
    tckd, nckd = dkd_parts(student, teacher, labels, cfg.temperature)
    warmup = min(epoch / cfg.dkd_warmup_epochs, 1.0) if cfg.dkd_warmup_epochs else 1.0
    return {"tckd": (warmup * cfg.dkd_alpha, tckd), "nckd": (warmup * cfg.dkd_beta, nckd)}


@METHODS.register("dist")
def _dist(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig,
          epoch: int = 1) -> Terms:
    inter, intra = dist_parts(student, teacher, cfg.temperature)
    return {"inter": (cfg.dist_beta, inter), "intra": (cfg.dist_gamma, intra)}


@METHODS.register("ofa")
def _ofa(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig,
         epoch: int = 1) -> Terms:
    # the student's own logits; the objective adds one such term per intermediate stage (distill/features.py)
    return {"ofa": (1.0, ofa_loss(student, teacher, labels, cfg.ofa_eps, cfg.ofa_temperature))}


@METHODS.register("fitnet")
def _fitnet(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig,
            epoch: int = 1) -> Terms:
    # Hinton KD on the logits; the objective adds the feature hints (distill/features.py, `hint_loss`)
    return {"kd": (cfg.alpha, kd_loss(student, teacher, cfg.temperature))}


def hint_loss(adapted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FitNets' hint (Romero et al., ICLR 2015): the mean squared error between the student's adapted feature map
    and the teacher's, both (N, C, H, W) of the same shape."""
    return F.mse_loss(adapted.float(), target.float())


def ce_weight(cfg: DistillConfig) -> float:
    """Cross-entropy on labels gets 1 - alpha for kd/hard/fitnet (Hinton's and DeiT's mix), 1 for dkd, dist and ofa
    (as in their papers)."""
    return 1.0 if cfg.method in ("dkd", "dist", "ofa") else 1.0 - cfg.alpha
