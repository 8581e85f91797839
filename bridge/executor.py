"""The trusted executor, `python -m bridge.executor`: the one entry point of workflow and serve.

Presets, validation and the gate come from the code running here (the default branch, or the
installed package); the request commit contributes only data (its manifest) and the engine code that
the preset's argv runs by design. One pass claims and runs every pending request and publishes each
result to a create-only `mac-bridge-results/<id>` ref.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from bridge import gitbus, manifest, process, report
from bridge.gate import judge
from bridge.gitbus import HEADS, GitError
from bridge.presets import Preset, default_presets_dir, load_presets
from bridge.safety import Rejected
from bridge.selftest import host_info
from mlx_engine.errors import cli_entry

PROTECTED = ("bridge/", "presets/", ".github/")
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
BUDGET_MARGIN_S = 60.0


@dataclass(frozen=True)
class Config:
    remote: str
    work: Path
    presets_dir: Path = field(default_factory=default_presets_dir)
    default_branch: str | None = None
    runner_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    kill_grace_s: float = 10.0
    budget_s: float | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass
class Ticket:
    """One request on its way through: what we know so far, and the summary it will publish."""

    request_id: str
    sha: str
    summary: dict[str, Any]
    request: manifest.Request | None = None  # None once rejected


@cache
def executor_sha() -> str | None:
    """The commit of the code running now, when it runs from a git checkout."""
    try:
        return gitbus.git(Path(__file__).resolve().parent, "rev-parse", "HEAD")
    except (GitError, OSError):
        return None


def drain(cfg: Config) -> list[dict[str, Any]]:
    """Claim and run every pending request, re-listing until none is left; return the summaries
    this runner published."""
    presets = load_presets(cfg.presets_dir)
    remote = _absolute_remote(cfg.remote)
    mirror = _mirror(cfg.work, remote)
    default = cfg.default_branch or _default_branch(mirror, remote)
    deadline = None if cfg.budget_s is None else time.monotonic() + cfg.budget_s
    summaries: list[dict[str, Any]] = []
    seen: set[str] = set()
    while True:
        state = gitbus.bus_state(mirror, remote)
        branches = {i: state.requests[i][0] for i in state.pending() if i not in seen}
        if not branches:
            return summaries
        gitbus.fetch(mirror, remote, [HEADS + default, *(HEADS + b for b in branches.values())])
        for request_id, branch in branches.items():
            seen.add(request_id)
            ticket = admit(cfg, mirror, presets, HEADS + default, request_id, branch)
            # A rejection runs nothing, so the create-only result ref alone settles who
            # publishes it; a run needs its claim first.
            if ticket.request is not None:
                need = ticket.request.preset.timeout_s + BUDGET_MARGIN_S
                if deadline is not None and time.monotonic() + need > deadline:
                    print(f"{request_id}: left pending (not enough budget left)", file=sys.stderr)
                    continue
                if not gitbus.claim(mirror, remote, request_id, f"runner: {cfg.runner_id}"):
                    continue
            run_dir, too_large = execute(cfg, mirror, ticket)
            if gitbus.publish(mirror, remote, request_id, run_dir, too_large):
                print(f"{request_id}: {ticket.summary['status']}")
                summaries.append(ticket.summary)
            else:
                print(f"{request_id}: a result already exists; ours stays in {run_dir}",
                      file=sys.stderr)


def admit(cfg: Config, mirror: Path, presets: Mapping[str, Preset], trusted: str,
          request_id: str, branch: str) -> Ticket:
    """Read the manifest as data and decide whether the request may run; run nothing."""
    sha = gitbus.git(mirror, "rev-parse", "--verify", f"{HEADS}{branch}^{{commit}}")
    summary = report.new_summary(request_id, gitbus.preset_of(request_id), cfg.runner_id,
                                 executor_sha(), host_info())
    summary["request_sha"] = sha
    ticket = Ticket(request_id, sha, summary)
    try:
        ticket.request = _validated(mirror, presets, trusted, request_id, sha)
    except Rejected as exc:
        summary.update(status="rejected", gate={"passed": False, "reasons": exc.reasons})
        return ticket
    req = ticket.request
    summary.update(preset=req.preset.name, params=req.params, requester=req.requester,
                   base_sha=req.base_sha)
    return ticket


def _validated(mirror: Path, presets: Mapping[str, Preset], trusted: str, request_id: str,
               sha: str) -> manifest.Request:
    size = gitbus.blob_size(mirror, sha, manifest.MANIFEST_PATH)
    if size is None:
        raise Rejected([f"the request commit has no {manifest.MANIFEST_PATH}"])
    manifest.check_size(size)
    request = manifest.load_request(gitbus.read_blob(mirror, sha, manifest.MANIFEST_PATH), presets)
    if request.request_id != request_id:
        raise Rejected([f"request_id {request.request_id!r} does not match its branch"])
    parent = gitbus.git(mirror, "rev-parse", f"{sha}^@").splitlines()
    if parent != [request.base_sha]:
        raise Rejected(["base_sha: the request commit must have base_sha as its only parent"])
    if gitbus.changed_paths(mirror, request.base_sha, sha) != [manifest.MANIFEST_PATH]:
        raise Rejected([f"the request commit may only add {manifest.MANIFEST_PATH}"])
    try:
        fork = gitbus.git(mirror, "merge-base", trusted, sha)
    except GitError:
        raise Rejected([f"the request shares no history with {trusted}"]) from None
    if touched := [p for p in gitbus.changed_paths(mirror, fork, sha) if p.startswith(PROTECTED)]:
        raise Rejected([f"the request changes protected paths ({', '.join(PROTECTED)}): "
                        + ", ".join(touched[:5])])
    return request


def execute(cfg: Config, mirror: Path, ticket: Ticket) -> tuple[Path, set[Path]]:
    """Run an accepted ticket in a fresh checkout of its commit; always leave a finished run dir."""
    run_dir, log = _fresh_run_dir(cfg.work / "runs" / ticket.request_id)
    summary = ticket.summary
    secrets: dict[str, str] = {}
    if ticket.request is None:
        log(f"rejected: {'; '.join(summary['gate']['reasons'])}")
        return run_dir, report.finalize(run_dir, summary, secrets)
    req = ticket.request
    log(f"request {req.request_id} at {ticket.sha} by {req.requester}: preset {req.preset.name}"
        f" with {req.params}")
    checkout = cfg.work / "checkouts" / ticket.request_id
    try:
        _checkout(mirror, ticket.sha, checkout)
        if problem := _lfs_problem(checkout):
            summary.update(status="error", gate={"passed": False, "reasons": [problem]})
        else:
            secrets = run_preset(req.preset, req.params, req.request_id, checkout, run_dir,
                                 cfg.environ, cfg.kill_grace_s, summary, log)
    except Exception as exc:  # an executor fault must still publish a result, never lose one
        summary.update(status="error")
        summary["gate"]["reasons"].append(f"executor error: {type(exc).__name__}: {exc}")
    finally:
        _remove_checkout(mirror, checkout)
    log(f"status {summary['status']}")
    return run_dir, report.finalize(run_dir, summary, secrets)


def run_preset(preset: Preset, params: Mapping[str, Any], request_id: str, checkout: Path,
               run_dir: Path, environ: Mapping[str, str], kill_grace_s: float,
               summary: dict[str, Any], log: Callable[[str], None]) -> dict[str, str]:
    """The core shared with `kakeya_mac local`: run the argv in `checkout`, judge, fill `summary`.

    Returns the resolved placeholder values, for redaction from the logs.
    """
    out = run_dir / "artifacts"
    out.mkdir()
    command = preset.command(params, out, request_id, environ)
    # `python` means this interpreter (the trusted venv's); the code it imports is the checkout's.
    argv = [sys.executable, *command.argv[1:]]
    summary.update(argv=command.shown, started_at=report.utc_now())
    log(f"run {' '.join(command.shown)} (timeout {preset.timeout_s}s)")
    with tempfile.TemporaryDirectory(prefix="kakeya-mac-") as tmp:
        done = process.run(argv, checkout, process.child_env(environ, checkout, Path(tmp)),
                           run_dir / "logs" / "stdout.log", run_dir / "logs" / "stderr.log",
                           preset.timeout_s, kill_grace_s)
    verdict = judge(preset, params, out, done.exit_code, done.timed_out)
    summary.update(
        status="passed" if verdict.passed else "failed",
        ended_at=report.utc_now(), duration_s=done.duration_s, exit_code=done.exit_code,
        timed_out=done.timed_out, gate={"passed": verdict.passed, "reasons": verdict.reasons},
        aggregate=report.aggregate_of(verdict.evidence),
    )
    log(f"exit {done.exit_code} after {done.duration_s}s; gate "
        + ("passed" if verdict.passed else "; ".join(verdict.reasons)))
    return command.secrets


def run_local(repo: Path, preset: Preset, params: Mapping[str, Any], out: Path | None,
              kill_grace_s: float = 10.0) -> dict[str, Any]:
    """Run a preset on this working tree, no bus: setup_mac.sh's first check and a debugging aid."""
    request_id = gitbus.new_request_id(preset.name)
    run_dir, log = _fresh_run_dir(out or repo / "runs" / "bridge" / request_id)
    summary = report.new_summary(request_id, preset.name, f"local:{socket.gethostname()}",
                                 executor_sha(), host_info())
    summary["params"] = dict(params)
    secrets = run_preset(preset, params, request_id, repo, run_dir, os.environ, kill_grace_s,
                         summary, log)
    report.finalize(run_dir, summary, secrets)
    return summary


