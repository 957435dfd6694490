"""Knowledge distillation: pure losses, the weighted objective, the frozen teacher."""

from kdforge.distill.losses import dkd_parts, hard_distillation_loss, kd_loss
from kdforge.distill.objective import METHODS, create_distill_objective
from kdforge.distill.teacher import FrozenTeacher, load_frozen_teacher

__all__ = [
    "METHODS", "FrozenTeacher", "create_distill_objective", "dkd_parts", "hard_distillation_loss", "kd_loss",
    "load_frozen_teacher",
]
