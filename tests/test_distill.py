import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.data.transforms import InputSpec
from kdforge.distill.losses import METHODS, dist_parts, dkd_parts, hard_distillation_loss, kd_loss
from kdforge.distill.objective import create_distill_objective
from kdforge.distill.teacher import FrozenTeacher
from kdforge.pipeline import run_distill
from kdforge.recipe import DistillConfig, load_recipe
from kdforge.rng import rng_stream

from .conftest import TINY_MODELS

S = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
T = [[3.0, 2.0, 1.0], [0.0, 1.0, -1.0]]
LABELS = [2, 0]


def softmax(row, temperature):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def test_kd_loss_golden_value_includes_t_squared():
    # KL(softmax(t/2) || softmax(s/2)) * 2^2, averaged over the batch, written out by hand
    expected = sum(kl(softmax(t, 2.0), softmax(s, 2.0)) for s, t in zip(S, T, strict=True)) / 2 * 4
    assert kd_loss(torch.tensor(S), torch.tensor(T), 2.0).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.6361172, rel=1e-6)  # golden value (checked by hand)
    assert kd_loss(torch.tensor(T), torch.tensor(T), 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_matches_timms_logit_distillation_task():
    from timm.task import LogitDistillationTask
    from timm.task.distillation import DistillationTeacher

    student_logits, teacher_logits = torch.randn(8, 10), torch.randn(8, 10)

    class Fixed(torch.nn.Module):  # a "model" answering fixed logits, with the config timm reads
        def __init__(self, logits):
            super().__init__()
            self.logits = logits
            self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return self.logits + 0 * self.anchor

    task = LogitDistillationTask(Fixed(student_logits), DistillationTeacher(Fixed(teacher_logits)), temperature=4.0,
                                 task_loss_weight=0.5, verbose=False)
    out = task(torch.zeros(8, 3, 4, 4), torch.zeros(8, dtype=torch.long))
    assert kd_loss(student_logits, teacher_logits, 4.0).item() == pytest.approx(out["kd_loss"].item(), rel=1e-5)


def test_hard_distillation_is_cross_entropy_against_the_teachers_argmax():
    expected = (-math.log(softmax(S[0], 1)[0]) - math.log(softmax(S[1], 1)[1])) / 2
    assert hard_distillation_loss(torch.tensor(S), torch.tensor(T)).item() == pytest.approx(expected, rel=1e-6)


def test_dkd_parts_golden_values_and_the_papers_decomposition():
    temperature = 2.0
    tckd, nckd = dkd_parts(torch.tensor(S), torch.tensor(T), torch.tensor(LABELS), temperature)
    tckd_ref, nckd_ref, kd_ref = 0.0, 0.0, 0.0
    for s, t, y in zip(S, T, LABELS, strict=True):
        ps, pt = softmax(s, temperature), softmax(t, temperature)
        tckd_ref += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        others = [i for i in range(3) if i != y]
        nckd_ref += kl([pt[i] / (1 - pt[y]) for i in others], [ps[i] / (1 - ps[y]) for i in others])
        # Zhao et al. (2022), eq. 4: KD = TCKD + (1 - p_t) * NCKD, per sample
        kd_ref += kl(pt, ps)
        assert kl(pt, ps) == pytest.approx(
            kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
            + (1 - pt[y]) * kl([pt[i] / (1 - pt[y]) for i in others], [ps[i] / (1 - ps[y]) for i in others])
        )
    scale = temperature**2 / len(S)
    assert tckd.item() == pytest.approx(tckd_ref * scale, rel=1e-5)
    assert nckd.item() == pytest.approx(nckd_ref * scale, rel=1e-5)
    assert (tckd.item(), nckd.item()) == pytest.approx((0.4450171, 1.6765152), rel=1e-5)  # golden values


def test_dist_is_one_minus_pearson_correlation_per_image_and_per_class():
    """DIST's two terms against numpy's own correlation coefficient, on a batch where every row and column varies."""
    import numpy as np

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=generator), 3 * torch.randn(8, 10, generator=generator)
    p_s = F.softmax(student.double() / 4.0, dim=1).numpy()
    p_t = F.softmax(teacher.double() / 4.0, dim=1).numpy()
    inter = 1 - np.mean([np.corrcoef(p_s[i], p_t[i])[0, 1] for i in range(8)])
    intra = 1 - np.mean([np.corrcoef(p_s[:, j], p_t[:, j])[0, 1] for j in range(10)])
    computed = dist_parts(student, teacher, 4.0)
    assert [v.item() for v in computed] == pytest.approx([16 * inter, 16 * intra], rel=1e-4)
    # the teacher's own predictions, or any that rank classes and images as it does linearly, cost nothing
    assert [v.item() for v in dist_parts(teacher, teacher, 4.0)] == pytest.approx([0.0, 0.0], abs=1e-5)
    terms = METHODS.get("dist")(student, teacher, torch.zeros(8, dtype=torch.long),
                                DistillConfig(method="dist", dist_beta=2.0, dist_gamma=0.5))
    assert terms["inter"][0] == 2.0 and terms["intra"][0] == 0.5


