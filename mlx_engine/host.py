"""Host facts for evidence and the bridge self-test; free of mlx so the bridge runs anywhere."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path


def sysctl(name: str) -> str | None:
    """A macOS sysctl value, or None elsewhere / on failure."""
    try:
        done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def chip() -> str:
    """'Apple M4 Pro' on a Mac, the CPU model name on Linux."""
    if sys.platform == "darwin":
        return sysctl("machdep.cpu.brand_string") or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
