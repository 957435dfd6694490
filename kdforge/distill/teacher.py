"""The frozen teacher: eval mode, no gradients, no optimizer state, its OWN input size and normalization."""

from __future__ import annotations

from pathlib import Path

import torch

from kdforge.checkpoint import load_weights
from kdforge.data.transforms import InputSpec
from kdforge.models import create_model, resolve_input_spec
from kdforge.recipe import ModelConfig


class FrozenTeacher:
    """Wraps a trained model so it can only answer: `teacher(images_uint8) -> logits`.

    It receives the same augmented uint8 batch as the student and prepares it its own way (resize to its
    input size, its mean/std), so both see the same crop and flip, each as at its own evaluation.
    """

    def __init__(self, model: torch.nn.Module, spec: InputSpec) -> None:
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.memory_format = torch.contiguous_format

    @torch.no_grad()  # not inference_mode: the KD loss saves these logits' softmax for the student's backward
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.spec.prepare(images).contiguous(memory_format=self.memory_format))

    def to(self, device: torch.device, channels_last: bool = False) -> FrozenTeacher:
        self.model.to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.memory_format = torch.channels_last
        return self


def load_frozen_teacher(cfg: ModelConfig, weights: Path, num_classes: int) -> FrozenTeacher:
    """Build the teacher architecture (no pretrained download: the trained weights replace it) and load them."""
    model = create_model(cfg.model_copy(update={"pretrained": False, "weights": None}), num_classes)
    load_weights(model, weights)
    return FrozenTeacher(model, resolve_input_spec(cfg))
