"""Helpers the bridge tests share: waiting on conditions, never on fixed sleeps."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting for its reaper."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def survivors(pids: list[int], within_s: float = 10.0) -> list[int]:
    """The pids still alive once `within_s` has passed (returns as soon as none is)."""
    deadline = time.monotonic() + within_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def wait_for(condition: Callable[[], bool], what: str, within_s: float = 60.0) -> None:
    """Poll a condition (never a fixed sleep standing in for it)."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)

