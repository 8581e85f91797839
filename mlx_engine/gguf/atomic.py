"""Replace a directory atomically: write it aside, then swap it in with renames.

A reader of the cache never sees a half-written model, and a writer killed outright (SIGKILL,
power loss) leaves only hidden siblings that the next writer sweeps away.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sibling(out_dir: Path, kind: str) -> Path:
    """A fresh hidden path next to `out_dir` (same filesystem, so renames are atomic), named with
    our pid so `sweep_stale` can tell a dead writer's leftovers from a live one's."""
    return out_dir.parent / f".{out_dir.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` to `out_dir`, moving an older `out_dir` aside first.

    Replacing is two renames: for a moment there is no `out_dir`, never a partial one.
    """
    old = None
    if out_dir.exists():
        old = sibling(out_dir, "old")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old is not None and not out_dir.exists():
            os.rename(old, out_dir)
        raise
    fsync(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sweep_stale(out_dir: Path) -> None:
    """Delete the leftovers of writers killed outright.

    Their names carry the writer's pid, so a live concurrent writer's are left alone.
    """
    stale = re.compile(rf"\.{re.escape(out_dir.name)}\.(?:partial|old)-(\d+)-")
    for path in out_dir.parent.iterdir():
        match = stale.match(path.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
