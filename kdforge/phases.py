"""Named phases of a long job, each announced and timed, so a user sees what is running and how long it took.

    phases = Phases(report=print)               # report: where the lines go (a console, an event consumer)
    with phases("int8: calibration"):
        ...
    phases.seconds                              # {"int8: calibration": 12.3}; a repeated phase adds up
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


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
