"""Run one preset command: argv list, no shell, a scrubbed environment, and a timeout that kills
the whole process group (a plain kill of the child leaves its grandchildren running)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Passed through from the runner; everything else (tokens, GIT_*, BASH_ENV, PYTHON*, DYLD_*,
# LD_PRELOAD, ...) is dropped.
PASSTHROUGH = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ",
               "HF_HOME", "XDG_CACHE_HOME", "KAKEYA_CACHE_DIR")


@dataclass(frozen=True)
class Finished:
    exit_code: int | None  # negative: killed by that signal
    timed_out: bool
    duration_s: float


def child_env(environ: Mapping[str, str], checkout: Path, tmp: Path) -> dict[str, str]:
    """Only what the command needs; the request commit's code is found through PYTHONPATH."""
    env = {k: environ[k] for k in PASSTHROUGH if k in environ}
    env.update(
        PYTHONPATH=str(checkout),
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TMPDIR=str(tmp),
    )
    return env


def run(argv: list[str], cwd: Path, env: Mapping[str, str], stdout: Path, stderr: Path,
        timeout_s: float, kill_grace_s: float) -> Finished:
    start = time.monotonic()
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=kill_grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    finally:
        # The child was the group leader (new session): anything it left behind dies with it.
        _signal_group(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            proc.wait()
    return Finished(proc.returncode, timed_out, round(time.monotonic() - start, 3))


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pgid, sig)
