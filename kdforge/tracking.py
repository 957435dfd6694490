"""Experiment tracking: the events that write metrics.jsonl also go to TensorBoard and/or MLflow.

    [tracking]
    backend = ["tensorboard", "mlflow"]     # "none" (default), one name, or several
    tracking_uri = "http://mlflow:5000"     # MLflow only; default: sqlite:///<runs dir>/../mlflow.db

A training stage gets one consumer per backend next to its MetricsLog (`stage_trackers`): every "log" event
becomes train/* scalars (loss and its parts, top-1, lr, images/s) and every "eval" event val/* or test/*
scalars, at the step they happened. The end of a chain (`track_summary`) records the summary's numbers and
attaches summary.json, the report and the export's metadata/verify/bench files. TensorBoard writes event files under
runs/<name>/tensorboard/<stage or summary>/ (`tensorboard --logdir runs/<name>/tensorboard`); MLflow gets one run
per stage and one for the summary, named <name>/<stage>, in the experiment named after
the recipe (all seeds of a --seeds run in one), with the resolved recipe as parameters. MLflow >= 3.7 refuses
its old ./mlruns file store unless MLFLOW_ALLOW_FILE_STORE is set, so the local default is its own default kind,
a SQLite file (next to the runs folder, artifacts in mlruns/ beside it). Both packages are optional extras,
imported only when a recipe asks for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdforge.errors import KdforgeError
from kdforge.recipe import Recipe, TrackingConfig, recipe_to_toml

Event = dict[str, Any]
MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}  # backend -> (module, extra)


def check_tracking(cfg: TrackingConfig) -> None:
    """Fail before any work when a backend's package is missing, naming the extra that installs it."""
    import importlib.util

    for backend in cfg.backends:
        module, extra = MODULES[backend]
        if importlib.util.find_spec(module) is None:
            raise KdforgeError(f"[tracking] backend {backend!r} needs the {module} package; install it with: "
                               f"pip install \"kdforge[{extra}]\"")


def mlflow_target(cfg: TrackingConfig, runs_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location of new experiments): the recipe's URI (its server decides where artifacts
    go), else a SQLite file next to the runs folder with artifacts in mlruns/ beside it."""
    if cfg.tracking_uri:
        return cfg.tracking_uri, None
    beside = runs_dir.resolve().parent
    return f"sqlite:///{(beside / 'mlflow.db').as_posix()}", (beside / "mlruns").as_uri()


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """A nested recipe as MLflow parameters: {"teacher.train.lr": 0.003, ...}."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(f"{prefix}.{key}" if prefix else key, item))
        return out
    return {prefix: json.dumps(value) if isinstance(value, list | type(None)) else value}


def _scalars(event: Event) -> dict[str, float]:
    """The numbers of a "log" (train/*) or "eval" (test/*) event."""
    if event["event"] == "log":
        names = {"loss": "train/loss", "train_top1": "train/top1", "lr": "train/lr",
                 "images_per_s": "train/images_per_s"}
        out = {names[k]: v for k, v in event.items() if k in names}
        out.update({f"train/{k}": v for k, v in event.items() if k.startswith("loss_")})
        return out
    if event["event"] == "eval":  # val/* each epoch when the run holds out a validation split, test/* at the end
        return {f"{event.get('split', 'test')}/{k}": event[k] for k in ("top1", "top5", "loss") if k in event}
    return {}


class TensorBoardTracker:
    def __init__(self, log_dir: Path, recipe: Recipe) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("recipe", "```toml\n" + recipe_to_toml(recipe) + "\n```")
        self.closed = False

    def __call__(self, event: Event) -> None:
        for name, value in _scalars(event).items():
            self.writer.add_scalar(name, value, event["step"])
        if event["event"] == "end":
            self.close()

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close the event file (once; TensorBoard has no run status)."""
        if not self.closed:
            self.writer.close()
            self.closed = True


class MlflowTracker:
    """One MLflow run, written through MlflowClient (no process-wide active run)."""

    def __init__(self, target: tuple[str, str | None], recipe: Recipe, run_name: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri, artifact_location = target
        self.client = MlflowClient(tracking_uri=uri)
        name = recipe.tracking.experiment or recipe.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=artifact_location)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                             tags={"kdforge.recipe": recipe.name}).info.run_id
        params = _flat("", recipe.model_dump(mode="json"))
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
        self.total_steps: int | None = None
        self.closed = False

    def __call__(self, event: Event) -> None:
        if event["event"] == "start":
            self.total_steps = event["total_steps"]
        for name, value in _scalars(event).items():
            self.client.log_metric(self.run_id, name, value, step=event["step"])
        if event["event"] == "end":
            finished = self.total_steps is None or event["step"] >= self.total_steps
            self.close("FINISHED" if finished else "KILLED")

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run with `status` (once: a later close is a no-op)."""
        if not self.closed:
            self.client.set_terminated(self.run_id, status)
            self.closed = True


def stage_trackers(recipe: Recipe, runs_dir: Path, stage: str) -> list[TensorBoardTracker | MlflowTracker]:
    """The tracking consumers of one training stage (none unless the recipe asks)."""
    trackers: list[TensorBoardTracker | MlflowTracker] = []
    cfg = recipe.tracking
    if "tensorboard" in cfg.backends:
        trackers.append(TensorBoardTracker(runs_dir / recipe.name / "tensorboard" / stage, recipe))
    if "mlflow" in cfg.backends:
        trackers.append(MlflowTracker(mlflow_target(cfg, runs_dir), recipe, f"{recipe.name}/{stage}"))
    return trackers


def track_summary(recipe: Recipe, runs_dir: Path, summary: dict[str, Any], files: list[Path]) -> None:
    """The chain's numbers (top-1 per role, gain, verification per format) and its files (summary.json, the
    report, the export's metadata/verify/bench) in every backend the recipe asks for."""
    cfg = recipe.tracking
    numbers = {f"summary/{role}_top1": summary[role]["top1"] for role in ("teacher", "baseline", "student")
               if summary.get(role)}
    if summary.get("gain_top1") is not None:
        numbers["summary/gain_top1"] = summary["gain_top1"]
    for name, row in summary.get("exports", {}).items():
        if row.get("verified"):
            numbers[f"export/{name}_top1"] = row["exported_top1"]
            numbers[f"export/{name}_passed"] = float(row["passed"])
    if "tensorboard" in cfg.backends:
        board = TensorBoardTracker(runs_dir / recipe.name / "tensorboard" / "summary", recipe)
        for name, value in numbers.items():
            board.writer.add_scalar(name, value, 0)
        board.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=2) + "\n```")
        board.close()
    if "mlflow" in cfg.backends:
        run = MlflowTracker(mlflow_target(cfg, runs_dir), recipe, f"{recipe.name}/summary")
        for name, value in numbers.items():
            run.client.log_metric(run.run_id, name, value, step=0)
        for path in files:
            if path.is_dir():
                run.client.log_artifacts(run.run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                run.client.log_artifact(run.run_id, str(path))
        run.close()
