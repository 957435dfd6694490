"""timm model factory: create teachers and students, resolve each model's input size and mean/std.

    model = create_model(recipe.teacher, num_classes=100)
    spec = resolve_input_spec(recipe.teacher)      # InputSpec(size=224, mean=(0.5, ...), std=(0.5, ...))

Initial weights come from timm's own pretrained download (`pretrained = true`) or from a local file
(`weights = "..."`), which timm loads the same way: the classifier is re-initialized when the file was made
for another number of classes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kdforge.checkpoint import check_final_weights, load_weights
from kdforge.data.transforms import InputSpec
from kdforge.errors import ModelError
from kdforge.fileio import read_json
from kdforge.layout import LAST, RECIPE, RESULT
from kdforge.recipe import ModelConfig, Recipe, load_recipe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_input_spec(cfg: ModelConfig) -> InputSpec:
    """Input size and normalization: the recipe's values first, then model_kwargs.img_size, then timm's."""
    import timm

    pretrained = timm.get_pretrained_cfg(cfg.model)
    default_size = pretrained.input_size[-1] if pretrained and pretrained.input_size else 224
    img_size = cfg.model_kwargs.get("img_size")
    size = cfg.input_size or (int(img_size) if isinstance(img_size, int) else default_size)
    mean = cfg.mean or (tuple(pretrained.mean) if pretrained and pretrained.mean else IMAGENET_MEAN)
    std = cfg.std or (tuple(pretrained.std) if pretrained and pretrained.std else IMAGENET_STD)
    return InputSpec(size=size, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


def create_model(cfg: ModelConfig, num_classes: int, exportable: bool = False) -> torch.nn.Module:
    """`exportable`: build with timm's export-friendly layers (for ONNX export)."""
    import timm

    kwargs: dict = dict(cfg.model_kwargs)
    pretrained = cfg.pretrained
    if cfg.weights:
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = {"file": cfg.weights}
    # timm logs where weights come from; keep that quiet unless the user configured logging
    logging.getLogger("timm").setLevel(logging.WARNING)
    try:
        return timm.create_model(cfg.model, pretrained=pretrained, num_classes=num_classes, exportable=exportable,
                                 **kwargs)
    except TypeError as exc:
        raise ModelError(f"{cfg.model}: model_kwargs {cfg.model_kwargs} not accepted: {exc}") from None
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        if not pretrained:
            raise
        if cfg.weights:
            raise ModelError(f"{cfg.model}: cannot load weights from {cfg.weights}: {exc}") from None
        raise ModelError(
            f"{cfg.model}: could not download pretrained weights ({type(exc).__name__}: {str(exc)[:200]}). "
            f"Offline? Put the weights file on this machine and set weights = \"/path/to/model.safetensors\" "
            f"in this model's recipe section (or --set <section>.weights=...), or use pretrained = false."
        ) from None


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_stage_model(stage_dir: Path, num_classes: int, exportable: bool = False,
                     recipe: Recipe | None = None) -> torch.nn.Module:
    """The PyTorch model of a finished (or checkpointed) stage: rebuilt from the stage's recipe without
    pretrained weights, then its final (`last`) weights loaded strictly. `recipe`: the stage's recipe when the
    caller already read it."""
    recipe = recipe or load_recipe(stage_dir / RECIPE)
    cfg = recipe.model_for(stage_dir.name)
    model = create_model(cfg.model_copy(update={"pretrained": False, "weights": None}), num_classes,
                         exportable=exportable)
    recorded = read_json(stage_dir / RESULT).get("weights_sha256")  # {} for a stage still training
    check_final_weights(stage_dir, recorded)
    return load_weights(model, stage_dir / LAST)
