"""What machine this is, without torch: the CPU's name and architecture, for every timing kdforge records (the
serving image's probe included; `kdforge.runtime.machine` adds torch's view of it).

    cpu_model()    # "AMD EPYC 7R13 Processor", or a board's "Raspberry Pi 5 Model B Rev 1.0"
    describe_device()   # what a device report records: CPU lines, architecture, the features kernels choose by
    reset_peak_memory(); ...; peak_memory_mb()    # this process's peak resident memory since the reset

The CPU features listed are those the runtimes' kernels choose between: on Arm the dot-product (asimddp), FP16
(fphp/asimdhp), int8 matrix (i8mm), BF16 and SVE paths; on x86 AVX2, AVX-512 and its VNNI/BF16/FP16 extensions, AMX.
"""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path
from typing import Any

# /proc/cpuinfo keys that name the processor: x86 ("model name"), Arm boards ("Model", "Hardware")
CPU_KEYS = ("model name", "Model", "Hardware")
KERNEL_FEATURES = ("asimd", "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve", "sve2", "sme",  # Arm
                   "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                   "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")  # x86


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return []


def _cpuinfo_value(lines: list[str], key: str) -> str | None:
    for line in lines:
        if ":" in line and line.split(":", 1)[0].strip() == key:
            return line.split(":", 1)[1].strip()
    return None


def describe_device() -> dict[str, Any]:
    """The machine as a device report records it: CPU name (and /proc/cpuinfo's Model and Hardware lines, which
    name an Arm board), architecture, kernel, cores this process may use, and the CPU features runtimes choose
    their kernels by (`KERNEL_FEATURES` present in cpuinfo's flags or Features line)."""
    lines = _cpuinfo()
    flags = set((_cpuinfo_value(lines, "flags") or _cpuinfo_value(lines, "Features") or "").split())
    return {"cpu": cpu_model(), "model": _cpuinfo_value(lines, "Model"), "hardware": _cpuinfo_value(lines, "Hardware"),
            "arch": platform.machine(), "kernel": platform.release(), "system": platform.system(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "features": [name for name in KERNEL_FEATURES if name in flags]}


# the runtimes a device runs exported files with (and numpy), by their package names
RUNTIME_PACKAGES = ("onnxruntime", "openvino", "ai-edge-litert", "ncnn", "numpy")


def runtime_versions() -> dict[str, str]:
    """The installed versions of RUNTIME_PACKAGES (read from package metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in RUNTIME_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def reset_peak_memory() -> bool:
    """Start a new peak-memory window for this process (Linux: writing 5 to /proc/self/clear_refs resets VmHWM);
    False where the peak cannot be reset (then `peak_memory_mb` is the process's peak since it started). What
    earlier objects freed is first given back to the system (glibc's malloc_trim), or a new session would reuse
    it without the resident memory growing, and measure as if it needed nothing."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def resident_memory_mb() -> float:
    """This process's resident memory now, in MB (VmRSS), or its peak where /proc is missing."""
    return _status_mb("VmRSS")


def peak_memory_mb() -> float:
    """This process's peak resident memory, in MB (VmHWM since the last `reset_peak_memory`)."""
    return _status_mb("VmHWM")


def _status_mb(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / (1024 * 1024 if platform.system() == "Darwin" else 1024)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, the platform's answer elsewhere)."""
    lines = _cpuinfo()
    for key in CPU_KEYS:
        value = _cpuinfo_value(lines, key)
        if value:
            return value
    return platform.processor() or platform.machine() or "unknown CPU"
