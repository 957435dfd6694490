"""Distillation from the student's intermediate stages, two ways:

- OFA-style (Hao et al., NeurIPS 2023; method "ofa", `StageProjectors`): each chosen stage of the student gets a
  small training-only projector from its feature map to class logits, and those logits are distilled from the
  teacher's logits like the student's own (`losses.ofa_loss`). Only logits are compared, so the teacher can be of
  any architecture (its features are never read, and the teacher cache serves this method too).
- FitNets hints (Romero et al., ICLR 2015; method "fitnet", `FeatureHints`): the student's stages are paired with
  the teacher's (the last ones of each, in order), a learned 1x1 adapter maps each student map to the teacher's
  channels and resolution, and the mean squared error to the teacher's map is a loss term (`losses.hint_loss`).
  Meant for pairs of one family (CNN -> CNN, ViT -> ViT), where stages correspond; it reads the teacher's features,
  so the teacher runs online.

    projectors = StageProjectors(student, spec, num_classes)     # forward hooks on the student's stages
    logits = student(images)                                      # the hooks capture each stage's output
    terms = projectors.terms(teacher_logits, labels, cfg)         # {"ofa1": (weight, loss), ...}

Projectors and adapters live beside the student, never in it: the student's weights, its export and its serving
are those of the plain model; the training loop optimizes and checkpoints them as an extra module (for --resume).
Stages are read from timm's `feature_info` (the blocks of a ViT, the stages of a CNN); a model that has none is
refused by name.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.data.transforms import InputSpec
from kdforge.distill.losses import Terms, hint_loss, ofa_loss
from kdforge.errors import ModelError

if TYPE_CHECKING:
    from kdforge.recipe import DistillConfig

MAX_STAGES = 4  # as OFA: four stages of a CNN, four evenly spaced blocks of a ViT


def chosen_stages(model: nn.Module, name: str) -> list[dict]:
    """The `feature_info` entries of up to MAX_STAGES stages, evenly spaced and ending at the last one (a CNN's
    stem, at 1/2 resolution, is not a stage)."""
    info = getattr(model, "feature_info", None)
    entries = [dict(entry) for entry in info] if info else []
    entries = [entry for entry in entries if entry.get("reduction", 4) >= 4 and entry.get("module")]
    if not entries:
        raise ModelError(f"this method distills intermediate stages, and timm's {name} does not list them (no "
                         f"feature_info); choose another method or model")
    count = len(entries)
    if count <= MAX_STAGES:
        return entries
    return [entries[math.ceil((k + 1) * count / MAX_STAGES) - 1] for k in range(MAX_STAGES)]


def as_feature_map(output, channels: int, prefix_tokens: int) -> torch.Tensor:
    """A stage's output as an NCHW map: tokens (N, L, C) lose the class/distillation tokens and become their
    square grid; NHWC maps are turned NCHW."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.ndim == 3:
        tokens = output[:, prefix_tokens:]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ModelError(f"a stage answers {tokens.shape[1]} tokens, not a square grid; feature methods need "
                             f"square token grids")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    if output.ndim == 4 and output.shape[1] != channels and output.shape[-1] == channels:
        return output.permute(0, 3, 1, 2)
    return output


