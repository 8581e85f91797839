"""Run one preset command through the supervisor (`bridge.supervise`): argv list, no shell, a
scrubbed environment, a timeout, and no process of it left alive afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from bridge.sandbox import Sandbox
from bridge.supervise import Job, Outcome

# Passed through from the runner; everything else (tokens, GIT_*, BASH_ENV, PYTHON*, DYLD_*,
# LD_PRELOAD, the bridge key, ...) is dropped.
PASSTHROUGH = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ",
               "HF_HOME", "XDG_CACHE_HOME", "KAKEYA_CACHE_DIR")
TRUSTED_ROOT = Path(__file__).resolve().parent.parent  # where `-m bridge.supervise` is imported


def child_env(environ: Mapping[str, str], checkout: Path, tmp: Path,
              sandbox: Sandbox | None = None, home: Path | None = None) -> dict[str, str]:
    """Only what the command needs; the request commit's code is found through PYTHONPATH.

    As a sandbox user the command gets its own HOME and names, and git may read the checkout
    the runner wrote for it (safe.directory; the engine records the checkout's commit)."""
    env = {k: environ[k] for k in PASSTHROUGH if k in environ}
    env.update(
        PYTHONPATH=str(checkout),
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TMPDIR=str(tmp),
    )
    if sandbox is not None and home is not None:
        env.update(HOME=str(home), USER=sandbox.name, LOGNAME=sandbox.name,
                   GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="safe.directory",
                   GIT_CONFIG_VALUE_0=str(checkout))
    return env


def run(job: Job) -> Outcome:
    """Start the supervisor in its own session with no credential in its environment, hand it
    the job, and keep its stdin open as the lifeline until it reports."""
    env = {"PATH": os.environ.get("PATH", os.defpath)}
    with subprocess.Popen([sys.executable, "-m", "bridge.supervise"], cwd=TRUSTED_ROOT, env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          start_new_session=True) as sup:
        assert sup.stdin is not None and sup.stdout is not None
        sup.stdin.write(json.dumps(asdict(job)).encode() + b"\n")
        sup.stdin.flush()
        report = sup.stdout.read()
        sup.wait()
    try:
        return Outcome(**json.loads(report.splitlines()[-1]))
    except (IndexError, ValueError, TypeError):
        raise RuntimeError(f"the supervisor failed (exit {sup.returncode})") from None
