"""Linux process controls (prctl) the bridge relies on; each is a no-op returning False elsewhere
(macOS has neither, and the bridge then falls back as the callers describe)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return libc.prctl(option, value, 0, 0, 0) == 0


def become_subreaper() -> bool:
    """Orphaned descendants (a `setsid` daemon whose parent exited) are re-parented to this
    process instead of init, so walking its children finds every one of them."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def forbid_inspection() -> bool:
    """Make /proc/<this pid>/environ, mem and friends readable by root only: code running as the
    same user (a preset, when no sandbox user is set) cannot read this process's credentials.
    Reset by exec, so it never reaches the commands this process starts."""
    return _prctl(_PR_SET_DUMPABLE, 0)
