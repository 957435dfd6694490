"""The reference teacher/baseline recipes run end to end at their real model sizes (2 steps, synthetic data)."""

from pathlib import Path

import pytest

from kdforge.recipe import load_recipe
from kdforge.train import train_stage

from .conftest import SYNTH

RECIPES = Path(__file__).parents[1] / "recipes"
REFERENCE = {
    "vit_base_teacher": ("teacher", "teacher"),
    "resnet152_teacher": ("teacher", "teacher"),
    "vit_tiny_baseline": ("baseline", "student"),
    "resnet18_baseline": ("baseline", "student"),
    "mobilevit_s_baseline": ("baseline", "student"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_recipe_trains_two_steps_offline(name, synth_root, tmp_path):
    stage, section = REFERENCE[name]
    recipe = load_recipe(RECIPES / f"{name}.toml", [
        "data.dataset=synthetic", f"data.root={synth_root}", f"data.synthetic.train={SYNTH['train']}",
        f"data.synthetic.test={SYNTH['test']}", f"{section}.pretrained=false",
        "train.max_steps=2", "train.batch_size=2", "train.limit_eval_batches=1", "runtime.device=cpu",
    ])
    result = train_stage(recipe, stage, runs_dir=tmp_path, consumers=[])
    assert result.steps == 2 and result.input_size == 224
    assert (tmp_path / name / stage / "last" / "model.safetensors").is_file()
