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
        summary.json, report/              the chain's summary and report
        .stale/<stage>-<time>-<pid>/       a replaced stage, kept until its successor finishes
    exports/<recipe>/                      an export (formats.py names its files)
        metadata.json, verify.json, bench.json

Nothing here imports torch: serving reads export folders through these names too. Loading the PyTorch model of
a finished stage is `models.load_stage_model`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

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
# an export folder
METADATA = "metadata.json"
VERIFY = "verify.json"
BENCH = "bench.json"

TRAINING_STAGES = ("teacher", "baseline", "student")  # in the order the chain trains them
QAD = "qad"  # the stage of quantization-aware distillation (train/qad.py): its output is an ONNX file
QAD_ONNX = "student.qad.onnx"  # runs/<recipe>/qad/student.qad.onnx
EXPORTED_STAGES = ("student", "baseline")  # the distilled student is exported, else the baseline student


def engine_sidecar(engine: Path) -> Path:
    """A TensorRT engine's sidecar: what the engine has no room for (input spec, TensorRT version, GPU)."""
    return engine.with_name(engine.name + ".json")


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
