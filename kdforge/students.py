"""Choosing a student under a latency budget (`kdforge students`, `[student] model = "auto"`).

    result = search_students(recipe, settings, runs_dir=Path("runs"))   # runs/<name>/students/students.json
    recipe = result.resolved(recipe)                                     # the recipe with the winner as student

Three steps, each reusing what the chain already has:
1. **Candidates** (`candidate_config`): timm models at the recipe's input size and number of classes (the curated
   DEFAULT_CANDIDATES this timm has, or the user's list); a ViT that needs `img_size` gets it.
2. **Latency** (`profile_candidate`): each candidate, with its initial weights (latency does not depend on the
   weights), is exported to the target format by the export wing itself (`export_run`, INT8 formats calibrated on
   the recipe's training split) into runs/<name>/students/exports/<model>-<size>/, then timed on that format's
   runner as `kdforge bench` times (p50 / p95 per call at the batch), with its parameters, MACs
   (`torch.utils.flop_counter`) and file size. A second search reuses every export (`export_run(reuse=True)`).
   A device profile (latency.json from `python -m kdforge.serve.probe` run on the device over that exports folder)
   replaces this machine's timings file by file (matched by sha256).
3. **The race** (`race`): the candidates within budget (at most `race_size`, fastest first) distil from the
   recipe's teacher for `race_steps` steps each (through the teacher cache when the recipe has one, built once
   and shared); the better half on the validation split goes on to a round of twice the steps, until one is left.
   Each round trains from the initial weights with its own full schedule, as a short version of the real run; the
   test split is never looked at. Rounds are finished stages under runs/<name>/students/race/, so a search run
   again retrains nothing.

`students.json` records the table, the race, the winner and the key of everything the choice depends on (the
distilled student's fingerprint with the search settings, the device profile's bytes): `kdforge distill` reuses a
choice whose key matches instead of searching again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdforge import layout
from kdforge.errors import KdforgeError, RecipeError
from kdforge.fileio import atomic_write_text, file_hash, read_json, read_metadata, write_json
from kdforge.phases import Consumer, notify
from kdforge.recipe import AUTO, Recipe, SearchConfig, StudentConfig, recipe_to_toml
from kdforge.report import plot_candidates

WARMUP = 5
# Edge-friendly timm families, small to medium (the ones this timm lacks are left out): mobile CNNs, efficient
# hybrids and ViTs, and the small ResNets/RegNets as references; then backbones designed for CPUs (PP-LCNet and
# PP-HGNetV2, MobileNetV1, MnasNet, TinyNet, StarNet, SHViT, EfficientViT-B) and re-parameterized ones (MobileOne,
# RepGhost; exported fused). All build with random weights, offline, and export to ONNX at 224. Left out:
# fbnetv3_b, efficientformerv2_s0 and ghostnetv2_100 export but ran 7-8 ms at 224 where the added ones run 1-5 ms
# (batch 1, 2-core Xeon), fastvit_mci0 23 ms.
DEFAULT_CANDIDATES = (
    "mobilenetv3_small_050", "mobilenetv3_small_100", "mobilenetv3_large_100", "mobilenetv4_conv_small",
    "lcnet_100", "efficientnet_lite0", "efficientnet_b0", "ghostnet_100", "repvit_m0_9", "fastvit_t8",
    "mobilevit_xxs", "mobilevit_s", "mobilevitv2_050", "efficientvit_m0", "edgenext_xx_small", "levit_128s",
    "vit_tiny_patch16_224", "resnet10t", "resnet18", "regnetx_002", "regnetx_004",
    "lcnet_050", "mobilenetv4_conv_small_050", "starnet_s050", "mnasnet_small", "repghostnet_050", "tinynet_e",
    "efficientvit_b0", "shvit_s1", "hgnetv2_b0", "mobilenetv1_100", "mobileone_s0",
)


def default_candidates() -> list[str]:
    import timm

    return [name for name in DEFAULT_CANDIDATES if timm.is_model(name)]


def search_size(recipe: Recipe) -> int:
    """The input size every candidate takes: the [student]'s input_size, else the teacher's."""
    from kdforge.models import resolve_input_spec

    if recipe.student is not None and recipe.student.input_size:
        return recipe.student.input_size
    return resolve_input_spec(recipe.model_for("teacher")).size


def search_sizes(recipe: Recipe, settings: SearchConfig) -> list[int]:
    """The input sizes the search builds every candidate at: [student.search] sizes, else the one `search_size`."""
    return list(settings.sizes) or [search_size(recipe)]


def candidate_label(model: str, size: int, sizes: list[int]) -> str:
    """How a candidate is named in the table, the race and students.json: the model alone when the search has one
    size, "model@size" when it has several."""
    return model if len(sizes) == 1 else f"{model}@{size}"


def search_settings(recipe: Recipe, **overrides: Any) -> SearchConfig:
    """The [student.search] section with the command's options (those not None) over it."""
    base = recipe.student.search if recipe.student is not None and recipe.student.search else None
    given = {key: value for key, value in overrides.items() if value is not None}
    if base is None and "budget_ms" not in given:
        raise RecipeError(f"recipe {recipe.name!r} has no [student.search] section: give --budget-ms (and --format)")
    from pydantic import ValidationError

    from kdforge.recipe import format_validation_error

    try:
        return SearchConfig.model_validate({**(base.model_dump() if base else {}), **given})
    except ValidationError as exc:  # one line per problem, as a recipe's
        raise RecipeError(format_validation_error(exc, "kdforge students options")) from None