def projector(channels: int, halvings: int, width: int, num_classes: int) -> nn.Sequential:
    """Feature map -> logits: `halvings` depthwise-separable stride-2 convolutions (channels doubling, the last to
    `width`), or one 1x1 convolution to `width` at the final resolution; then global average pooling and a linear
    classifier."""
    layers: list[nn.Module] = []
    for i in range(halvings):
        out = width if i == halvings - 1 else channels * 2
        layers += [nn.Conv2d(channels, channels, 3, 2, 1, groups=channels, bias=False), nn.BatchNorm2d(channels),
                   nn.Conv2d(channels, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    if not halvings:
        layers += [nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class StageTaps:
    """Forward hooks on a model's chosen stages: what each answered in the model's last forward pass, as NCHW maps."""

    def __init__(self, model: nn.Module, name: str) -> None:
        stages = chosen_stages(model, name)
        modules = dict(model.named_modules())
        self.names = [entry["module"] for entry in stages]
        self.channels = [int(entry["num_chs"]) for entry in stages]
        self.prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.captured: dict[str, torch.Tensor] = {}
        self.handles = [modules[stage].register_forward_hook(self._capture(stage)) for stage in self.names]

    def _capture(self, stage: str):
        def hook(module, inputs, output) -> None:
            self.captured[stage] = output
        return hook

    def map(self, index: int) -> torch.Tensor:
        return as_feature_map(self.captured[self.names[index]], self.channels[index], self.prefix_tokens)

    def maps(self) -> list[torch.Tensor]:
        return [self.map(i) for i in range(len(self.names))]

    @torch.no_grad()
    def probe(self, model: nn.Module, size: int) -> list[torch.Size]:
        """The NCHW shape of each stage's output, from one forward pass of two blank images in eval mode (batch
        statistics untouched)."""
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            model(torch.zeros(2, 3, size, size, device=device))
        finally:
            model.train(was_training)
        return [m.shape for m in self.maps()]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.captured.clear()


class StageProjectors(nn.Module):
    """OFA: forward hooks on the student's chosen stages and one projector per stage (see the module's docstring)."""

    def __init__(self, student: nn.Module, spec: InputSpec, num_classes: int, name: str = "the student") -> None:
        super().__init__()
        self.taps = StageTaps(student, name)
        self.names = self.taps.names
        shapes = self.taps.probe(student, spec.size)
        final_side = min(shape[-1] for shape in shapes)
        width = max(int(getattr(student, "num_features", 0) or 0), max(self.taps.channels))
        self.heads = nn.ModuleList(
            projector(shape[1], max(0, round(math.log2(shape[-1] / final_side))), width, num_classes)
            for shape in shapes)

    def forward(self) -> list[torch.Tensor]:
        """Logits of each stage for the batch the student has just seen."""
        return [head(self.taps.map(i)) for i, head in enumerate(self.heads)]

    def terms(self, teacher_logits: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig) -> Terms:
        """One OFA term per stage (`ofa1`, `ofa2`, ... weighted by `ofa_weight`)."""
        return {f"ofa{stage}": (cfg.ofa_weight, ofa_loss(logits, teacher_logits, labels, cfg.ofa_eps,
                                                         cfg.ofa_temperature))
                for stage, logits in enumerate(self(), start=1)}

    def describe(self) -> str:
        return (f"{len(self.heads)} stages ({', '.join(self.names)}) distilled through training-only projectors "
                f"(not part of the exported student)")

    def remove(self) -> None:
        """Take the hooks off the student."""
        self.taps.remove()


class FeatureHints(nn.Module):
    """FitNets: the student's last stages paired with the teacher's, one adapter each (see the module's docstring).
    The teacher's maps are what its hooks captured in the same step (it answers the batch before the loss)."""

    def __init__(self, student: nn.Module, spec: InputSpec, teacher: nn.Module, teacher_spec: InputSpec,
                 names: tuple[str, str] = ("the student", "the teacher")) -> None:
        super().__init__()
        self.student_taps, self.teacher_taps = StageTaps(student, names[0]), StageTaps(teacher, names[1])
        pairs = min(len(self.student_taps.names), len(self.teacher_taps.names))
        self.student_stages = list(range(len(self.student_taps.names)))[-pairs:]
        self.teacher_stages = list(range(len(self.teacher_taps.names)))[-pairs:]
        student_shapes = self.student_taps.probe(student, spec.size)
        teacher_shapes = self.teacher_taps.probe(teacher, teacher_spec.size)
        self.sizes = [tuple(teacher_shapes[t][-2:]) for t in self.teacher_stages]
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Conv2d(student_shapes[s][1], teacher_shapes[t][1], 1, bias=False),
                          nn.BatchNorm2d(teacher_shapes[t][1]))
            for s, t in zip(self.student_stages, self.teacher_stages, strict=True))
        self.names = [f"{self.student_taps.names[s]}->{self.teacher_taps.names[t]}"
                      for s, t in zip(self.student_stages, self.teacher_stages, strict=True)]

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(adapted student map, teacher map) per pair, at the teacher's resolution."""
        pairs = []
        for adapter, s, t, size in zip(self.adapters, self.student_stages, self.teacher_stages, self.sizes,
                                       strict=True):
            adapted = adapter(self.student_taps.map(s))
            if tuple(adapted.shape[-2:]) != size:
                adapted = F.interpolate(adapted, size=size, mode="bilinear", align_corners=False)
            pairs.append((adapted, self.teacher_taps.map(t).detach()))
        return pairs

    def terms(self, teacher_logits: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig) -> Terms:
        """One term, `hint`: the mean over pairs of each pair's squared error, weighted by `hint_weight`."""
        pairs = self()
        return {"hint": (cfg.hint_weight, sum(hint_loss(a, t) for a, t in pairs) / len(pairs))}

    def describe(self) -> str:
        return (f"{len(self.adapters)} stage pairs ({', '.join(self.names)}) regressed onto the teacher's through "
                f"training-only adapters (not part of the exported student); the teacher runs on every step")

    def remove(self) -> None:
        """Take the hooks off the student and the teacher."""
        self.student_taps.remove()
        self.teacher_taps.remove()