def test_logit_standardization_z_scores_each_vector_before_kd_and_dkd():
    def z(row):  # (z - mean) / (unbiased std + 1e-7), written out
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        return [(v - mean) / (std + 1e-7) for v in row]

    expected = sum(kl(softmax(z(t), 2.0), softmax(z(s), 2.0)) for s, t in zip(S, T, strict=True)) / 2 * 4
    assert expected == pytest.approx(1.2806264, rel=1e-6)  # golden value
    cfg = DistillConfig(method="kd", temperature=2.0, logit_standardization=True)
    assert METHODS.get("kd")(torch.tensor(S), torch.tensor(T), torch.tensor(LABELS), cfg)["kd"][1].item() \
        == pytest.approx(expected, rel=1e-6)
    # a logit vector shifted and scaled is the same vector after standardizing: the student need not match the
    # teacher's logit range, only its shape
    shifted = [[5 * v + 3 for v in row] for row in T]
    assert METHODS.get("kd")(torch.tensor(shifted), torch.tensor(T), torch.tensor(LABELS), cfg)["kd"][1].item() \
        == pytest.approx(0.0, abs=1e-6)
    dkd = DistillConfig(method="dkd", temperature=2.0, logit_standardization=True)
    terms = METHODS.get("dkd")(torch.tensor(S), torch.tensor(T), torch.tensor(LABELS), dkd)
    tckd, nckd = dkd_parts(torch.tensor([z(r) for r in S]), torch.tensor([z(r) for r in T]), torch.tensor(LABELS), 2.0)
    assert (terms["tckd"][1].item(), terms["nckd"][1].item()) == pytest.approx((tckd.item(), nckd.item()), rel=1e-6)
    assert (tckd.item(), nckd.item()) == pytest.approx((0.4410288, 1.1691527), rel=1e-5)  # golden values
    with pytest.raises(ValueError, match="logit_standardization applies to method kd or dkd, not 'hard'"):
        DistillConfig(method="hard", logit_standardization=True)


def test_a_two_headed_student_learns_labels_in_one_head_and_the_teacher_in_the_other():
    """DeiT: cross-entropy on labels reads the class head, the method (hard: the teacher's top class) the
    distillation head; the student's answer is the average of the two."""
    from kdforge.distill.objective import prediction

    class_head, distillation_head = torch.tensor(S), torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    cfg = DistillConfig(method="hard", alpha=0.5)
    loss, parts = create_distill_objective(cfg, None)((class_head, distillation_head), torch.tensor(LABELS),
                                                      torch.zeros(2, 3, 2, 2), teacher_logits=torch.tensor(T))
    ce = F.cross_entropy(class_head, torch.tensor(LABELS))
    hard = F.cross_entropy(distillation_head, torch.tensor(T).argmax(1))  # the teacher's classes: 0 and 1
    assert parts["ce"].item() == pytest.approx(ce.item()) and parts["hard"].item() == pytest.approx(hard.item())
    assert loss.item() == pytest.approx(0.5 * ce.item() + 0.5 * hard.item())
    assert torch.equal(prediction((class_head, distillation_head)), (class_head + distillation_head) / 2)


@pytest.mark.slow
def test_a_deit_student_with_a_distillation_token_trains_exports_one_output_and_verifies(make_recipe, tmp_path):
    import onnx

    deit = ('model = "deit_tiny_distilled_patch16_224"\ninput_size = 32\n'
            'model_kwargs = { img_size = 32, patch_size = 4, depth = 2 }\n')
    body = TINY_MODELS.replace('model = "test_convnext"\ninput_size = 32\n', deit)
    path = make_recipe(body + '\n[distill]\nmethod = "hard"\nbaseline = false\n\n[export]\nformats = ["onnx"]\n'
                       f'dir = "{tmp_path / "exports"}"\n')
    notes = []
    summary = run_distill(load_recipe(path, ["train.max_steps=4", "train.log_every=2", "train.limit_eval_batches=1",
                                             "verify.limit_batches=1"]), runs_dir=tmp_path / "runs",
                          consumers=[lambda event: notes.append(event.get("message", ""))])
    assert summary.student["model"] == "deit_tiny_distilled_patch16_224"
    assert any("distillation head (hard)" in note for note in notes), notes
    events = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "student" / "metrics.jsonl").read_text()
              .splitlines()]
    assert any("loss_hard" in event for event in events)
    row = summary.exports["onnx"]
    assert row["verified"] and row["passed"], row
    graph = onnx.load(row["artifact"]).graph
    assert len(graph.output) == 1 and graph.output[0].type.tensor_type.shape.dim[1].dim_value == 100


