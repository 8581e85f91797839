"""The request's checkout: a repository of its own, sharing nothing with the runner's mirror.

A worktree of the mirror would give the command a `.git` file pointing into the mirror: its config,
its hooks, every ref. Instead each request gets a fresh repository that fetched just its commit
(shallow) from the mirror and forgot where from: no remote, no FETCH_HEAD, no shared hooks. Git LFS
content is pulled from the bus, then any pointer file left behind fails the run fast (a reused
workspace can keep pointers, and torch.load then dies far from the cause).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bridge import gitbus
from bridge.gitbus import GitError

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
_LFS_REMOTE = "bus"


def materialize(mirror: Path, sha: str, dest: Path, remote: str) -> str | None:
    """Check `sha` out into a new repository at `dest`; returns why it cannot run, or None."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    gitbus.git(dest, "init", "--quiet")
    gitbus.git(dest, "fetch", "--quiet", "--no-tags", "--depth=1", str(mirror), sha)
    gitbus.git(dest, "checkout", "--quiet", "--detach", sha, env={"GIT_LFS_SKIP_SMUDGE": "1"})
    (dest / ".git" / "FETCH_HEAD").unlink(missing_ok=True)
    return _lfs_problem(dest, remote)


def _lfs_problem(checkout: Path, remote: str) -> str | None:
    """Pull Git LFS content from the bus, then refuse to run on any pointer file left behind."""
    small = _small_files(checkout)
    if any(p.name == ".gitattributes" and b"filter=lfs" in _head(p, 1 << 16) for p in small):
        if shutil.which("git-lfs") is None:
            return "the request uses Git LFS but git-lfs is not installed on this runner"
        try:
            gitbus.git(checkout, "-c", f"remote.{_LFS_REMOTE}.url={remote}", "lfs", "pull",
                       _LFS_REMOTE, network=True)
        except GitError as exc:
            return f"git lfs pull failed: {exc}"
        small = _small_files(checkout)
    pointers = [p.relative_to(checkout).as_posix() for p in small
                if _head(p, len(LFS_POINTER)) == LFS_POINTER]
    if pointers:
        return "Git LFS pointer files were not materialized: " + ", ".join(sorted(pointers)[:5])
    return None


def _small_files(root: Path) -> list[Path]:
    """Regular files under 64 KiB outside .git, found without recursion (a request's tree may be
    deeper than Python's recursion limit); symlinks are never followed."""
    found, stack = [], [root]
    while stack:
        with os.scandir(stack.pop()) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False) and entry.name != ".git":
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False) and \
                        entry.stat(follow_symlinks=False).st_size < 1 << 16:
                    found.append(Path(entry.path))
    return found


def _head(path: Path, n: int) -> bytes:
    with path.open("rb") as f:
        return f.read(n)
