"""What a long job says while it runs: events to consumers, notes, and named phases, each announced and timed.

The one channel everything long-running reports through (training stages, the chain, the export's phases, QAD,
the student search): plain dicts, {"event": "start" | "step" | "log" | "eval" | "end" | "note", ...}, to
consumers, any callables taking one event (the progress display and the metrics log: `train/events.py`; a test's
list). It lives in the foundation so that every layer may speak without importing the training code.

    notify(consumers, "export: onnx added")     # a note (one line for the user) to every consumer
    write_shards(..., consumers=[on_notes(print)])   # notes alone, to any function taking a line
    phases = Phases(report=print)               # report: where the lines go (a console, an event consumer)
    with phases("int8: calibration"):
        ...
    phases.seconds                              # {"int8: calibration": 12.3}; a repeated phase adds up
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Event = dict[str, Any]
Consumer = Callable[[Event], None]


def notify(consumers: Iterable[Consumer], message: str) -> None:
    """A note (one line for the user) to every consumer."""
    for consume in consumers:
        consume({"event": "note", "message": message})


def on_notes(write: Callable[[str], None]) -> Consumer:
    """A consumer that hands each note's line to `write` (a console, stderr, a status line) and ignores the
    training loop's other events: what a command without a progress display listens with."""
    def consume(event: Event) -> None:
        if event["event"] == "note":
            write(event["message"])
    return consume


class Phases:
    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self.report = report or (lambda line: None)
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, announce: bool = True) -> Iterator[None]:
        if announce:
            self.report(f"{name} ...")
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 3)
            if announce:
                self.report(f"{name}: {elapsed:.1f} s")