def _checkout(mirror: Path, sha: str, checkout: Path) -> None:
    """A fresh detached worktree: no state from an earlier job can leak in (seed 004)."""
    _remove_checkout(mirror, checkout)
    checkout.parent.mkdir(parents=True, exist_ok=True)
    gitbus.git(mirror, "worktree", "add", "--detach", "--force", str(checkout), sha,
               env={"GIT_LFS_SKIP_SMUDGE": "1"})


def _remove_checkout(mirror: Path, checkout: Path) -> None:
    shutil.rmtree(checkout, ignore_errors=True)
    gitbus.git(mirror, "worktree", "prune")


def _lfs_problem(checkout: Path) -> str | None:
    """Pull Git LFS content, then refuse to run on any pointer file left behind.

    Seed 004: a reused workspace kept pointer files that git did not re-smudge, and torch.load died
    on them far from the cause. A fresh worktree plus this scan fails fast with the file named.
    """
    if _uses_lfs(checkout):
        if shutil.which("git-lfs") is None:
            return "the request uses Git LFS but git-lfs is not installed on this runner"
        try:
            gitbus.git(checkout, "lfs", "pull")
        except GitError as exc:
            return f"git lfs pull failed: {exc}"
    pointers = [p.relative_to(checkout).as_posix() for p in _small_files(checkout)
                if _head(p, len(LFS_POINTER)) == LFS_POINTER]
    if pointers:
        return "Git LFS pointer files were not materialized: " + ", ".join(sorted(pointers)[:5])
    return None


