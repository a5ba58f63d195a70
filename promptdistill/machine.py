"""What the machine a run ran on is, recorded with its results: stage timings mean little
without the CPU behind them (the same demo takes about twice as long in fp32 on a CPU without
bf16 units as in bf16 on one with them)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import re
from pathlib import Path


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: nothing to read
        return ""


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AMX tiles (Intel Sapphire Rapids and later)
    or AVX512_BF16's dot products (AMD Zen 4, Intel Cooper Lake), read from the kernel's CPU
    flags (only Linux is asked; elsewhere the answer is no). Without them oneDNN emulates bf16
    and it runs no faster than fp32."""
    return re.search(r"^flags\s*:.*\b(amx_bf16|avx512_bf16)\b", _cpuinfo(), re.MULTILINE) is not None


def facts() -> dict:
    """Python, the platform, the CPU (its name, how many this process may use, bf16 units) and
    the versions of the packages that compute a run's numbers."""
    name = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    out = {"python": platform.python_version(), "platform": platform.platform(),
           "cpu": name.group(1).strip() if name else platform.processor(),
           "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "cpu_bf16_units": cpu_has_bf16_units()}
    for pkg in ("promptdistill", "torch", "transformers", "peft", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
