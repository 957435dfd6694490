"""What machine this is, without torch: the CPU's name and architecture, for every timing kdforge records (the
serving image's probe included; `kdforge.runtime.machine` adds torch's view of it).

    cpu_model()    # "AMD EPYC 7R13 Processor", or a board's "Raspberry Pi 5 Model B Rev 1.0"
"""

from __future__ import annotations

import platform
from pathlib import Path

# /proc/cpuinfo keys that name the processor: x86 ("model name"), Arm boards ("Model", "Hardware")
CPU_KEYS = ("model name", "Model", "Hardware")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, the platform's answer elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for key in CPU_KEYS:
        for line in lines:
            if line.split(":", 1)[0].strip() == key and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"