def _uses_lfs(checkout: Path) -> bool:
    return any(p.name == ".gitattributes" and b"filter=lfs" in _head(p, 1 << 16)
               for p in _small_files(checkout))


def _small_files(root: Path) -> list[Path]:
    """Regular files under 64 KiB outside .git; symlinks (request-controlled) are never followed."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in files:
            info = (path := Path(dirpath) / name).lstat()
            if stat.S_ISREG(info.st_mode) and info.st_size < 1 << 16:
                found.append(path)
    return found


def _head(path: Path, n: int) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def _fresh_run_dir(run_dir: Path) -> tuple[Path, Callable[[str], None]]:
    """An empty run directory with logs/, and the executor log that writes into it."""
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "logs").mkdir(parents=True)
    return run_dir, _logger(run_dir / "logs" / "executor.log")


def _logger(path: Path) -> Callable[[str], None]:
    def log(message: str) -> None:
        line = f"{report.utc_now()} {message}"
        print(line, file=sys.stderr)
        with path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    return log


def _absolute_remote(remote: str) -> str:
    """A local path is made absolute: git runs it from inside the mirror."""
    return str(Path(remote).resolve()) if Path(remote).exists() else remote


def _mirror(work: Path, remote: str) -> Path:
    """The runner's bare mirror; `origin` is set for git-lfs, which needs a named remote."""
    mirror = work / "mirror.git"
    if not (mirror / "HEAD").is_file():
        mirror.mkdir(parents=True, exist_ok=True)
        gitbus.git(mirror, "init", "--bare", "--quiet")
    gitbus.git(mirror, "config", "remote.origin.url", remote)
    return mirror


def _default_branch(mirror: Path, remote: str) -> str:
    out = gitbus.git(mirror, "ls-remote", "--symref", remote, "HEAD")
    for line in out.splitlines():
        if line.startswith("ref: ") and line.endswith("\tHEAD"):
            return line[len("ref: "):-len("\tHEAD")].removeprefix(HEADS)
    raise GitError(f"cannot tell the default branch of {remote}; pass --default-branch")


def add_runner_options(parser: argparse.ArgumentParser) -> None:
    """The options `python -m bridge.executor` and `kakeya_mac serve` share."""
    parser.add_argument("--remote", required=True, help="git remote URL or path (the bus)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kakeya-mac",
                        help="mirror, checkouts and run directories (default ~/.cache/kakeya-mac)")
    parser.add_argument("--presets-dir", type=Path, default=default_presets_dir())
    parser.add_argument("--default-branch", help="trusted branch (default: the remote's HEAD)")
    parser.add_argument("--runner-id", default=f"{socket.gethostname()}:{os.getpid()}")
    parser.add_argument("--budget-s", type=float,
                        help="leave requests pending that cannot finish within this many seconds")
    parser.add_argument("--kill-grace-s", type=float, default=10.0,
                        help="SIGTERM-to-SIGKILL delay after a timeout")


def config_from(args: argparse.Namespace) -> Config:
    return Config(remote=args.remote, work=args.work, presets_dir=args.presets_dir,
                  default_branch=args.default_branch, runner_id=args.runner_id,
                  kill_grace_s=args.kill_grace_s, budget_s=args.budget_s)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.executor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runner_options(parser)
    drain(config_from(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