# ----------------------------------------------------------------------------------------------------------
# candidates


def candidate_config(recipe: Recipe, name: str, size: int) -> StudentConfig:
    """The [student] section that trains candidate `name` at `size` (its training settings, normalization and
    `pretrained` from the recipe's [student]); a model that takes img_size (ViTs) is built for `size`.
    Raises KdforgeError naming the model when it cannot take `size` inputs."""
    from kdforge.models import create_model, resolve_input_spec
    from kdforge.train.assemble import check_input_size

    base = recipe.student or StudentConfig(model=name)
    cfg = StudentConfig(model=name, pretrained=base.pretrained, input_size=size, mean=base.mean, std=base.std,
                        train=base.train, search=base.search)
    why = ""
    # img_size first: a ViT built for another size may still run by resampling its position embeddings on every
    # call (slower, and not exportable to ONNX); models without the argument refuse it and are built plainly
    for kwargs in ({"img_size": size}, {}):
        candidate = cfg.model_copy(update={"model_kwargs": kwargs, "pretrained": False})
        try:
            check_input_size(create_model(candidate, num_classes=2), resolve_input_spec(candidate), name)
            return cfg.model_copy(update={"model_kwargs": kwargs})
        except KdforgeError as exc:  # says which model and why (the plain build's reason is the one kept)
            why = str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure of a third-party model's constructor means "not this one"
            why = f"{name} does not build for {size}x{size} inputs ({type(exc).__name__}: " \
                  f"{(str(exc).splitlines() or [''])[0][:160]})"
    raise KdforgeError(why)


