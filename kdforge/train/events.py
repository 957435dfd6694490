"""Consumers of the events long jobs emit (kdforge/phases.py: `Event`, `Consumer`, `notify`): the progress
display and the metrics log. The loop emits plain dicts and knows nothing about terminals or files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kdforge.fileio import atomic_write_text
from kdforge.phases import Event


def format_metrics(event: Event) -> str:
    parts = []
    for key, fmt in (("loss", "loss {:.4f}"), ("train_top1", "acc {:.1%}"), ("top1", "top-1 {:.2%}"),
                     ("top5", "top-5 {:.2%}"), ("images_per_s", "{:.0f} img/s"), ("data_wait", "data wait {:.0%}"),
                     ("lr", "lr {:.2e}")):
        if event.get(key) is not None:
            parts.append(fmt.format(event[key]))
    return "  ".join(parts)


class MetricsLog:
    """Appends "log" and "eval" events to metrics.jsonl (one JSON object a line)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, event: Event) -> None:
        if event["event"] in ("log", "eval"):
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (they belong to work a resumed run will redo)."""
        if self.path.is_file():
            lines = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            atomic_write_text(self.path, "".join(line + "\n" for line in lines))


class ProgressDisplay:
    """A rich progress bar on a terminal; plain log lines otherwise (CI logs, pipes)."""

    def __init__(self, console: Console | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        # soft_wrap: off a terminal (CI logs, `make demo > log`) rich would wrap at 80 columns mid-line; one event
        # is one line, however long
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.progress: Progress | None = None
        self.task = None
        self.title = ""
        self.clock = clock
        self.started: tuple[float, int] = (0.0, 0)  # (time, step) at the stage's start, for the time left

    def __call__(self, event: Event) -> None:
        kind = event["event"]
        if kind == "start":
            self.title = event["title"]
            self.started = (self.clock(), event["step"])
            self.console.print(
                f"[bold]{self.title}[/]: {event['total_steps']} steps "
                f"({event['steps_per_epoch']} per epoch), {event['device']}"
                + (f", resuming at step {event['step']}" if event["step"] else "")
            )
            if self.console.is_terminal:
                self.progress = Progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=self.console,
                )
                self.task = self.progress.add_task(
                    self.title, total=event["total_steps"], completed=event["step"], status=""
                )
                self.progress.start()
        elif kind == "step" and self.progress is not None:
            self.progress.update(self.task, completed=event["step"])
        elif kind == "log":
            if self.progress is not None:
                self.progress.update(self.task, completed=event["step"], status=format_metrics(event))
            else:
                self.console.print(f"{self.title} step {event['step']}/{event['total_steps']}  {format_metrics(event)}"
                                   f"{self.time_left(event)}")
        elif kind == "eval":
            split = {"val": ", validation", "test": ", test"}.get(event.get("split", ""), "")
            self.console.print(f"{self.title} epoch {event['epoch']} (step {event['step']}{split}): "
                               f"{format_metrics(event)}")
        elif kind == "note":  # plain text: a path or message with [brackets] or :colons: prints as it is
            self.console.print(event["message"], markup=False, emoji=False)
        elif kind == "end":
            self.close()

    def time_left(self, event: Event) -> str:
        """"  2:05 left": the stage's remaining steps at its pace so far (evaluations included)."""
        since, first = self.started
        done = event["step"] - first
        if done <= 0 or event["step"] >= event["total_steps"]:
            return ""
        left = round((self.clock() - since) / done * (event["total_steps"] - event["step"]))
        return f"  {left // 60}:{left % 60:02d} left"

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
