"""Where everything of a run and an export lives: the one module that spells these file and folder names.

    runs/<recipe>/                         a run
        <stage>/                           teacher | baseline | student | qad (see train/stages.py)
            recipe.toml                    the recipe the stage was trained with
            metrics.jsonl                  one event per line (train/events.py)
            result.json                    written last: the stage finished
            checkpoints/step-NNNNNNNN/     model.safetensors + state.pt (checkpoint.py)
            last -> checkpoints/...        the final weights (what later stages use)
            best -> checkpoints/...        the best epoch-end weights
        teacher_eval/result.json           the evaluation of a teacher given by teacher.checkpoint
        teacher_cache.safetensors          the teacher's answers on stored augmented views (distill/cache.py)
        summary.json, seeds.json           the chain's summary; the statistics over seeds (runs/<recipe>-seed<s>/)
        report/                            report.md/.html, seeds.md/.html and their plots (report.py)
        .stale/<stage>-<time>-<pid>/       a replaced stage, kept until its successor finishes
    exports/<recipe>/                      an export (formats.py names its files)
        metadata.json, verify.json, bench.json
        triton/student/{config.pbtxt, labels.txt, 1/model.onnx}    a Triton model repository (Triton's layout)
        student.*.{engine,pte,param}.json  the sidecar of a file with no room for metadata

Nothing here imports torch: serving reads export folders through these names too. Loading the PyTorch model of
a finished stage is `models.load_stage_model`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# the user's cache ($KDFORGE_CACHE_DIR, else ~/.cache/kdforge): what kdforge derives once and reuses across runs
CACHE_ENV = "KDFORGE_CACHE_DIR"
DECODED = "decoded"  # the decode cache of ImageFolder/WebDataset images (data/imagefolder.py)
MODEL_NAMES = "timm-models"  # the index of timm's model names, one file per timm version (model_names.py)

# a stage folder
RECIPE = "recipe.toml"
METRICS = "metrics.jsonl"
RESULT = "result.json"
CHECKPOINTS = "checkpoints"
LAST = "last"
BEST = "best"
# a run folder
SUMMARY = "summary.json"
SEEDS = "seeds.json"  # runs/<name>/seeds.json: the statistics over seeds (runs/<name>-seed<s>/ are the runs)
REPORT = "report"
STALE = ".stale"
TEACHER_EVAL = "teacher_eval"
TEACHER_CACHE = "teacher_cache.safetensors"
# a run's report folder
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SEEDS_MD = "seeds.md"
SEEDS_HTML = "seeds.html"
PLOTS = {"curves": "curves.png", "accuracy_latency": "accuracy_latency.png", "size": "size.png", "seeds": "seeds.png",
         "race": "race.png"}
# an export folder
# the student search (kdforge/students.py): runs/<recipe>/students/ holds its record, its candidates' exports
# (exports/<model>-<size>/, what the probe times on a device), the race's runs (race/) and the chain's budget check
STUDENTS = "students"
STUDENTS_RECORD = "students.json"
STUDENTS_PLOT = "latency_size.png"
BUDGET = "budget.json"

METADATA = "metadata.json"
VERIFY = "verify.json"
BENCH = "bench.json"
# a Triton model repository in an export folder: <TRITON>/<TRITON_MODEL>/{config.pbtxt, labels.txt, 1/model.onnx}
TRITON = "triton"
TRITON_MODEL = "student"
TRITON_CONFIG = "config.pbtxt"
TRITON_LABELS = "labels.txt"
TRITON_VERSION = "1"
TRITON_FILE = "model.onnx"

TRAINING_STAGES = ("teacher", "baseline", "student")  # in the order the chain trains them
QAD = "qad"  # the stage of quantization-aware distillation (train/qad.py): its output is an ONNX file
QAD_ONNX = "student.qad.onnx"  # runs/<recipe>/qad/student.qad.onnx
EXPORTED_STAGES = ("student", "baseline")  # the distilled student is exported, else the baseline student
LOCKS = "locks"  # in the user cache: the folder locks of running kdforge commands (fileio.lock_folder)


def user_cache_dir() -> Path:
    """The user's kdforge cache: $KDFORGE_CACHE_DIR, else ~/.cache/kdforge."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kdforge")


def seed_run_name(name: str, seed: int) -> str:
    """The run of seed `seed` of a recipe run over several seeds: runs/<name>-seed<s>/."""
    return f"{name}-seed{seed}"


def sidecar(artifact: Path) -> Path:
    """`<file>.json` beside an artifact with no room for metadata (a TensorRT engine, an ExecuTorch program, an NCNN
    model): its input spec and what made it (a TensorRT engine: the TensorRT version and GPU too)."""
    return artifact.with_name(artifact.name + ".json")


def stage_dir(runs_dir: Path | str, name: str, stage: str) -> Path:
    return Path(runs_dir) / name / stage


def is_finished(stage_dir: Path) -> bool:
    """A stage finished: its result.json is written (after its last checkpoint)."""
    return (stage_dir / RESULT).is_file()


def has_started(stage_dir: Path) -> bool:
    """A stage wrote at least one checkpoint (finished or not)."""
    return (stage_dir / LAST).exists()


def newest(paths: Iterable[Path]) -> Path | None:
    """The most recently modified of `paths`, or None when there are none."""
    return max(paths, key=lambda p: p.stat().st_mtime, default=None)


def finished_stages(runs_dir: Path, stage: str = "*") -> list[Path]:
    """The finished stage folders of every run in `runs_dir` (of one stage name, or all)."""
    return [result.parent for result in sorted(Path(runs_dir).glob(f"*/{stage}/{RESULT}"))]


def export_dir(exports_dir: Path | str, name: str) -> Path:
    return Path(exports_dir) / name


def export_files(export_dir: Path) -> list[Path]:
    """An export folder's own records (metadata, verification, benchmark)."""
    return [export_dir / name for name in (METADATA, VERIFY, BENCH)]