def count_macs(model, size: int) -> int:
    """Multiply-accumulates of one image's forward pass (torch's FLOP counter: 2 FLOPs per MAC)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2


# ----------------------------------------------------------------------------------------------------------
# latency


@dataclass
class CandidateRow:
    model: str
    params: int
    macs: int  # per image
    bytes: int  # the exported file (and its weights file)
    latency_p50_ms: float  # per call at the search's batch
    latency_p95_ms: float
    runtime: str  # what ran it
    measured_on: str  # "here" or the device profile's CPU
    fits: bool = False  # within the budget: p50, or the sustained p95 where the device profile timed it sustained
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    export_s: float | None = None  # what exporting it cost (None: reused)
    sha256: str = ""
    sustained: bool = False  # the latencies are the device's sustained ones (its last window)
    memory_mb: float | None = None  # what its session added on the device (the device profile's)
    input_size: int = 0  # the size it was built and timed at
    name: str = ""  # its label: the model, or "model@size" when the search has several sizes

    def __post_init__(self) -> None:
        self.name = self.name or self.model


def candidate_recipe(recipe: Recipe, cfg: StudentConfig, settings: SearchConfig, students_dir: Path) -> Recipe:
    """The recipe a candidate is exported with: the user's, the candidate as student (formats are named by the
    search, so one export folder per candidate holds every format searched so far, each reused)."""
    return recipe.model_copy(update={
        "name": f"{cfg.model}-{cfg.input_size}", "student": cfg,
        "export": recipe.export.model_copy(update={"formats": [], "dir": str(students_dir / "exports"),
                                                   "verify": False}),
        "quantize": recipe.quantize.model_copy(update={"enabled": False}),
    })


def initial_stage(recipe: Recipe, cfg: StudentConfig, stage_dir: Path, num_classes: int) -> None:
    """A finished-looking stage folder holding the candidate's initial weights (seeded as the recipe's stages),
    what the export wing exports: made once, kept while the candidate's model section is the same."""
    from kdforge.checkpoint import final_weights, save_checkpoint
    from kdforge.models import create_model
    from kdforge.runtime import seed_everything

    section = cfg.model_dump(mode="json", exclude={"search", "train"})
    if read_json(stage_dir / layout.RESULT).get("candidate") == section and final_weights(stage_dir).is_file():
        return
    shutil.rmtree(stage_dir, ignore_errors=True)
    seed_everything(recipe.seed)
    model = create_model(cfg.model_copy(update={"pretrained": False}), num_classes)
    save_checkpoint(stage_dir, 0, model, {}, {"model": cfg.model, "stage": "student"}, best=False)
    atomic_write_text(stage_dir / layout.RECIPE, recipe_to_toml(recipe))
    write_json(stage_dir / layout.RESULT, {"stage": "student", "model": cfg.model, "candidate": section,
                                           "weights_sha256": file_hash(final_weights(stage_dir))})


def profile_candidate(recipe: Recipe, cfg: StudentConfig, settings: SearchConfig, students_dir: Path,
                      num_classes: int, consumers: list[Consumer] | None = None, name: str = "") -> CandidateRow:
    """Export candidate `cfg` (at its input_size) to the search's format (reused when exported before: the export
    folders are keyed by model and size) and time it here."""

    from kdforge.export.artifacts import export_run
    from kdforge.models import count_parameters, load_stage_model
    from kdforge.runners import open_export

    settings_recipe = candidate_recipe(recipe, cfg, settings, students_dir)
    stage_dir = students_dir / "candidates" / settings_recipe.name / "student"
    initial_stage(settings_recipe, cfg, stage_dir, num_classes)
    result = export_run(stage_dir, [settings.format], exports_dir=students_dir / "exports", verify=False,
                        recipe=settings_recipe, reuse=True, consumers=consumers or [])
    export_dir = result.export_dir
    meta = read_metadata(export_dir)
    runner, entry = open_export(export_dir, settings.format, meta, threads=settings.threads)
    p50, p95 = time_runner(runner, cfg.input_size, settings)
    model = load_stage_model(stage_dir, num_classes, recipe=settings_recipe)
    macs = count_macs(model, cfg.input_size)
    return CandidateRow(cfg.model, count_parameters(model), macs, entry["bytes"], round(p50, 3), round(p95, 3),
                        runner.name, "here", model_kwargs=dict(cfg.model_kwargs),
                        export_s=None if result.skipped else round(sum(result.seconds.values()), 1),
                        sha256=entry["sha256"], input_size=cfg.input_size, name=name or cfg.model)


