"""One training loop (`loop.fit`) and the stages built on it (`stages.train_stage`)."""

from kdforge.train.loop import Plan, cross_entropy_objective, evaluate, fit, predict_logits, topk_accuracy
from kdforge.train.stages import STAGES, StageResult, train_stage

__all__ = [
    "STAGES", "Plan", "StageResult", "cross_entropy_objective", "evaluate", "fit", "predict_logits",
    "topk_accuracy", "train_stage",
]
