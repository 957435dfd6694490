"""What a recipe's chain will do, from the recipe alone (torch-free): its stages, the formats it exports, and the
line that says so before anything starts. The one owner of both lists; the chain, the export, the student search
and the CLI ask here.

    plan_stages(recipe)     # ["teacher", "baseline", "student", "export"]
    recipe_formats(recipe)  # ["onnx", "int8"]
    describe_plan(recipe)   # "quickstart: teacher resnet10t 3 epochs -> ..."
"""

from __future__ import annotations

from kdforge.errors import RecipeError
from kdforge.layout import TRAINING_STAGES
from kdforge.recipe import AUTO, Recipe


def recipe_formats(recipe: Recipe) -> list[str]:
    """The formats a recipe asks for: [export] formats, plus int8 when [quantize] is enabled."""
    formats = list(recipe.export.formats)
    if recipe.quantize.enabled and "int8" not in formats:
        formats.append("int8")
    return formats


def plan_stages(recipe: Recipe) -> list[str]:
    """The chain's stages in order: the teacher (or the evaluation of a given one), the baseline when the recipe
    wants it, the distilled student, and the export when there is a format to make."""
    if recipe.teacher is None or recipe.student is None:
        missing = "[teacher]" if recipe.teacher is None else "[student]"
        raise RecipeError(f"recipe {recipe.name!r} has no {missing} section; distillation needs both")
    stages = ["teacher_eval" if recipe.teacher.checkpoint else "teacher"]
    if recipe.distill.baseline:
        stages.append("baseline")
    stages.append("student")
    if recipe_formats(recipe) or recipe.student.model == AUTO:  # an "auto" student ships in its search's format
        stages.append("export")
    return stages


def describe_plan(recipe: Recipe, stages: list[str] | None = None) -> str:
    """One line saying what the chain will do, before it starts."""
    parts = []
    for stage in plan_stages(recipe) if stages is None else stages:
        if stage in TRAINING_STAGES:
            cfg = recipe.model_for(stage)
            what = {"teacher": "teacher", "baseline": "baseline (labels only)",
                    "student": f"distilled student ({recipe.distill.method} from the teacher)"}[stage]
            model = cfg.model
            if model == AUTO:
                model = f"(chosen by the search: {cfg.search.format} p50 <= {cfg.search.budget_ms:g} ms)"
            parts.append(f"{what} {model} {cfg.train.epochs} epoch{'s' * (cfg.train.epochs != 1)}")
        elif stage == "teacher_eval":
            parts.append(f"evaluate the teacher {recipe.teacher.checkpoint}")
        elif stage == "export":
            formats = recipe_formats(recipe)
            if recipe.student.model == AUTO and recipe.student.search.format not in formats:
                formats.append(recipe.student.search.format)
            parts.append("export " + ", ".join(formats)
                         + (" + verification on the test split" if recipe.export.verify else ""))
    return f"{recipe.name}: " + " -> ".join(parts)