def time_runner(runner, size: int, settings: SearchConfig) -> tuple[float, float]:
    """(p50, p95) ms per call of `runner` on fixed random uint8 images at the search's batch, after warm-up, with
    torch at 1 thread: the runtime's own threads do the work (`timing.torch_threads`)."""
    import torch

    from kdforge.timing import latency_ms, torch_threads

    images = torch.randint(0, 256, (settings.batch, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with torch_threads(1):
        return latency_ms(lambda: runner.predict(images), WARMUP, settings.repeats)


MAX_PROFILE_BYTES = 16 << 20  # a probe's report of a few dozen files is kilobytes; more is not one
Timing = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # milliseconds per call: finite and positive


class ProfileRow(BaseModel):
    """One file a probe timed (latency.json) or judged (device-report.json): what the search reads of it."""

    model_config = ConfigDict(extra="allow")
    sha256: str
    setting: str = "fp32"
    passed: bool | None = None  # a device report's verdict
    failures: list[str] = []
    runtime: str | None = None
    latency_p50_ms: Timing | None = None
    latency_p95_ms: Timing | None = None
    latency_sustained_p50_ms: Timing | None = None
    latency_sustained_p95_ms: Timing | None = None
    memory_mb: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _timed_unless_failed(self) -> ProfileRow:
        if self.passed is not False and (self.latency_p50_ms is None or self.latency_p95_ms is None
                                         or self.runtime is None):
            raise ValueError("a file that did not fail needs runtime, latency_p50_ms and latency_p95_ms")
        return self


class Profile(BaseModel):
    model_config = ConfigDict(extra="allow")
    rows: list[ProfileRow]
    settings: dict[str, Any] = {}
    machine: dict[str, Any] = {}


def read_profile(path: Path, settings: SearchConfig) -> dict[str, Any]:
    """A probe's latency.json or device-report.json, checked to be one at the search's batch (a device report's
    "device" read as a profile's "machine"), its timings finite and positive (checked as data: a damaged or
    hand-edited profile is one error naming the value, and one larger than MAX_PROFILE_BYTES is not read)."""
    from pydantic import ValidationError

    from kdforge.recipe import format_validation_error

    if path.is_file() and path.stat().st_size > MAX_PROFILE_BYTES:
        raise KdforgeError(f"{path}: {path.stat().st_size:,} bytes is not a device profile (those are kilobytes; "
                           f"python -m kdforge.serve.probe writes one)")
    raw = read_json(path)
    if "machine" not in raw and isinstance(raw.get("device"), dict):
        raw = {**raw, "machine": raw["device"]}
    try:
        profile = Profile.model_validate(raw).model_dump()
    except ValidationError as exc:
        problems = format_validation_error(exc, str(path)).splitlines()
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise KdforgeError(f"not a device profile: {problems[0]}{more}; probe the exports again (python -m "
                           f"kdforge.serve.probe) rather than editing the file") from None
    if settings.max_memory_mb is not None and not any(row["memory_mb"] is not None for row in profile["rows"]):
        raise KdforgeError(f"{path} measured no memory (an older probe): probe the exports again to check "
                           f"max_memory_mb")
    batch = profile["settings"].get("batch")
    if batch != settings.batch:
        raise KdforgeError(f"{path} was measured at batch {batch}; the search asks batch {settings.batch}: probe "
                           f"again with --batch {settings.batch}")
    return profile


def apply_profile(rows: list[CandidateRow], profile: dict[str, Any]) -> tuple[list[CandidateRow], dict[str, str]]:
    """The rows with the device's timings of the very same files (by sha256): its sustained p50/p95 where it timed
    them sustained, and the memory the session added there. Rows the profile did not time, and files that failed
    their verdict on the device (a device report), are dropped, with why."""
    timed = {row["sha256"]: row for row in profile["rows"] if row.get("setting", "fp32") == "fp32"}
    cpu = profile.get("machine", {}).get("cpu", "the device")
    kept, missing = [], {}
    for row in rows:
        on_device = timed.get(row.sha256)
        if on_device is None:
            missing[row.name] = "not in the device profile (this file was not probed there: probe the exports again)"
            continue
        if on_device.get("passed") is False:
            missing[row.name] = f"FAILED on {cpu}: {'; '.join(on_device.get('failures', []))}"
            continue
        sustained = on_device.get("latency_sustained_p95_ms") is not None
        p50, p95 = (("latency_sustained_p50_ms", "latency_sustained_p95_ms") if sustained
                    else ("latency_p50_ms", "latency_p95_ms"))
        kept.append(CandidateRow(**{**asdict(row), "latency_p50_ms": on_device[p50], "latency_p95_ms": on_device[p95],
                                    "runtime": on_device["runtime"], "measured_on": cpu, "sustained": sustained,
                                    "memory_mb": on_device.get("memory_mb")}))
    return kept, missing


def budget_latency(row: CandidateRow) -> float:
    """What the budget is checked on: the sustained p95 where the device timed it sustained, else the p50."""
    return row.latency_p95_ms if row.sustained else row.latency_p50_ms


def rank(rows: list[CandidateRow], budget_ms: float, max_memory_mb: float | None = None) -> list[CandidateRow]:
    """Fastest first (by `budget_latency`), each marked whether it is within the budget (and `max_memory_mb`)."""
    def fits(row: CandidateRow) -> bool:
        small = max_memory_mb is None or (row.memory_mb is not None and row.memory_mb <= max_memory_mb)
        return budget_latency(row) <= budget_ms and small

    return [CandidateRow(**{**asdict(row), "fits": fits(row)})
            for row in sorted(rows, key=lambda row: (budget_latency(row), row.bytes))]


# ----------------------------------------------------------------------------------------------------------
# the race


def race_recipe(recipe: Recipe, cfg: StudentConfig, teacher_weights: Path, steps: int, label: str = "") -> Recipe:
    """A short distillation of candidate `cfg` (named `label` in the search) from the recipe's (finished) teacher:
    `steps` steps, its own schedule, nothing exported."""
    train = cfg.train.model_copy(update={"max_steps": steps, "epochs": steps})  # enough epochs for `steps`
    return recipe.model_copy(update={
        "name": f"{(label or cfg.model).replace('@', '-')}-{steps}steps",
        "teacher": recipe.model_for("teacher").model_copy(update={"checkpoint": str(teacher_weights)}),
        "student": cfg.model_copy(update={"train": train}),
        "distill": recipe.distill.model_copy(update={"baseline": False}),
        "experiment": recipe.experiment.model_copy(update={"seeds": []}),
        "export": recipe.export.model_copy(update={"formats": []}),
        "quantize": recipe.quantize.model_copy(update={"enabled": False}),
        "tracking": recipe.tracking.model_copy(update={"backend": "none"}),
    })


def _share_cache(race_dir: Path, run_dir: Path, into_run: bool) -> None:
    """One teacher cache for every racer (its key holds the teacher, data and views, not the student): linked into
    a racer's run before it trains, and the first one built linked up for the others."""
    shared, own = race_dir / layout.TEACHER_CACHE, run_dir / layout.TEACHER_CACHE
    source, target = (shared, own) if into_run else (own, shared)
    if source.is_file() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:  # another file system, or links refused: a copy does the same
            shutil.copy2(source, target)


def check_race(recipe: Recipe) -> None:
    """The race chooses on the validation split: a recipe without one cannot race."""
    if recipe.data.val_fraction == 0:
        raise RecipeError("the race chooses on the validation split, and data.val_fraction is 0: hold some training "
                          "images out (data.val_fraction = 0.1) or search without the race (--no-race)")


def race(recipe: Recipe, configs: dict[str, StudentConfig], latency: dict[str, float], settings: SearchConfig,
         teacher_weights: Path, race_dir: Path, device: str | None = None,
         consumers: list[Consumer] | None = None) -> list[dict[str, Any]]:
    """Successive halving over `configs` (fastest first): each round distils every survivor for its steps and
    keeps the better half by validation top-1 (ties: the faster), until one is left. Each round's record:
    steps, per candidate the validation top-1, its wall time, and who went on."""
    from kdforge.train.stages import train_stage

    check_race(recipe)
    consumers = consumers or []
    survivors, steps, rounds = list(configs), settings.race_steps, []
    while len(survivors) > 1:
        scores, seconds = {}, {}
        for number, name in enumerate(survivors, 1):
            racer = race_recipe(recipe, configs[name], teacher_weights, steps, name)
            run_dir = race_dir / racer.name
            _share_cache(race_dir, run_dir, into_run=True)
            notify(consumers, f"race round {len(rounds) + 1}: {name} ({number}/{len(survivors)}), {steps} steps")
            result = train_stage(racer, "student", runs_dir=race_dir, retrain_stale=True, device=device,
                                 consumers=consumers)
            _share_cache(race_dir, run_dir, into_run=False)
            scores[name], seconds[name] = result.best_top1, result.wall_s
        ordered = sorted(survivors, key=lambda name: (-scores[name], latency[name]))
        keep = ordered[: math.ceil(len(survivors) / 2)]
        rounds.append({"round": len(rounds) + 1, "steps": steps, "val_top1": scores, "wall_s": seconds,
                       "kept": keep})
        notify(consumers, f"race round {len(rounds)} ({steps} steps): " + ", ".join(
            f"{name} {scores[name]:.2%}{'' if name in keep else ' (out)'}" for name in ordered))
        survivors, steps = keep, steps * 2
    return rounds


# ----------------------------------------------------------------------------------------------------------
# the search


@dataclass
class SearchResult:
    settings: dict[str, Any]
    input_size: int  # the winner's (or, with none, the first searched)
    rows: list[dict[str, Any]]  # CandidateRow as dicts, fastest first
    skipped: dict[str, str]  # model -> why it is not in the table
    race: list[dict[str, Any]]
    winner: dict[str, Any] | None  # {"model", "input_size", "model_kwargs", "latency_p50_ms", ...}; None: none fits
    key: str
    machine: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None  # the device profile's machine, when one ranked the candidates
    wall_s: float = 0.0
    reused: bool = False  # the record of an earlier search with the same key

    def resolved(self, recipe: Recipe) -> Recipe:
        """The recipe with the winner as its student (the search section kept beside it, as the run records)."""
        if self.winner is None:
            raise KdforgeError(no_fit_message(self))
        student = recipe.student or StudentConfig(model=self.winner["model"])
        chosen = student.model_copy(update={"model": self.winner["model"],
                                            "input_size": self.winner.get("input_size", self.input_size),
                                            "model_kwargs": dict(self.winner["model_kwargs"])})
        return recipe.model_copy(update={"student": chosen})


def with_search_format(recipe: Recipe) -> tuple[Recipe, bool]:
    """The recipe exporting its [student.search] format too (the chain checks the budget on that file), and
    whether it was added."""
    from kdforge.formats import with_sources
    from kdforge.plan import recipe_formats

    search = recipe.student.search
    if search is None or search.format in with_sources(recipe_formats(recipe)):
        return recipe, False
    export = recipe.export.model_copy(update={"formats": [*recipe.export.formats, search.format]})
    return recipe.model_copy(update={"export": export}), True


def no_fit_message(result: SearchResult) -> str:
    budget, fmt = result.settings["budget_ms"], result.settings["format"]
    if not result.rows:
        return f"no candidate could be measured in {fmt}: " + "; ".join(f"{k}: {v}" for k, v in result.skipped.items())
    fastest = result.rows[0]
    return (f"no candidate meets {budget:g} ms in {fmt} (batch {result.settings['batch']}): the fastest, "
            f"{fastest['model']}, takes {fastest['latency_p50_ms']:.2f} ms (p50); raise the budget, try another "
            f"format (an INT8 one) or add smaller candidates")


def search_key(recipe: Recipe, settings: SearchConfig, teacher_weights: Path | None, race_on: bool) -> str:
    """What a choice depends on: the distilled student's fingerprint with "auto" as its model (data, seed, the
    [student] training settings, [distill], the teacher's weights), the search settings, the device profile's bytes."""
    from kdforge.train.stages import stage_fingerprint

    auto = recipe.model_copy(update={"student": (recipe.student or StudentConfig(model=AUTO, search=settings))
                                     .model_copy(update={"model": AUTO, "model_kwargs": {}})})
    unset = {"device_profile"} | ({"sizes"} if not settings.sizes else set())  # as recorded before sizes existed
    parts = {"student": stage_fingerprint(auto, "student", teacher_weights) if teacher_weights else None,
             "search": settings.model_dump(mode="json", exclude=unset),
             "profile": file_hash(Path(settings.device_profile)) if settings.device_profile else None,
             "size": search_size(recipe), "race": race_on}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def earlier_choice(recipe: Recipe, settings: SearchConfig, runs_dir: Path, race: bool = True) -> SearchResult | None:
    """The recorded search of this run when its key matches what a search now would depend on."""
    from kdforge.train.stages import teacher_weights_for

    record = read_json(runs_dir / recipe.name / layout.STUDENTS / layout.STUDENTS_RECORD)
    if not record or record.get("winner") is None:
        return None
    try:
        weights = teacher_weights_for(recipe, runs_dir) if race else None
    except KdforgeError:  # no teacher yet: nothing was chosen with it
        return None
    if record.get("key") != search_key(recipe, settings, weights, race):
        return None
    fields = SearchResult.__dataclass_fields__
    return SearchResult(**{**{k: v for k, v in record.items() if k in fields}, "reused": True})


def search_students(recipe: Recipe, settings: SearchConfig, runs_dir: Path = Path("runs"), race_on: bool = True,
                    device: str | None = None, consumers: list[Consumer] | None = None) -> SearchResult:
    """The whole search (candidates, latency, race), recorded in runs/<name>/students/students.json. The race
    needs the recipe's teacher finished (`kdforge distill` trains it first; `kdforge students` too). Without
    `race_on`, the fastest candidate within budget wins."""
    from kdforge.data import load_dataset
    from kdforge.runtime import describe_machine, machine
    from kdforge.train.stages import teacher_weights_for

    consumers = consumers or []

    def say(line: str) -> None:
        notify(consumers, line)

    started = time.perf_counter()
    if race_on:
        check_race(recipe)
    students_dir = runs_dir / recipe.name / layout.STUDENTS
    teacher_weights = teacher_weights_for(recipe, runs_dir) if race_on else None
    profile = read_profile(Path(settings.device_profile), settings) if settings.device_profile else None
    sizes = search_sizes(recipe, settings)
    names = list(settings.candidates) or default_candidates()
    num_classes = load_dataset(recipe.data, recipe.seed).num_classes
    configs, rows, skipped = {}, [], {}
    pairs = [(name, size) for name in names for size in sizes]
    for number, (name, size) in enumerate(pairs, 1):
        label = candidate_label(name, size, sizes)
        say(f"candidate {number}/{len(pairs)}: {label} -> {settings.format}")
        try:
            configs[label] = candidate_config(recipe, name, size)
            rows.append(profile_candidate(recipe, configs[label], settings, students_dir, num_classes, name=label))
        except KdforgeError as exc:
            skipped[label] = str(exc)
    if profile is not None:
        rows, missing = apply_profile(rows, profile)
        skipped.update(missing)
    rows = rank(rows, settings.budget_ms, settings.max_memory_mb)
    latency = {row.name: budget_latency(row) for row in rows}
    fitting = [row.name for row in rows if row.fits][: settings.race_size]
    say(f"{sum(row.fits for row in rows)} of {len(rows)} candidates within {settings.budget_ms:g} ms: " + ", ".join(
        f"{row.name} {row.latency_p50_ms:.2f} ms" for row in rows if row.fits)
        + (f"; racing the fastest {len(fitting)}" if race_on and len(fitting) > 1 else ""))
    rounds: list[dict[str, Any]] = []
    if len(fitting) > 1 and race_on:
        rounds = race(recipe, {name: configs[name] for name in fitting}, latency, settings, teacher_weights,
                      students_dir / "race", device, consumers)
        winner_name = rounds[-1]["kept"][0]
    else:
        winner_name = fitting[0] if fitting else None
    winner = None
    if winner_name is not None:
        row = next(row for row in rows if row.name == winner_name)
        winner = {"model": row.model, "input_size": row.input_size, "name": winner_name,
                  "model_kwargs": row.model_kwargs, "latency_p50_ms": row.latency_p50_ms, "bytes": row.bytes,
                  "params": row.params, "val_top1": rounds[-1]["val_top1"][winner_name] if rounds else None}
    size = winner["input_size"] if winner else sizes[0]
    result = SearchResult(settings.model_dump(mode="json"), size, [asdict(row) for row in rows], skipped, rounds,
                          winner, search_key(recipe, settings, teacher_weights, race_on), machine(),
                          profile.get("machine") if profile else None, round(time.perf_counter() - started, 1))
    students_dir.mkdir(parents=True, exist_ok=True)
    record = asdict(result)
    record.pop("reused")
    write_json(students_dir / layout.STUDENTS_RECORD, record)
    plot_candidates(record, students_dir / layout.STUDENTS_PLOT)
    say(f"measured on {describe_machine(result.machine) if profile is None else profile['machine'].get('cpu')}")
    return result


# ----------------------------------------------------------------------------------------------------------
# the chain's own file against the budget


def check_budget(search: SearchConfig, export_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Time the chain's final file in the search's format as the search timed the candidates, and say whether it
    met the budget (runs/<name>/students/budget.json). Kept when the file is the one already checked."""

    from kdforge.runners import open_export
    from kdforge.runtime import describe_machine, machine

    meta = read_metadata(export_dir)
    if search.format not in meta.get("formats", {}):
        raise KdforgeError(f"{export_dir} has no {search.format} export to check the budget on")
    entry = meta["formats"][search.format]
    path = run_dir / layout.STUDENTS / layout.BUDGET
    earlier = read_json(path)
    same = {"format": search.format, "budget_ms": search.budget_ms, "batch": search.batch, "threads": search.threads}
    if earlier.get("sha256") == entry["sha256"] and {key: earlier.get(key) for key in same} == same:
        return earlier
    runner, entry = open_export(export_dir, search.format, meta, threads=search.threads)
    p50, p95 = time_runner(runner, int(meta["input_size"]), search)  # as the search timed the candidates
    check = {**same, "model": meta["model"], "file": entry["file"], "sha256": entry["sha256"],
             "latency_p50_ms": round(p50, 3), "latency_p95_ms": round(p95, 3), "met": p50 <= search.budget_ms,
             "margin_ms": round(search.budget_ms - p50, 3), "runtime": runner.name,
             "measured_on": describe_machine(machine())}
    if search.device_profile:
        check["note"] = (f"the search ranked by the device profile {search.device_profile}; this check ran here: "
                         f"probe exports/{export_dir.name} on the device for its number there")
    write_json(path, check)
    return check


def describe_budget(check: dict[str, Any]) -> str:
    verdict = "met" if check["met"] else "MISSED"
    return (f"latency budget {verdict}: {check['model']} {check['format']} p50 {check['latency_p50_ms']:.2f} ms at "
            f"batch {check['batch']} against {check['budget_ms']:g} ms ({abs(check['margin_ms']):.2f} ms "
            f"{'to spare' if check['met'] else 'over'}; {check['runtime']} on {check['measured_on']})")


def choose_student(recipe: Recipe, settings: SearchConfig, runs_dir: Path = Path("runs"), race_on: bool = True,
                   write_recipe: Path | None = None, device: str | None = None,
                   consumers: list[Consumer] | None = None) -> SearchResult:
    """`kdforge students`: the search, after training the recipe's teacher when the race needs it and it is not
    finished (`kdforge distill` reuses it); with `write_recipe`, a recipe naming the winner is written there."""
    from kdforge.fileio import check_can_create
    from kdforge.train.events import ProgressDisplay
    from kdforge.train.stages import stage_is_finished, train_stage

    consumers = [ProgressDisplay()] if consumers is None else consumers
    if race_on:
        check_race(recipe)
    if write_recipe is not None:
        check_can_create(write_recipe.parent, "folder for the written recipe")
        if write_recipe.is_dir():
            raise KdforgeError(f"--write-recipe {write_recipe} is a folder; give a file name, e.g. recipes/chosen.toml")
    if race_on and recipe.teacher is not None and not recipe.teacher.checkpoint \
            and not stage_is_finished(recipe, "teacher", runs_dir):
        notify(consumers, f"the race distils from the recipe's teacher {recipe.teacher.model}: training it first "
                          f"(kdforge distill reuses it)")
        train_stage(recipe, "teacher", runs_dir=runs_dir, retrain_stale=True, device=device, consumers=consumers)
    result = search_students(recipe, settings, runs_dir, race_on, device, consumers)
    if write_recipe is not None and result.winner is not None:
        chosen, _ = with_search_format(result.resolved(recipe.model_copy(update={"student": (
            recipe.student or StudentConfig(model=result.winner["model"])).model_copy(update={"search": settings})})))
        atomic_write_text(write_recipe, f"# {recipe.name} with the student chosen by `kdforge students` "
                                        f"({settings.format}, p50 <= {settings.budget_ms:g} ms)\n"
                          + recipe_to_toml(chosen))
    return result
