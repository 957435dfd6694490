"""Every reference recipe runs end to end at its real model sizes (224x224): 2 steps a stage, several evaluation
batches, the student's ONNX export verified, synthetic data, offline. Evaluation memory of every reference model
is checked to stay flat over the number of evaluation batches (what filled an 80 GB GPU when it did not)."""

from pathlib import Path

import pytest

from kdforge.pipeline import run_distill
from kdforge.recipe import load_recipe
from kdforge.train.stages import train_stage

from .conftest import SYNTH
from .test_real_scale import evaluation_growth, needs_proc

RECIPES = Path(__file__).parents[1] / "recipes"
SINGLE_STAGE = {
    "vit_base_teacher": ("teacher", "teacher"),
    "resnet152_teacher": ("teacher", "teacher"),
    "vit_tiny_baseline": ("baseline", "student"),
    "resnet18_baseline": ("baseline", "student"),
    "mobilevit_s_baseline": ("baseline", "student"),
}
DISTILL = ["vit_to_vit", "vit_to_resnet", "vit_to_mobilevit", "resnet_to_vit", "resnet_to_resnet"]
QUICKSTART = ["quickstart", "quickstart_vit"]


def offline_smoke(synth_root, sections):
    return [
        "data.dataset=synthetic", f"data.root={synth_root}", f"data.synthetic.train={SYNTH['train']}",
        f"data.synthetic.test={SYNTH['test']}", *(f"{s}.pretrained=false" for s in sections),
        "train.max_steps=2", "train.batch_size=2", "teacher.train.batch_size=2", "train.limit_eval_batches=3",
        "runtime.device=cpu",
    ]


def test_every_recipe_is_covered():
    assert {p.stem for p in RECIPES.glob("*.toml")} == {*SINGLE_STAGE, *DISTILL, *QUICKSTART}


@pytest.mark.heavy  # the reference models at 224
@pytest.mark.parametrize("name", sorted(SINGLE_STAGE))
def test_reference_recipe_trains_two_steps_offline(name, synth_root, tmp_path):
    stage, section = SINGLE_STAGE[name]
    overrides = offline_smoke(synth_root, [section])
    if section == "student":
        overrides.remove("teacher.train.batch_size=2")  # no [teacher] in a baseline recipe
    result = train_stage(load_recipe(RECIPES / f"{name}.toml", overrides), stage, runs_dir=tmp_path, consumers=[])
    assert result.steps == 2 and result.input_size == 224
    assert (tmp_path / name / stage / "last" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory) -> Path:
    """One runs folder for the five reference distillations: as on a user's machine, the three with a ViT-B
    teacher train it once and the two with a ResNet-152 teacher likewise (the teacher store adopts it)."""
    return tmp_path_factory.mktemp("reference-runs")


@pytest.mark.heavy  # the reference models at 224
@pytest.mark.parametrize("name", DISTILL)
def test_reference_distillation_runs_end_to_end_offline(name, synth_root, tmp_path, reference_runs):
    recipe = load_recipe(RECIPES / f"{name}.toml", [
        *offline_smoke(synth_root, ["teacher", "student"]), 'export.formats=["onnx"]',
        f"export.dir={tmp_path / 'exports'}", "verify.batch_size=4", "verify.limit_batches=2",
    ])
    assert (recipe.distill.method, recipe.distill.temperature, recipe.distill.alpha) == ("kd", 4.0, 0.5)
    summary = run_distill(recipe, runs_dir=reference_runs, consumers=[])
    assert summary.teacher["input_size"] == summary.student["input_size"] == 224
    assert summary.compression > 1
    assert (reference_runs / name / "summary.json").is_file()
    onnx = summary.exports["onnx"]
    assert onnx["passed"] and onnx["agreement"] == 1.0 and onnx["max_abs_diff"] < 1e-3, onnx


@pytest.mark.heavy  # the reference models at 224
@needs_proc
@pytest.mark.parametrize("model", ["vit_base_patch16_224", "resnet152", "vit_tiny_patch16_224", "resnet18",
                                   "mobilevit_s"])
def test_reference_model_evaluation_memory_is_flat_over_batches(model):
    from kdforge.models import create_model
    from kdforge.recipe import ModelConfig

    few, many = evaluation_growth(create_model(ModelConfig(model=model), num_classes=100), 224, batch=2,
                                  few=2, many=6)
    assert many < few + 100, f"{model}: peak memory grew {few:.0f} MB over 2 batches but {many:.0f} MB over 6"


@pytest.mark.slow
@pytest.mark.parametrize("name", QUICKSTART)
def test_quickstart_chain_runs_end_to_end_with_exports(name, synth_root, tmp_path):
    recipe = load_recipe(RECIPES / f"{name}.toml", [
        f"data.root={synth_root}", f"data.synthetic.train={SYNTH['train']}", f"data.synthetic.test={SYNTH['test']}",
        "train.max_steps=2", "train.limit_eval_batches=1",
        f"export.dir={tmp_path / 'exports'}", "verify.limit_batches=1", "quantize.calibration=64",
    ])
    summary = run_distill(recipe, runs_dir=tmp_path / "runs", consumers=[])
    assert set(summary.exports) == {"onnx", "int8"}
    assert all(row["passed"] for row in summary.exports.values())


def test_the_five_reference_distillations_share_two_teachers():
    """Reproducing the five trains one ViT-B and one ResNet-152 teacher (the others are reused by fingerprint)."""
    from kdforge.train.stages import stage_fingerprint

    teachers = {name: stage_fingerprint(load_recipe(RECIPES / f"{name}.toml"), "teacher")
                for name in ("vit_to_vit", "vit_to_resnet", "vit_to_mobilevit", "resnet_to_vit", "resnet_to_resnet")}
    assert len(set(teachers.values())) == 2
    assert teachers["vit_to_vit"] == teachers["vit_to_resnet"] == teachers["vit_to_mobilevit"]
    assert teachers["resnet_to_vit"] == teachers["resnet_to_resnet"]


def test_the_vit_quickstart_reuses_the_quickstarts_teacher():
    """Same [teacher] section, same fingerprint: after `make demo`, quickstart_vit finds the finished teacher in
    the store instead of training it again."""
    from kdforge.train.stages import stage_fingerprint

    fingerprints = {stage_fingerprint(load_recipe(RECIPES / f"{name}.toml"), "teacher") for name in QUICKSTART}
    assert len(fingerprints) == 1