def test_ofa_loss_is_soft_cross_entropy_with_the_target_class_modulated():
    from kdforge.distill.losses import ofa_loss

    def by_hand(eps):
        total = 0.0
        for s, t, y in zip(S, T, LABELS, strict=True):
            ps, pt = softmax(s, 1.0), softmax(t, 1.0)
            weights = [(p + (i == y)) ** eps - (i == y) for i, p in enumerate(pt)]
            total -= sum(w * math.log(q) for w, q in zip(weights, ps, strict=True))
        return total / len(S)

    soft_ce = -sum(sum(p * math.log(q) for p, q in zip(softmax(t, 1.0), softmax(s, 1.0), strict=True))
                   for s, t in zip(S, T, strict=True)) / len(S)
    assert by_hand(1.0) == pytest.approx(soft_ce) == pytest.approx(2.2934716, rel=1e-6)  # eps 1: soft CE
    for eps, golden in ((1.0, 2.2934716), (1.5, 1.9875449)):
        computed = ofa_loss(torch.tensor(S), torch.tensor(T), torch.tensor(LABELS), eps).item()
        assert computed == pytest.approx(by_hand(eps), rel=1e-6) == pytest.approx(golden, rel=1e-6)


@pytest.mark.parametrize("model,kwargs,stages", [
    ("test_convnext", {}, ["stages.0", "stages.1", "stages.2", "stages.3"]),
    ("test_vit", {"img_size": 32, "patch_size": 4}, ["blocks.1", "blocks.2", "blocks.4", "blocks.5"]),  # tokens
])
def test_each_chosen_stage_of_a_cnn_or_a_vit_gets_logits_of_its_own(model, kwargs, stages):
    import timm

    from kdforge.distill.features import StageProjectors

    student = timm.create_model(model, num_classes=7, **kwargs)
    projectors = StageProjectors(student, InputSpec(32, (0.5,) * 3, (0.5,) * 3), 7, model)
    assert projectors.names == stages
    student(torch.randn(3, 3, 32, 32))
    assert [tuple(logits.shape) for logits in projectors()] == [(3, 7)] * 4
    names_before = set(student.state_dict())
    projectors.remove()
    assert set(student.state_dict()) == names_before and not student._forward_hooks  # nothing left in the student
    assert all(not module._forward_hooks for module in student.modules())


