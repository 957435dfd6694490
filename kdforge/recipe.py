"""Recipes: one TOML file per experiment, loaded into frozen, strict pydantic models.

Every default lives here, in the schema. Unknown keys and wrong types are errors that name the file, the key
and what was expected. Recipes never execute code: models, datasets and optimizers are chosen by name.

    recipe = load_recipe("recipes/quickstart.toml", overrides=["train.epochs=1"])

`[train]` holds the training defaults; `[teacher.train]` and `[student.train]` override them for one model.
After loading, `recipe.teacher.train` and `recipe.student.train` are complete: the merge happens once, here.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdforge.errors import RecipeError, shorten
from kdforge.formats import FORMATS
from kdforge.model_names import check_timm_model
from kdforge.registry import suggest

# The names `[data] dataset` and `[distill] method` accept. The recipe sits below the data and the losses, so it
# names them here; kdforge.data.DATASETS and kdforge.distill.losses.METHODS register their loaders and losses under
# the same names (tests/test_registries.py checks that the two agree).
DATASET_NAMES = ("cifar100", "synthetic", "imagefolder", "webdataset")
METHOD_NAMES = ("kd", "hard", "dkd", "dist", "ofa", "fitnet")
# the methods `[distill] logit_standardization` applies to (hard reads the teacher's argmax only, which
# standardizing does not change; DIST is left as its paper has it)
STANDARDIZABLE_METHODS = ("kd", "dkd")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PositiveInt = Annotated[int, Field(ge=1)]
MAX_INPUT_SIZE = 2048  # pixels per side for images and models
MAX_DEPTH = 16  # tables and arrays in a recipe nest at most this deep (its own keys go 3 deep)
Triple = tuple[float, float, float]


class Strict(BaseModel):
    # TOML has inf and nan: no setting takes them
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SyntheticConfig(Strict):
    """The built-in synthetic dataset: 100 classes (10 shapes x 10 hues), drawn deterministically."""

    train: Annotated[int, Field(ge=100)] = 10_000
    test: Annotated[int, Field(ge=100)] = 2_000
    seed: int = 0


Pair = tuple[float, float]

STREAMED_AUGMENT = {"scale": (0.08, 1.0), "ratio": (0.75, 4 / 3), "auto_augment": None, "color_jitter": 0.0,
                    "re_prob": 0.0, "interpolation": "bilinear"}  # keys of streamed data, with their defaults
MIXUP_DEFAULTS = {"mixup": 0.0, "cutmix": 0.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5}


class AugmentConfig(Strict):
    """Train-time augmentation. Data held in memory: random crop with `crop_padding` and flip, on whole batches on
    the training device. Streamed data (`[data] in_memory`): timm's transforms in the decoding workers, named as
    timm names them: RandomResizedCrop (`scale`, `ratio`) from the source image, flip, `auto_augment`
    ("rand-m9-mstd0.5" RandAugment, "augmix-m5", "original" AutoAugment), `color_jitter`, random erasing
    (`re_prob`). Both: mixup / CutMix (timm's `Mixup`; `mixup`, `cutmix` are the Beta alphas, 0 = off) with the
    teacher answering the mixed image; each process mixes within its share of the global batch."""

    crop_padding: Annotated[int, Field(ge=0)] = 4  # in memory only
    hflip: bool = True
    scale: Pair = STREAMED_AUGMENT["scale"]  # RandomResizedCrop: share of the image's area
    ratio: Pair = STREAMED_AUGMENT["ratio"]  # RandomResizedCrop: aspect ratio range
    auto_augment: str | None = None  # timm's policy string, e.g. "rand-m9-mstd0.5-inc1"
    color_jitter: Annotated[float, Field(ge=0)] = 0.0  # ignored by timm when auto_augment is set
    re_prob: Annotated[float, Field(ge=0, le=1)] = 0.0  # random erasing probability
    interpolation: Literal["bilinear", "bicubic", "random"] = "bilinear"
    mixup: Annotated[float, Field(ge=0)] = 0.0
    cutmix: Annotated[float, Field(ge=0)] = 0.0
    mixup_prob: Annotated[float, Field(ge=0, le=1)] = 1.0  # share of batches mixed
    mixup_switch_prob: Annotated[float, Field(ge=0, le=1)] = 0.5  # CutMix instead of mixup, when both are on

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered(cls, pair: Pair) -> Pair:
        if not 0 < pair[0] <= pair[1]:
            raise ValueError(f"expected [low, high] with 0 < low <= high (got {list(pair)})")
        return pair

    @field_validator("auto_augment")
    @classmethod
    def _known_policy(cls, policy: str | None) -> str | None:
        if policy is None:
            return None
        from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

        make = rand_augment_transform if policy.startswith("rand") else augment_and_mix_transform \
            if policy.startswith("augmix") else auto_augment_transform
        try:
            make(policy, {"translate_const": 100, "img_mean": (124, 116, 104)})
        except (AssertionError, ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"timm does not read the auto_augment policy {policy!r} ({exc or type(exc).__name__}); "
                             f"e.g. \"rand-m9-mstd0.5-inc1\", \"augmix-m5-w4-d2\", \"original\"") from None
        return policy

    def source_image_keys(self) -> list[str]:
        """The keys set away from their defaults that need streamed data (they crop from the source image)."""
        return [key for key, default in STREAMED_AUGMENT.items() if getattr(self, key) != default]

    def needs_source_images(self) -> bool:
        return bool(self.source_image_keys())

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


IN_MEMORY_ONLY = ("cifar100", "synthetic")


class DataConfig(Strict):
    dataset: str = "synthetic"
    # cifar100: the folder holding cifar-100-python/; synthetic: where it is generated (default
    # data/synthetic-<train>-<test>-seed<seed>); imagefolder: the folder holding train/<class>/ and test/<class>/.
    root: str = ""
    download: bool = False
    # imagefolder/webdataset: the square size images are decoded to (in memory) or cropped to (streamed)
    image_size: Annotated[int, Field(ge=8, le=MAX_INPUT_SIZE)] = 32
    # imagefolder/webdataset: true: decoded once into a decode cache read by every stage; false: streamed,
    # decoded by `workers` processes in every pass (timm's augmentations at the source resolution); "auto": in
    # memory when the decoded set fits a quarter of the available memory and no streamed augmentation is asked
    # for. cifar100 and synthetic are always in memory.
    in_memory: bool | Literal["auto"] = "auto"
    workers: Annotated[int, Field(ge=0)] | None = None  # decoding processes; default: the cores, at most 8
    # streamed training views: "cpu": decoded and cropped by the workers. "gpu": the workers read each JPEG and draw
    # its crop and flip; the training process decodes the batch on its device at once (nvJPEG through
    # torchvision.io.decode_jpeg on CUDA), crops and resizes it there. For RandomResizedCrop + flip (no auto_augment,
    # color_jitter or re_prob); other images (PNG, rotated JPEGs) are still made by the workers
    decode: Literal["cpu", "gpu"] = "cpu"
    synthetic: SyntheticConfig = SyntheticConfig()
    augment: AugmentConfig = AugmentConfig()
    # held out of the training split, per class, with the recipe's seed: chooses the best checkpoint and judges
    # INT8's accuracy-aware search and escalation, so the test split only reports; 0: none (a paper's protocol:
    # train on all training images, choose nothing)
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {name!r}{suggest(name, DATASET_NAMES)}; "
                             f"known: {', '.join(sorted(DATASET_NAMES))}")
        return name

    @model_validator(mode="after")
    def _streams_what_can(self) -> DataConfig:
        if self.dataset in IN_MEMORY_ONLY:
            if self.in_memory is False:
                raise ValueError(f"in_memory = false: the {self.dataset} dataset is always held in memory (streaming "
                                 f"is for imagefolder and webdataset)")
            if self.augment.needs_source_images():
                raise ValueError(f"augment.{', augment.'.join(self.augment.source_image_keys())}: these crop from "
                                 f"the source image, which only streamed data (imagefolder, webdataset) has")
        elif self.in_memory is True and self.augment.needs_source_images():
            raise ValueError(f"in_memory = true with augment.{', augment.'.join(self.augment.source_image_keys())}: "
                             f"these crop from the source image; set in_memory = false (or \"auto\")")
        if self.decode == "gpu":
            if self.in_memory is not False:
                raise ValueError('decode = "gpu" decodes streamed views: set in_memory = false')
            made_by_timm = [key for key in ("auto_augment", "color_jitter", "re_prob") if getattr(self.augment, key)]
            if made_by_timm:
                raise ValueError(f'decode = "gpu" makes RandomResizedCrop + flip views; augment.{made_by_timm[0]} is '
                                 f'made by timm on the CPU: use decode = "cpu"')
        return self

    @model_validator(mode="after")
    def _default_root(self) -> DataConfig:
        if not self.root:
            s = self.synthetic
            default = (
                f"data/synthetic-{s.train}-{s.test}-seed{s.seed}" if self.dataset == "synthetic"
                else f"data/{self.dataset}"
            )
            object.__setattr__(self, "root", default)
        return self


class TrainConfig(Strict):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 128
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: Annotated[float, Field(gt=0)] = 3e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # sgd only
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: Annotated[float, Field(ge=0)] = 0.0
    min_lr: Annotated[float, Field(ge=0)] = 0.0
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    grad_clip: Annotated[float, Field(gt=0)] | None = None  # max global grad norm
    # Limits for smoke runs. The schedule is laid out over the steps actually run.
    max_steps: PositiveInt | None = None  # optimizer steps in total
    limit_batches: PositiveInt | None = None  # training batches per epoch
    limit_eval_batches: PositiveInt | None = None  # evaluation batches per epoch
    checkpoint_every: Annotated[int, Field(ge=0)] = 0  # steps between checkpoints; 0: end of each epoch only
    log_every: PositiveInt = 20  # steps between metric lines


class ModelConfig(Strict):
    model: str  # a timm model name, optionally with a pretrained tag: "vit_base_patch16_224.augreg_in21k"
    pretrained: bool = False  # timm's own download of ImageNet weights
    weights: str | None = None  # a local .safetensors/.pth file of initial weights, loaded instead of a download
    # square side; default: model_kwargs.img_size, else timm's config. Bounded: a typo like 22400 would otherwise
    # train for hours or run out of memory after the teacher finished
    input_size: Annotated[int, Field(ge=8, le=MAX_INPUT_SIZE)] | None = None
    mean: Triple | None = None  # default: timm's pretrained config for the model
    std: Triple | None = None
    model_kwargs: dict[str, bool | int | float | str] = {}  # e.g. {img_size = 32, patch_size = 4}
    train: TrainConfig = TrainConfig()

    @field_validator("model")
    @classmethod
    def _known_timm_model(cls, name: str) -> str:
        return check_timm_model(name)

    @field_validator("weights")
    @classmethod
    def _weights_file_exists(cls, path: str | None) -> str | None:
        if path is not None:
            if Path(path).suffix not in (".safetensors", ".pth", ".pt", ".bin"):
                raise ValueError(f"weights must be a .safetensors or .pth file, got {path!r}")
            if not Path(path).is_file():
                raise ValueError(f"weights file not found: {path}")
        return path

    @field_validator("std")
    @classmethod
    def _std_positive(cls, std: Triple | None) -> Triple | None:
        if std is not None and min(std) <= 0:
            raise ValueError(f"std values must be > 0, got {std}")
        return std


class TeacherConfig(ModelConfig):
    # Finished teacher weights to reuse instead of training: a run's stage folder (runs/<recipe>/teacher),
    # a checkpoint folder, or a .safetensors file.
    checkpoint: str | None = None

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).exists():
            raise ValueError(f"teacher checkpoint not found: {path}")
        return path


AUTO = "auto"  # [student] model = "auto": chosen by the student search ([student.search], kdforge/students.py)


class SearchConfig(Strict):
    """[student.search]: how `model = "auto"` is resolved (`kdforge students` takes the same settings as options).
    Every candidate is exported to `format` (random weights: latency does not depend on them) and timed on its
    runner here (or read from a probe's `device_profile`); the ones within `budget_ms` race, and the best on the
    validation split becomes the student."""

    format: str = "onnx"  # the file the student ships as (INT8 formats are calibrated on the training split)
    budget_ms: Annotated[float, Field(gt=0)]  # p50 latency per call at `batch` on the target
    batch: PositiveInt = 1  # images per call
    threads: PositiveInt = 2  # CPU threads of the runtime while timing here
    repeats: PositiveInt = 30  # timed calls per candidate (after 5 untimed)
    # timm model names; empty: the curated edge-friendly list (kdforge.students.DEFAULT_CANDIDATES) this timm has
    candidates: list[str] = []
    # input sizes every candidate is built, exported and timed at: each (model, size) is a candidate, and "auto"
    # resolves to a model AND its size (the teacher keeps its own input size); empty: the [student]'s input_size,
    # else the teacher's
    sizes: list[Annotated[int, Field(ge=8, le=MAX_INPUT_SIZE)]] = []
    race_steps: PositiveInt = 100  # training steps of the race's first round; each later round doubles them
    race_size: PositiveInt = 8  # at most this many candidates within budget race (the fastest first)
    # latency.json written by `python -m kdforge.serve.probe` on the device, or its device-report.json (--verify):
    # with sustained timings (--seconds), the budget is checked on the sustained p95
    device_profile: str | None = None
    max_memory_mb: Annotated[float, Field(gt=0)] | None = None  # what a candidate's session may add on the device

    @model_validator(mode="after")
    def _memory_is_measured_on_the_device(self):
        if self.max_memory_mb is not None and self.device_profile is None:
            raise ValueError("max_memory_mb is checked against the memory a device profile measured: give "
                             "device_profile too (python -m kdforge.serve.probe ... --seconds S on the device)")
        return self

    @field_validator("format")
    @classmethod
    def _measurable_format(cls, name: str) -> str:
        if name not in FORMATS:
            raise ValueError(f"unknown export format {name!r}{suggest(name, FORMATS)}; known: {', '.join(FORMATS)}")
        if FORMATS.get(name).bench_skip:
            raise ValueError(f"{name} is not timed on its own ({FORMATS.get(name).bench_skip}): search with "
                             f"{FORMATS.get(name).source}")
        return name

    @field_validator("sizes")
    @classmethod
    def _sizes_once(cls, sizes: list[int]) -> list[int]:
        if len(set(sizes)) != len(sizes):
            raise ValueError("sizes lists a size twice")
        return sizes

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, names: list[str]) -> list[str]:
        for name in names:
            check_timm_model(name)
        if len(set(names)) != len(names):
            raise ValueError("candidates lists a model twice")
        return names

    @field_validator("device_profile")
    @classmethod
    def _profile_exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"device profile not found: {path} (python -m kdforge.serve.probe writes latency.json)")
        return path


class StudentConfig(ModelConfig):
    # how model = "auto" is chosen; kept in the run's recipe beside the model it chose (read only when model is auto)
    search: SearchConfig | None = None

    @field_validator("model")
    @classmethod
    def _known_timm_model(cls, name: str) -> str:
        return name if name == AUTO else check_timm_model(name)

    @model_validator(mode="after")
    def _auto_needs_search(self) -> StudentConfig:
        if self.model == AUTO and self.weights is not None:
            raise ValueError('model = "auto" with weights: a weights file fits one model; set pretrained = true for '
                             "timm's weights of whichever model is chosen, or name the model")
        if self.model == AUTO and self.search is None:
            raise ValueError('model = "auto" needs a [student.search] section with at least budget_ms (the p50 '
                             'latency the student must meet) and format')
        return self


class TeacherCacheConfig(Strict):
    """Offline teacher answers: K augmented views of every training image, the teacher run once per view, its
    logits stored next to the run; training draws one stored view per image per epoch instead of running the
    teacher. views = 0: off (the teacher runs on every step); views = 1 with augmentation off: classic offline KD."""

    views: Annotated[int, Field(ge=0)] = 0
    topk: PositiveInt | None = None  # store only the k largest logits (+ the tail's log-mean-exp); None: all
    batch_size: PositiveInt = 512  # teacher batch while generating the cache
    # a folder: the answers as a sharded store there (STORE/<key>/shard-NNNNNN.safetensors, each shard_images
    # images of every view), built by every process in parallel, resumable, read by position (memory flat in the
    # dataset size), reused by any run with the same key; None: one file, runs/<name>/teacher_cache.safetensors
    store: str | None = None
    shard_images: PositiveInt = 4096


class DistillConfig(Strict):
    # kd (Hinton) | hard (DeiT hard-label) | dkd (decoupled KD) | dist (DIST) | ofa (OFA-KD) | fitnet (KD + FitNets
    # hints: the student's stages regressed onto the teacher's through learned adapters; the teacher runs online)
    method: str = "kd"
    temperature: Annotated[float, Field(gt=0)] = 4.0
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5  # kd/hard: weight of the teacher term; labels get 1 - alpha
    # kd/dkd: z-score each logit vector before the temperature (Sun et al., 2024); its paper pairs it with T = 2
    logit_standardization: bool = False
    dist_beta: Annotated[float, Field(ge=0)] = 1.0  # dist: weight of the inter-class (per image) correlation term
    dist_gamma: Annotated[float, Field(ge=0)] = 1.0  # dist: weight of the intra-class (per class) correlation term
    # ofa: the target-class modulation exponent (1: plain soft cross-entropy; the paper used 1.0-1.5), the
    # temperature of its softmax, and the weight of the intermediate stages' terms (each stage's projector)
    ofa_eps: Annotated[float, Field(gt=0)] = 1.0
    ofa_temperature: Annotated[float, Field(gt=0)] = 1.0
    ofa_weight: Annotated[float, Field(ge=0)] = 1.0
    hint_weight: Annotated[float, Field(ge=0)] = 1.0  # fitnet: weight of the feature hints (mean squared error)
    dkd_alpha: Annotated[float, Field(ge=0)] = 1.0  # dkd: weight of the target-class part (TCKD)
    dkd_beta: Annotated[float, Field(ge=0)] = 8.0  # dkd: weight of the non-target part (NCKD)
    # dkd: the distillation terms' weight grows linearly over the first epochs, min(epoch / warmup, 1) with epoch
    # counted from 1, as in the method's reference code (20 of 240 epochs on CIFAR-100); 0: full weight at once
    dkd_warmup_epochs: Annotated[int, Field(ge=0)] = 0
    baseline: bool = True  # also train the student on labels alone, for the gain column
    teacher_cache: TeacherCacheConfig = TeacherCacheConfig()

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        if name not in METHOD_NAMES:
            known = ", ".join(sorted(METHOD_NAMES))
            raise ValueError(f"unknown distillation method {name!r}{suggest(name, METHOD_NAMES)}; known: {known}")
        return name

    @model_validator(mode="after")
    def _hints_need_the_teacher(self) -> DistillConfig:
        if self.method == "fitnet" and self.teacher_cache.views:
            raise ValueError("method = \"fitnet\" regresses the student's features onto the teacher's, and the teacher "
                             "cache holds its logits only: distil with the teacher online (teacher_cache.views = 0)")
        return self

    @model_validator(mode="after")
    def _standardizable(self) -> DistillConfig:
        if self.logit_standardization and self.method not in STANDARDIZABLE_METHODS:
            raise ValueError(f"logit_standardization applies to method {' or '.join(STANDARDIZABLE_METHODS)}, not "
                             f"{self.method!r}")
        return self


class TensorRTConfig(Strict):
    """How TensorRT engines (trt_fp16, trt_int8) are built: the optimization profile over the batch axis, the
    builder's workspace, an optional timing cache. Engines are built on the GPU they will run on."""

    min_batch: PositiveInt = 1
    opt_batch: PositiveInt = 32  # the batch size TensorRT tunes its kernels for
    max_batch: PositiveInt = 256  # larger batches are split by the runner
    workspace_mb: PositiveInt | None = None  # builder scratch memory limit; default: TensorRT's (the GPU's memory)
    timing_cache: str | None = None  # a file kept between builds: later builds of similar models are faster

    @model_validator(mode="after")
    def _ordered_profile(self) -> TensorRTConfig:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"the batch profile needs min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch} / {self.opt_batch} / {self.max_batch}")
        return self


class ExportConfig(Strict):
    """What `kdforge distill` exports after training (and `kdforge export` by default)."""

    formats: list[str] = []  # e.g. ["onnx"]; empty: the chain ends with the trained student
    opset: Annotated[int, Field(ge=17)] = 17  # >= 17 keeps LayerNormalization one op (FP16-safe on TensorRT)
    dir: str = "exports"  # artifacts go to <dir>/<recipe name>/
    verify: bool = True  # prove each artifact against the PyTorch student on the test split
    tensorrt: TensorRTConfig = TensorRTConfig()

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in FORMATS:
                raise ValueError(f"unknown export format {name!r}{suggest(name, FORMATS)}; known: {', '.join(FORMATS)}")
        return names


class QuantizeConfig(Strict):
    """INT8 (the `int8` export format): post-training quantization with ONNX Runtime's static QDQ tooling, or
    quantization-aware distillation with NVIDIA Model Optimizer (`mode`)."""

    enabled: bool = False  # kdforge distill also exports the int8 format
    target: Literal["cpu", "tensorrt"] = "cpu"  # cpu: uint8 activations / int8 weights; tensorrt: symmetric int8
    calibration: PositiveInt = 512  # calibration images, drawn from the training split
    split: str = "train"  # where calibration images come from: only the training split is allowed
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    batch_size: PositiveInt = 32  # calibration batch size
    op_types: list[str] = ["Conv", "MatMul", "Gemm"]  # LayerNorm, Softmax, GELU, ... stay float
    exclude: list[str] = []  # ONNX node names to keep in float (as accuracy-aware mode reports them)
    # accuracy-aware mode: keep the most sensitive layers in float until the top-1 drop (percentage points,
    # measured on held-out training images, plus its standard error) is at most this; unset: quantize everything
    # in op_types
    max_top1_drop: Annotated[float, Field(ge=0)] | None = None
    sensitivity_images: PositiveInt = 512  # held-out training images for the sensitivity measurement
    # ptq: post-training quantization of the FP32 ONNX with ONNX Runtime (seconds). bias_correction: NNCF's
    # post-training quantization of the ONNX graph with its fast bias correction (no training; the CPU target).
    # qad: quantization-aware distillation: the student fine-tuned as a fake-quantized INT8 model (NVIDIA Model
    # Optimizer) for qad_epochs, learning from qad_teacher, then exported with its Q/DQ pairs (30 s for the
    # quickstart CNN; the `qad` extra)
    mode: Literal["ptq", "bias_correction", "qad"] = "ptq"
    qad_epochs: PositiveInt = 1
    qad_lr: Annotated[float, Field(gt=0)] | None = None  # default: the student's train.lr / 100
    # whom the fake-quantized student learns from. student: its own FP32 weights (KL at T=1 on the logits, no
    # labels: it learns to give the FP32 student's answers, what verification measures; as Model Optimizer's QAD).
    # teacher: the recipe's teacher with the [distill] objective (it keeps learning from the teacher and drifts
    # from the FP32 student it is verified against)
    qad_teacher: Literal["student", "teacher"] = "student"
    # the fake quantizers' ranges during QAD. calibrated: fixed where calibration put them (weights' max per channel,
    # inputs' 99.9th percentile). learned: trained with the weights, LSQ's way (Esser et al. 2020: the rounding passed
    # straight through), in log space at qad_scale_lr; the exported Q/DQ scales are the learned ones. Learned kept
    # 84.8% of the quickstart CNN's FP32 answers against 81.2% calibrated (3 seeds, benchmarks/int8_accuracy.py)
    qad_scales: Literal["calibrated", "learned"] = "learned"
    qad_scale_lr: Annotated[float, Field(gt=0)] = 0.03
    # when the INT8 file fails its [verify] tolerance: the remedies to try, in order, before giving up.
    # bias_correction: NNCF's PTQ with bias correction (no training); accuracy_aware: the mode above with
    # max_top1_drop = half the INT8 tolerance; qad: quantization-aware distillation. [] forbids escalation.
    escalate: list[Literal["bias_correction", "accuracy_aware", "qad"]] = ["bias_correction", "accuracy_aware", "qad"]

    @model_validator(mode="after")
    def _bias_correction_for_cpu(self) -> QuantizeConfig:
        if self.mode == "bias_correction" and self.target == "tensorrt":
            raise ValueError('quantize.mode = "bias_correction" makes the CPU target\'s INT8 file (NNCF\'s ONNX '
                             'quantization); for TensorRT use mode "ptq" or "qad"')
        return self

    @field_validator("split")
    @classmethod
    def _train_split_only(cls, split: str) -> str:
        if split != "train":
            raise ValueError(f"calibration images come from the training split only, got {split!r}: calibrating "
                             f"on the test split would leak it into the model that is then measured on it")
        return split


class Tolerance(Strict):
    min_agreement: Annotated[float, Field(ge=0, le=1)]  # share of test images whose top-1 class is the same
    max_top1_delta: Annotated[float, Field(ge=0)]  # |top-1 difference| in percentage points


class VerifyConfig(Strict):
    # default: 256 images at inputs up to 64x64, fewer at larger inputs (about 64x64x256 pixels a batch: 20 at 224)
    batch_size: PositiveInt | None = None
    limit_batches: PositiveInt | None = None  # test batches compared; default: the whole test split
    fp32: Tolerance = Tolerance(min_agreement=0.999, max_top1_delta=0.1)
    # FP16 rounding flips the top-1 of a few images whose two best classes are within ~1e-3
    fp16: Tolerance = Tolerance(min_agreement=0.99, max_top1_delta=0.5)
    # INT8 flips the top-1 of low-margin images while keeping accuracy: by default only the top-1 delta is judged
    int8: Tolerance = Tolerance(min_agreement=0.0, max_top1_delta=1.0)

    @model_validator(mode="before")
    @classmethod
    def _complete_tolerances(cls, raw: Any) -> Any:
        """A tolerance given in part (`--set verify.int8.max_top1_delta=0.5`) keeps the other key's default."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for precision in ("fp32", "fp16", "int8"):
            if isinstance(raw.get(precision), dict):
                default = cls.model_fields[precision].default.model_dump()
                raw[precision] = {**default, **raw[precision]}
        return raw


class RuntimeConfig(Strict):
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # auto: bf16 autocast on GPUs that support it, fp16 with a grad scaler on older GPUs, fp32 on CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    threads: PositiveInt | None = None  # CPU threads for PyTorch; default: PyTorch's choice
    # channels_last memory format for CNNs: None (auto) turns it on for CNNs on CUDA, off elsewhere
    channels_last: bool | None = None
    compile: bool = False  # torch.compile the trained model (minutes of compilation; pays off on long GPU runs)

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, device: str) -> str:
        return check_device_name(device)


def check_device_name(device: str) -> str:
    """`device` when it names a device kdforge runs on (auto, cpu, cuda, cuda:N, mps); ValueError otherwise."""
    base, _, index = device.partition(":")
    if base not in ("auto", "cpu", "cuda", "mps") or (index and (base != "cuda" or not index.isdigit())):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    return device


class ExperimentConfig(Strict):
    """Several seeds: the chain once per seed (runs/<name>-seed<s>/), then mean +- sd of every accuracy and the
    95% confidence interval of the distillation gain over the baseline of the same seed."""

    seeds: list[int] = []  # empty: one chain with the recipe's `seed`
    # one teacher, trained with the first seed, for every seed: the gain's spread is then the students' (and the
    # teacher is trained once); false trains a teacher per seed, so the spread includes the teacher's
    share_teacher: bool = True

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds


TRACKING_BACKENDS = ("tensorboard", "mlflow")


class TrackingConfig(Strict):
    """Where training metrics go besides metrics.jsonl (kdforge/tracking.py)."""

    backend: str | list[str] = "none"  # "none", "tensorboard", "mlflow", or a list of them
    tracking_uri: str | None = None  # MLflow; default: sqlite:///<runs dir>/../mlflow.db, artifacts in ../mlruns
    experiment: str | None = None  # MLflow experiment name; default: the recipe's name

    @field_validator("backend")
    @classmethod
    def _known_backends(cls, backend: str | list[str]) -> str | list[str]:
        names = [backend] if isinstance(backend, str) else backend
        unknown = [name for name in names if name not in (*TRACKING_BACKENDS, "none")]
        if unknown:
            raise ValueError(f"unknown tracking backend {unknown[0]!r}; choose from none, "
                             f"{', '.join(TRACKING_BACKENDS)}")
        return backend

    @property
    def backends(self) -> list[str]:
        names = [self.backend] if isinstance(self.backend, str) else self.backend
        return [name for name in names if name != "none"]


class Recipe(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    seed: int = 0
    experiment: ExperimentConfig = ExperimentConfig()
    data: DataConfig = DataConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    train: TrainConfig = TrainConfig()
    teacher: TeacherConfig | None = None
    student: StudentConfig | None = None
    distill: DistillConfig = DistillConfig()
    export: ExportConfig = ExportConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    verify: VerifyConfig = VerifyConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _merge_train_defaults(cls, raw: Any) -> Any:
        """[train] is the default for [teacher.train] and [student.train]; keys set per model win."""
        if not isinstance(raw, dict) or not isinstance(raw.get("train", {}), dict):
            return raw
        raw = dict(raw)
        for stage in ("teacher", "student"):
            section = raw.get(stage)
            if isinstance(section, dict) and isinstance(section.get("train", {}), dict):
                raw[stage] = {**section, "train": {**raw.get("train", {}), **section.get("train", {})}}
        return raw

    @model_validator(mode="after")
    def _seeds_need_a_baseline(self) -> Recipe:
        if self.experiment.seeds and not self.distill.baseline:
            raise ValueError("experiment.seeds needs distill.baseline = true: each seed's gain is measured against "
                             "the baseline of the same seed")
        return self

    @model_validator(mode="after")
    def _auto_student_once(self) -> Recipe:
        if self.student is not None and self.student.model == AUTO and self.experiment.seeds:
            raise ValueError('experiment.seeds with [student] model = "auto": choose the student once, then compare '
                             'it over seeds: `kdforge students RECIPE --write-recipe PATH`, and --seeds on PATH')
        return self

    @model_validator(mode="after")
    def _mixup_pairs(self) -> Recipe:
        if self.data.augment.mixes and self.distill.teacher_cache.views:
            raise ValueError("data.augment mixup/cutmix with distill.teacher_cache: the cache holds the teacher's "
                             "answers for unmixed views; distill with the teacher online (teacher_cache.views = 0)")
        if self.data.augment.mixes:
            odd = sorted({section.train.batch_size for section in (self.teacher, self.student)
                          if section is not None and section.train.batch_size % 2})
            if odd:
                raise ValueError(f"data.augment mixup/cutmix pairs each image with another of its batch: batch_size "
                                 f"must be even (got {odd[0]})")
        return self

    def model_for(self, stage: str) -> ModelConfig:
        """The model section a stage trains: the teacher for "teacher", the student for "baseline"/"student"."""
        section = self.teacher if stage == "teacher" else self.student
        if section is None:
            key = "teacher" if stage == "teacher" else "student"
            raise RecipeError(f"recipe {self.name!r} has no [{key}] section, which the {stage} stage needs")
        return section


# ----------------------------------------------------------------------------------------------------------
# loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError with one line per problem."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path} is a folder; pass a recipe file, e.g. recipes/quickstart.toml")
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                          f"save the recipe as UTF-8") from None
    except ValueError as exc:  # TOMLDecodeError, or a number too long for Python's int (over 4,300 digits)
        raise RecipeError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:  # arrays or inline tables nested thousands deep
        raise RecipeError(f"{path}: nested deeper than a recipe goes (at most {MAX_DEPTH} levels)") from None
    for override in overrides:
        apply_override(raw, override)
    raw.setdefault("name", path.stem)
    return validate_recipe(raw, source=str(path))


def validate_recipe(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    check_depth(raw, source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place. The value is read as TOML, else kept as a string."""
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError(f"--set {override!r}: expected dotted.key=value, e.g. --set train.epochs=1")
    if len(parts) > MAX_DEPTH:
        raise RecipeError(f"--set {shorten(override, 80)}: a key of {len(parts):,} levels; a recipe goes at most "
                          f"{MAX_DEPTH} deep")
    try:
        document = tomllib.loads(f"v = {text.strip()}")
    except ValueError:  # TOMLDecodeError, or a number too long for Python's int
        document = {"v": text.strip()}  # bare words like resnet18 need no quotes (but are one line)
    except RecursionError:
        raise RecipeError(f"--set {parts[0]}...: the value is nested deeper than a recipe goes") from None
    value = document["v"]
    if len(document) != 1 or value == text.strip() and "\n" in value:  # more lines followed the value
        raise RecipeError(f"--set {key.strip()}: one value per --set, and this one goes on past its first value "
                          f"({shorten(text.strip(), 60)!r}); give each key its own --set")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {override!r}: {'.'.join(parts[: i + 1])} is a value, not a table")
        node = child
    node[parts[-1]] = value


def check_processes(batch_size: int, processes: int, mixes: bool) -> None:
    """A global batch of `batch_size` split over `processes` (torchrun): evenly, and with mixup/cutmix into even
    shares (each image is mixed with another of its own process's share; timm's Mixup asserts an even batch)."""
    share, left = divmod(batch_size, processes)
    if left:
        raise RecipeError(f"train.batch_size {batch_size} (the global batch) is not divisible by the {processes} "
                          f"processes")
    if mixes and share % 2:
        raise RecipeError(f"data.augment mixup/cutmix pairs images within each process's share of the batch: "
                          f"train.batch_size {batch_size} over {processes} processes is {share} each, an odd number; "
                          f"use a batch_size that gives an even share (e.g. {2 * processes * math.ceil(share / 2)})")


def check_depth(raw: dict[str, Any], source: str) -> None:
    """Tables and arrays nest at most MAX_DEPTH levels (every later step, from validation to hashing, walks them
    recursively: a 10,000-level value would end in a RecursionError instead of a message)."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(raw, ())]
    while stack:
        node, where = stack.pop()
        if len(where) > MAX_DEPTH:
            shown = ".".join(where[:4]) + "..."
            raise RecipeError(f"{source}: {shorten(show_key(shown), 80)}: nested {MAX_DEPTH}+ levels deep; a recipe "
                              f"goes at most {MAX_DEPTH} deep")
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack += [(child, (*where, str(name))) for name, child in children]


def show_key(key: str) -> str:
    """A key as it is spelt: invisible or control characters (a zero-width space) shown escaped, so that an error
    about `tr\\u200bain` does not read as one about `train`."""
    return key if key.isprintable() else ascii(key)[1:-1]


def data_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """The [data] settings that decide what a model trains on, for stage fingerprints and cache keys: without
    `workers` (how fast, not what), and without the keys added later while they keep their defaults (so runs
    finished before they existed are still reused)."""
    data = cfg.model_dump(mode="json", exclude={"workers"})
    if data["in_memory"] == "auto":
        del data["in_memory"]
    later = {**STREAMED_AUGMENT, **MIXUP_DEFAULTS}
    for key, default in later.items():
        value = getattr(cfg.augment, key)
        if value == default or (isinstance(default, tuple) and tuple(value) == default):
            del data["augment"][key]
    return data


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (None values dropped: TOML has no null, the defaults restore them)."""
    return recipe.model_dump(mode="json", exclude_none=True)


def recipe_to_toml(recipe: Recipe) -> str:
    import tomli_w

    return tomli_w.dumps(recipe_to_dict(recipe))


def recipe_hash(recipe: Recipe) -> str:
    """A short, stable fingerprint of the resolved recipe (stored with runs and artifacts)."""
    canonical = json.dumps(recipe_to_dict(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# error messages


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        # a bad [train] value is reported once, not again for each model that inherits it
        if len(loc) > 2 and loc[0] in ("teacher", "student") and loc[1] == "train":
            if any(tuple(e["loc"]) == ("train", *loc[2:]) for e in exc.errors()):
                continue
        key = show_key(".".join(str(p) for p in loc)) or "(top level)"
        lines.append(f"{source}: {key}: {_describe(err, loc)}")
    return "\n".join(dict.fromkeys(lines))


def _describe(err: dict[str, Any], loc: tuple[Any, ...]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        known = sorted(_fields_at(loc[:-1]))
        return f"unknown key{suggest(str(loc[-1]), known)}; expected one of: {', '.join(known)}"
    if kind == "missing":
        return "required key is missing"
    message = err["msg"].removeprefix("Value error, ")
    if kind in ("value_error", "assertion_error"):
        return message
    return f"{message} (got {err['input']!r})"


def _fields_at(loc: tuple[Any, ...]) -> set[str]:
    """The keys allowed in the table at `loc`, for 'expected one of' in unknown-key errors."""
    model: Any = Recipe
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return set()
        model = _model_in(field.annotation)
    return set(getattr(model, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None
