"""Distillation from the student's intermediate stages, OFA-style (Hao et al., NeurIPS 2023): each chosen stage of
the student gets a small training-only projector from its feature map to class logits, and those logits are
distilled from the teacher's logits like the student's own (`losses.ofa_loss`). Only logits are compared, so the
teacher can be of any architecture (its features are never read, and the teacher cache serves this method too).

    projectors = StageProjectors(student, spec, num_classes)     # forward hooks on the student's stages
    logits = student(images)                                      # the hooks capture each stage's output
    per_stage = projectors()                                      # [(N, classes) logits, one per stage]

The projectors live beside the student, never in it: the student's weights, its export and its serving are those
of the plain model; the training loop optimizes and checkpoints the projectors as an extra module (for --resume).
Stages are read from timm's `feature_info` (the blocks of a ViT, the stages of a CNN); a model that has none is
refused by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdforge.data.transforms import InputSpec
from kdforge.errors import ModelError

MAX_STAGES = 4  # as OFA: four stages of a CNN, four evenly spaced blocks of a ViT


def chosen_stages(model: nn.Module, name: str) -> list[dict]:
    """The `feature_info` entries of up to MAX_STAGES stages, evenly spaced and ending at the last one (a CNN's
    stem, at 1/2 resolution, is not a stage)."""
    info = getattr(model, "feature_info", None)
    entries = [dict(entry) for entry in info] if info else []
    entries = [entry for entry in entries if entry.get("reduction", 4) >= 4 and entry.get("module")]
    if not entries:
        raise ModelError(f"method = \"ofa\" distills the student's intermediate stages, and timm's {name} does not "
                         f"list them (no feature_info); choose another method or student")
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
            raise ModelError(f"a stage answers {tokens.shape[1]} tokens, not a square grid; method = \"ofa\" needs "
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


class StageProjectors(nn.Module):
    """Forward hooks on the student's chosen stages and one projector per stage (see the module's docstring)."""

    def __init__(self, student: nn.Module, spec: InputSpec, num_classes: int, name: str = "the student") -> None:
        super().__init__()
        stages = chosen_stages(student, name)
        modules = dict(student.named_modules())
        self.names = [entry["module"] for entry in stages]
        self.prefix_tokens = int(getattr(student, "num_prefix_tokens", 0) or 0)
        self.channels = [int(entry["num_chs"]) for entry in stages]
        self.captured: dict[str, torch.Tensor] = {}
        self.handles = [modules[stage].register_forward_hook(self._capture(stage)) for stage in self.names]
        shapes = self._probe(student, spec)
        final_side = min(shape[-1] for shape in shapes)
        width = max(int(getattr(student, "num_features", 0) or 0), max(self.channels))
        self.heads = nn.ModuleList(
            projector(shape[1], max(0, round(math.log2(shape[-1] / final_side))), width, num_classes)
            for shape in shapes)

    def _capture(self, stage: str):
        def hook(module, inputs, output) -> None:
            self.captured[stage] = output
        return hook

    @torch.no_grad()
    def _probe(self, student: nn.Module, spec: InputSpec) -> list[torch.Size]:
        """The NCHW shape of each stage's output, from one forward pass of two blank images in eval mode (batch
        statistics untouched)."""
        was_training = student.training
        student.eval()
        try:
            device = next(student.parameters()).device
            student(torch.zeros(2, 3, spec.size, spec.size, device=device))
        finally:
            student.train(was_training)
        return [self._map(i).shape for i in range(len(self.names))]

    def _map(self, index: int) -> torch.Tensor:
        return as_feature_map(self.captured[self.names[index]], self.channels[index], self.prefix_tokens)

    def forward(self) -> list[torch.Tensor]:
        """Logits of each stage for the batch the student has just seen."""
        return [head(self._map(i)) for i, head in enumerate(self.heads)]

    def remove(self) -> None:
        """Take the hooks off the student."""
        for handle in self.handles:
            handle.remove()
        self.captured.clear()