def test_fitnet_hints_pair_the_last_stages_and_teach_the_student_not_the_teacher():
    """Each student stage is adapted to its teacher stage's channels and resolution; the hint's gradient reaches the
    student and the adapters, never the teacher; with the teacher cache the method is refused (it reads features)."""
    import timm

    from kdforge.distill.features import FeatureHints

    student = timm.create_model("test_convnext", num_classes=10)
    teacher = timm.create_model("test_resnet", num_classes=10).requires_grad_(False)
    spec = InputSpec(size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    hints = FeatureHints(student, spec, teacher, InputSpec(size=64, mean=(0.5,) * 3, std=(0.5,) * 3))
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        teacher(torch.nn.functional.interpolate(images, size=64))
    student(images)
    pairs = hints()
    teacher_stages = [info for info in teacher.feature_info if info["reduction"] >= 4]
    assert len(pairs) == min(len(student.feature_info), 4, len(teacher_stages)) > 1
    assert all(adapted.shape == target.shape for adapted, target in pairs)
    loss = hints.terms(None, None, DistillConfig(method="fitnet"))["hint"][1]
    loss.backward()
    assert all(p.grad is not None for p in hints.adapters.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    hints.remove()
    with pytest.raises(ValueError, match="teacher cache holds its logits only"):
        DistillConfig(method="fitnet", teacher_cache={"views": 2})


def test_a_student_without_stages_is_refused_by_name():
    from kdforge.distill.features import StageProjectors
    from kdforge.errors import ModelError

    with pytest.raises(ModelError, match="timm's plain_mlp does not list them"):
        StageProjectors(torch.nn.Linear(3, 3), InputSpec(32, (0.5,) * 3, (0.5,) * 3), 3, "plain_mlp")


@pytest.mark.slow
@pytest.mark.parametrize(("method", "terms", "modules"), [
    ("ofa", ("ce", "ofa", "ofa1", "ofa2", "ofa3", "ofa4"), "heads."),
    ("fitnet", ("ce", "kd", "hint"), "adapters."),
])
def test_feature_methods_distil_the_stages_and_export_exactly_the_plain_student(make_recipe, tmp_path, method, terms,
                                                                                 modules):
    """OFA's projectors and FitNets' adapters train beside the student (their terms logged, their state in the
    checkpoint for --resume) and never reach it: the exported graph is the graph of the plain model."""
    import onnx

    from kdforge.checkpoint import load_state, load_weights
    from kdforge.export.converters import torch_to_onnx
    from kdforge.models import create_model

    path = make_recipe(TINY_MODELS + f'\n[distill]\nmethod = "{method}"\nbaseline = false\n\n[export]\n'
                       f'formats = ["onnx"]\ndir = "{tmp_path / "exports"}"\n')
    recipe = load_recipe(path, ["train.max_steps=4", "train.log_every=2", "train.limit_eval_batches=1",
                                "verify.limit_batches=1"])
    summary = run_distill(recipe, runs_dir=tmp_path / "runs", consumers=[])
    stage = tmp_path / "runs" / "tiny" / "student"
    events = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    logged = next(event for event in events if f"loss_{terms[-1]}" in event)
    assert all(math.isfinite(logged[f"loss_{term}"]) for term in terms)
    assert any(key.startswith(modules) for key in load_state(stage / "last")["extra"])
    row = summary.exports["onnx"]
    assert row["verified"] and row["passed"], row
    plain = tmp_path / "plain.onnx"
    model = load_weights(create_model(recipe.model_for("student"), 100, exportable=True), stage / "last")
    torch_to_onnx(model, 32, plain, 17, {})  # the plain model with the student's weights, as kdforge exports
    exported, reference = onnx.load(row["artifact"]).graph, onnx.load(plain).graph
    assert [node.op_type for node in exported.node] == [node.op_type for node in reference.node]
    assert sorted(tuple(t.dims) for t in exported.initializer) == sorted(tuple(t.dims) for t in reference.initializer)


@pytest.mark.slow
def test_an_interrupted_ofa_student_resumes_its_projectors_and_ends_as_an_uninterrupted_one(make_recipe, tmp_path):
    """The projectors' gradients reach the student's stages, so the student's final weights equal an uninterrupted
    run's only if --resume restored the projectors (and their optimizer state) too."""
    from safetensors.torch import load_file

    from kdforge.train.stages import train_stage

    recipe = load_recipe(make_recipe(TINY_MODELS + '\n[distill]\nmethod = "ofa"\n'),
                         ["train.max_steps=4", "train.checkpoint_every=2", "train.limit_eval_batches=1"])
    for runs in ("a", "b"):
        train_stage(recipe, "teacher", runs_dir=tmp_path / runs, consumers=[])
    train_stage(recipe, "student", runs_dir=tmp_path / "a", consumers=[])

    def stop_after_the_step_2_checkpoint(event):
        if event.get("event") == "step" and event["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_stage(recipe, "student", runs_dir=tmp_path / "b", consumers=[stop_after_the_step_2_checkpoint])
    assert not (tmp_path / "b" / "tiny" / "student" / "result.json").exists()
    assert train_stage(recipe, "student", runs_dir=tmp_path / "b", resume=True, consumers=[]).steps == 4
    expected, actual = (load_file(tmp_path / runs / "tiny" / "student" / "last" / "model.safetensors")
                        for runs in ("a", "b"))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def test_objective_weights_named_terms_and_returns_each_part():
    teacher = FrozenTeacher(torch.nn.Identity(), InputSpec(2, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    student_logits = torch.randn(4, 12, requires_grad=True)
    teacher_images = torch.randint(0, 255, (4, 3, 2, 2), dtype=torch.uint8)  # Identity teacher: 12 "logits"
    teacher_logits = teacher(teacher_images).flatten(1)
    teacher.model = torch.nn.Flatten()
    labels = torch.tensor([0, 1, 2, 3])

    cfg = DistillConfig(method="kd", temperature=3.0, alpha=0.7)
    loss, parts = create_distill_objective(cfg, teacher)(student_logits, labels, teacher_images)
    assert set(parts) == {"ce", "kd"}
    assert parts["ce"].item() == pytest.approx(F.cross_entropy(student_logits, labels).item())
    assert parts["kd"].item() == pytest.approx(kd_loss(student_logits, teacher_logits, 3.0).item())
    assert loss.item() == pytest.approx(0.3 * parts["ce"].item() + 0.7 * parts["kd"].item())
    loss.backward()
    assert student_logits.grad is not None

    dkd = DistillConfig(method="dkd", dkd_alpha=1.0, dkd_beta=8.0)
    loss, parts = create_distill_objective(dkd, teacher)(student_logits, labels, teacher_images)
    assert set(parts) == {"ce", "tckd", "nckd"}
    assert loss.item() == pytest.approx(parts["ce"].item() + parts["tckd"].item() + 8 * parts["nckd"].item(),
                                        rel=1e-5)

    # DKD warm-up as in the method's reference code: min(epoch / warmup, 1) on both distillation terms
    warm = create_distill_objective(dkd.model_copy(update={"dkd_warmup_epochs": 4}), teacher)
    for epoch, factor in ((1, 0.25), (3, 0.75), (4, 1.0), (9, 1.0)):
        loss, parts = warm(student_logits.detach(), labels, teacher_images, epoch=epoch)
        distill_part = parts["tckd"].item() + 8 * parts["nckd"].item()
        assert loss.item() == pytest.approx(parts["ce"].item() + factor * distill_part, rel=1e-5)


def test_the_hard_method_by_name_and_mixed_targets_in_the_objective():
    """`method = "hard"` is DeiT's mix: (1 - alpha) CE on the labels + alpha CE on the teacher's argmax. Under mixup
    the labels are mixed targets (N, C): cross-entropy reads them as they are; DKD's target class is the larger
    share of each mix."""
    student, teacher = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)), torch.randn(4, 6)
    mixed = 0.7 * F.one_hot(torch.tensor([0, 1, 2, 3]), 6) + 0.3 * F.one_hot(torch.tensor([3, 2, 1, 0]), 6)
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)

    loss, parts = create_distill_objective(DistillConfig(method="hard", alpha=0.4), None)(
        student, mixed, images, teacher_logits=teacher)
    assert set(parts) == {"ce", "hard"}
    expected = 0.6 * F.cross_entropy(student, mixed) + 0.4 * hard_distillation_loss(student, teacher)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    _, parts = create_distill_objective(DistillConfig(method="dkd"), None)(student, mixed, images,
                                                                            teacher_logits=teacher)
    tckd, nckd = dkd_parts(student, teacher, torch.tensor([0, 1, 2, 3]), 4.0)
    assert (parts["tckd"].item(), parts["nckd"].item()) == pytest.approx((tckd.item(), nckd.item()), rel=1e-6)


def test_a_new_distill_key_at_its_default_keeps_finished_runs_reusable(make_recipe):
    from kdforge.train.stages import stage_fingerprint

    recipe = load_recipe(make_recipe(TINY_MODELS + '\n[distill]\nmethod = "dkd"\n'))
    before = stage_fingerprint(recipe, "student")
    explicit_default = recipe.model_copy(update={"distill": recipe.distill.model_copy(
        update={"dkd_warmup_epochs": 0})})
    warmed = recipe.model_copy(update={"distill": recipe.distill.model_copy(update={"dkd_warmup_epochs": 20})})
    assert stage_fingerprint(explicit_default, "student") == before != stage_fingerprint(warmed, "student")


class Recorder(torch.nn.Module):
    """Wraps a model and keeps the inputs it was given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)


@pytest.mark.slow
def test_teacher_sees_the_same_augmented_batch_with_its_own_size_and_normalization(make_recipe, tmp_path):
    """A teacher with another input size and mean/std than the student sees exactly what it sees at evaluation."""
    from kdforge.data import load_dataset
    from kdforge.data.transforms import augment_batch
    from kdforge.models import create_model, resolve_input_spec
    from kdforge.runtime import Runtime
    from kdforge.train.loop import BatchSource, fit, predict_logits

    recipe = load_recipe(make_recipe(TINY_MODELS), [
        "teacher.input_size=48", "teacher.mean=[0.5, 0.4, 0.3]", "teacher.std=[0.2, 0.3, 0.4]",
        "student.mean=[0.0, 0.0, 0.0]", "student.std=[1.0, 1.0, 1.0]",
    ])
    data = load_dataset(recipe.data)
    teacher_spec, student_spec = resolve_input_spec(recipe.teacher), resolve_input_spec(recipe.student)
    teacher_model = Recorder(create_model(recipe.teacher, data.num_classes))
    student_model = Recorder(create_model(recipe.student, data.num_classes))
    teacher = FrozenTeacher(teacher_model, teacher_spec)
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=None)
    fit(student_model, student_spec, create_distill_objective(recipe.distill, teacher), data,
        recipe.student.train.model_copy(update={"max_steps": 1}), runtime,
        BatchSource(recipe.data.augment, recipe.seed), tmp_path / "stage", title="t")

    # rebuild the step's augmented batch from the seed, as the loop does
    from kdforge.data.dataset import epoch_order

    idx = epoch_order(len(data.train), recipe.student.train.batch_size, recipe.seed, 0)[0]
    images = augment_batch(data.train.images[idx], 4, True, rng_stream(recipe.seed, "augment", 0))
    teacher_input, student_input = teacher_model.inputs[0], student_model.inputs[0]
    assert teacher_input.shape[-1] == 48 and student_input.shape[-1] == 32
    assert torch.equal(teacher_input, teacher_spec.prepare(images))
    assert torch.equal(student_input, student_spec.prepare(images))

    # and what the teacher is fed at evaluation is prepared the same way
    teacher_model.inputs.clear()
    predict_logits(teacher.model, teacher_spec, data.test, 16, runtime, limit_batches=1)
    assert torch.equal(teacher_model.inputs[0], teacher_spec.prepare(data.test.images[:16]))
    # frozen: eval mode, no gradients
    assert not teacher_model.training and not any(p.requires_grad for p in teacher_model.parameters())


@pytest.mark.slow
def test_distill_chain_trains_reuses_and_invalidates_what_depends_on_a_change(make_recipe, tmp_path):
    path = make_recipe(TINY_MODELS + "\n[distill]\nbaseline = true\n")
    runs = tmp_path / "runs"
    steps = ["train.max_steps=4", "train.limit_eval_batches=2"]
    summary = run_distill(load_recipe(path, steps), runs_dir=runs, consumers=[])
    assert summary.teacher["model"] == "test_resnet" and summary.student["model"] == "test_convnext"
    assert summary.gain_top1 == pytest.approx(summary.student["top1"] - summary.baseline["top1"])
    assert summary.compression == pytest.approx(summary.teacher["params"] / summary.student["params"])
    saved = json.loads((runs / "tiny" / "summary.json").read_text())
    assert saved["student"]["top1"] == summary.student["top1"] and summary.reused == []

    again = run_distill(load_recipe(path, steps), runs_dir=runs, consumers=[])
    assert again.reused == ["teacher", "baseline", "student"]

    # a new temperature redoes only the distilled student
    changed = run_distill(load_recipe(path, [*steps, "distill.temperature=2.0"]), runs_dir=runs, consumers=[])
    assert changed.reused == ["teacher", "baseline"]

    # a different teacher redoes the teacher and the student that learned from it, not the baseline
    notes = []
    changed = run_distill(load_recipe(path, [*steps, "distill.temperature=2.0", "teacher.train.lr=1e-3"]),
                          runs_dir=runs, consumers=[notes.append])
    assert changed.reused == ["baseline"]
    assert any("teacher: finished with other settings" in n.get("message", "") for n in notes)


@pytest.mark.slow
def test_distill_with_a_teacher_checkpoint_reports_the_teachers_accuracy(make_recipe, tmp_path):
    path = make_recipe(TINY_MODELS + "\n[distill]\nbaseline = false\n")
    runs = tmp_path / "runs"
    first = run_distill(load_recipe(path, ["train.max_steps=3"]), runs_dir=runs, consumers=[])
    teacher_dir = runs / "tiny" / "teacher"
    reused = run_distill(load_recipe(path, ["train.max_steps=3", f"teacher.checkpoint={teacher_dir}",
                                            "name=other"]), runs_dir=runs, consumers=[])
    assert reused.teacher["top1"] == pytest.approx(first.teacher["top1"])
    assert reused.baseline is None and reused.gain_top1 is None
    assert not (runs / "other" / "teacher").exists()  # evaluated, not retrained
    report = (runs / "other" / "report" / "report.md").read_text()
    summary_row = next(line for line in report.splitlines() if line.startswith("| other |"))
    assert summary_row.split("|")[2].strip().startswith("test_resnet")  # the report names the teacher too


@pytest.mark.slow
def test_distill_command_prints_the_summary_table(make_recipe, tmp_path):
    path = make_recipe(TINY_MODELS)
    result = CliRunner().invoke(app, ["distill", str(path), "--set", "train.max_steps=2",
                                      "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    for word in ("teacher", "baseline", "distilled", "test_resnet", "test_convnext", "fewer parameters", "took ",
                 "threads"):
        assert word in result.stdout
    assert (tmp_path / "runs" / "tiny" / "summary.json").is_file()


def test_distilled_student_needs_a_finished_teacher(make_recipe, tmp_path):
    from kdforge.errors import CheckpointError
    from kdforge.train.stages import train_stage

    with pytest.raises(CheckpointError, match="no trained teacher"):
        train_stage(load_recipe(make_recipe(TINY_MODELS)), "student", runs_dir=tmp_path, consumers=[])


@pytest.mark.slow
def test_two_recipes_with_the_same_teacher_train_it_once(make_recipe, tmp_path, monkeypatch):
    import kdforge.train.assemble as assemble
    from kdforge.train.stages import train_stage

    runs = tmp_path / "runs"
    first = make_recipe(TINY_MODELS + "\n[distill]\nbaseline = false\n", name="first")
    second = make_recipe(TINY_MODELS + "\n[distill]\nbaseline = false\ntemperature = 2.0\n", name="second")
    steps = ["train.max_steps=3", "train.limit_eval_batches=1"]
    done = run_distill(load_recipe(first, steps), runs_dir=runs, consumers=[])

    trained, real_fit = [], assemble.fit
    monkeypatch.setattr(assemble, "fit", lambda *args, **kwargs: trained.append(kwargs["title"]) or real_fit(*args,
                                                                                                             **kwargs))
    notes = []
    again = run_distill(load_recipe(second, steps), runs_dir=runs, consumers=[notes.append])
    assert trained == ["student test_convnext"]  # the teacher was not trained again...
    assert again.teacher["top1"] == done.teacher["top1"] and "teacher" in again.reused
    messages = [n["message"] for n in notes if n["event"] == "note"]
    assert any(f"trained with these settings in {runs / 'first' / 'teacher'}" in m for m in messages)
    assert [m for m in messages if m.startswith("teacher:")] == [m for m in messages if "trained with these" in m]
    mine, theirs = (runs / name / "teacher" / "last" / "model.safetensors" for name in ("second", "first"))
    assert mine.stat().st_ino == theirs.stat().st_ino  # ...its files are linked, not copied
    assert json.loads((runs / "second" / "teacher" / "result.json").read_text())["stage_dir"] == str(
        runs / "second" / "teacher")

    train_stage(load_recipe(second, steps), "teacher", runs_dir=runs, overwrite=True, consumers=[])
    assert trained[-1] == "teacher test_resnet"  # --overwrite trains it...
    assert theirs.is_file() and mine.resolve() != theirs.resolve()  # ...and the first recipe's teacher is intact
    other_teacher = load_recipe(first, [*steps, "teacher.train.lr=1e-3", "name=third"])
    run_distill(other_teacher, runs_dir=runs, consumers=[])
    assert trained[-2:] == ["teacher test_resnet", "student test_convnext"]  # other settings: its own teacher


@pytest.mark.slow
def test_the_chain_says_what_it_will_do_and_how_long_training_should_take_here(make_recipe, tmp_path, monkeypatch):
    """Before its first stage the chain names its stages and, measured from a few real steps of each, how long
    its training should take on this machine; the summary says how long it took and on which CPU."""
    monkeypatch.setattr("kdforge.estimate.MIN_STEPS", 0)  # tiny trainings are normally not worth measuring
    path = make_recipe(TINY_MODELS)
    notes = []
    summary = run_distill(load_recipe(path, ["train.max_steps=6"]), runs_dir=tmp_path / "runs",
                          consumers=[lambda e: notes.append(e["message"]) if e["event"] == "note" else None])
    assert notes[0] == ("tiny: teacher test_resnet 1 epoch -> baseline (labels only) test_convnext 1 epoch -> "
                        "distilled student (kd from the teacher) test_convnext 1 epoch")
    assert re.fullmatch(r"training: about (\d+ min )?\d+ s on this machine \(teacher (\d+ min )?\d+ s, baseline "
                        r"(\d+ min )?\d+ s, student (\d+ min )?\d+ s; measured from the first steps\)", notes[1])
    saved = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert saved["machine"]["cpu"] and saved["machine"]["cpu_capability"] and saved["machine"]["threads"] == 2
    assert 0 < saved["wall_s"] == summary.wall_s

    notes.clear()  # nothing left to train: nothing to estimate
    run_distill(load_recipe(path, ["train.max_steps=6"]), runs_dir=tmp_path / "runs",
                consumers=[lambda e: notes.append(e["message"]) if e["event"] == "note" else None])
    assert not any(n.startswith("training: about") for n in notes)


@pytest.mark.slow
def test_measuring_the_estimate_changes_no_result(make_recipe, tmp_path, monkeypatch):
    """The estimate trains throwaway copies of the models before the chain starts; the chain's weights are the
    same bit for bit as without it (each stage reseeds before it builds its model)."""
    from safetensors.torch import load_file

    from kdforge.estimate import estimate_training

    path = make_recipe(TINY_MODELS)
    weights = {}
    for name, min_steps in (("measured", 0), ("not_measured", 10**9)):
        monkeypatch.setattr("kdforge.estimate.MIN_STEPS", min_steps)
        recipe = load_recipe(path, ["train.max_steps=6"])
        assert (estimate_training(recipe, ["teacher"]) is None) == (name == "not_measured")
        run_distill(recipe, runs_dir=tmp_path / name, consumers=[])
        weights[name] = load_file(tmp_path / name / "tiny" / "student" / "last" / "model.safetensors")
    assert weights["measured"].keys() == weights["not_measured"].keys()
    assert all(torch.equal(weights["measured"][k], weights["not_measured"][k]) for k in weights["measured"])


@pytest.mark.slow
def test_the_estimate_is_near_the_stages_real_time(make_recipe, tmp_path, monkeypatch):
    from kdforge.estimate import estimate_training
    from kdforge.train.stages import train_stage

    monkeypatch.setattr("kdforge.estimate.MIN_STEPS", 0)
    recipe = load_recipe(make_recipe(TINY_MODELS), ["train.epochs=3"])  # 60 steps, 3 evaluations
    estimate = estimate_training(recipe, ["baseline"]).seconds["baseline"]
    real = train_stage(recipe, "baseline", runs_dir=tmp_path, consumers=[]).wall_s
    assert real / 2.5 < estimate < real * 2.5, (estimate, real)


@pytest.mark.slow
def test_a_stage_counts_as_finished_exactly_when_the_chain_would_reuse_it(make_recipe, tmp_path):
    from kdforge.train.stages import stage_is_finished, train_stage

    path = make_recipe(TINY_MODELS)
    recipe = load_recipe(path, ["train.max_steps=2"])
    assert not any(stage_is_finished(recipe, stage, tmp_path) for stage in ("teacher", "baseline", "student"))
    train_stage(recipe, "teacher", runs_dir=tmp_path, consumers=[])
    assert stage_is_finished(recipe, "teacher", tmp_path) and not stage_is_finished(recipe, "student", tmp_path)
    assert not stage_is_finished(load_recipe(path, ["train.max_steps=3"]), "teacher", tmp_path)  # other settings
    # the teacher store: another recipe with the same teacher section finds it finished
    assert stage_is_finished(load_recipe(path, ["train.max_steps=2", "name=other"]), "teacher", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "ofa", "fitnet"])
def test_the_estimate_trains_what_the_stage_trains(make_recipe, tmp_path, monkeypatch, method):
    """The estimate times a few steps of the distilled student with the stage's own objective and the modules the
    stage trains beside it (OFA's projectors, FitNets' adapters): the same loss terms on the same batch."""
    import kdforge.train.assemble as assemble
    from kdforge.estimate import estimate_training

    seen = {}

    def spy(where):
        def fit(model, spec, objective, data, train, runtime, *args, extra=None, **kwargs):
            images = spec.prepare(data.train.images[:4].to(runtime.device))
            with torch.no_grad():
                logits = model(images)  # the hooks of projectors and adapters see this forward
                _, terms = objective(logits, data.train.labels[:4], images)
            seen[where] = (type(extra).__name__, sorted(terms))  # the last call: the student (teacher, baseline first)
            return real(model, spec, objective, data, train.model_copy(update={"max_steps": 2}), runtime, *args,
                        extra=extra, **kwargs)
        return fit

    real = assemble.fit  # the one loop, which every assembled run calls
    monkeypatch.setattr("kdforge.estimate.MIN_STEPS", 0)
    recipe = load_recipe(make_recipe(TINY_MODELS), [f"distill.method={method}", "train.max_steps=4"])
    monkeypatch.setattr(assemble, "fit", spy("estimate"))
    estimate_training(recipe, ["student"])
    monkeypatch.setattr(assemble, "fit", spy("stage"))
    run_distill(recipe, runs_dir=tmp_path / "runs", consumers=[])
    assert seen["estimate"] == seen["stage"], seen
    assert seen["stage"][0] == {"kd": "NoneType", "ofa": "StageProjectors", "fitnet": "FeatureHints"}[method]
