"""One run of a preset: its command under the supervisor, safe copies of what it wrote, the
verdict, and the result directory (summary.json, README.md, logs, artifacts). Shared by the
executor and `kakeya_mac local`."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

from bridge import collect, gitbus, process, report
from bridge.gate import judge
from bridge.gitbus import GitError
from bridge.presets import Preset
from bridge.sandbox import Sandbox
from bridge.scratch import Scratch
from bridge.selftest import host_info
from bridge.supervise import Job


@cache
def executor_sha() -> str | None:
    """The commit of the code running now, when it runs from a git checkout."""
    try:
        return gitbus.git(Path(__file__).resolve().parent, "rev-parse", "HEAD")
    except (GitError, OSError):
        return None


@dataclass(frozen=True)
class Runtime:
    """How preset commands run here: whose environment they draw on, as whom, with which
    interpreter (`python` in a preset; a sandbox user must be able to run it)."""

    environ: Mapping[str, str]
    kill_grace_s: float = 10.0
    sandbox: Sandbox | None = None
    python: str = sys.executable


class Log:
    """The executor log of one request: echoed to stderr, written into the result at the end
    (the result directory is only created once the command and all its processes are gone)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        line = f"{report.utc_now()} {message}"
        print(line, file=sys.stderr)
        self.lines.append(line)


def run_preset(preset: Preset, params: Mapping[str, Any], request_id: str, code: Path,
               scratch: Scratch, run_dir: Path, runtime: Runtime, summary: dict[str, Any],
               log: Callable[[str], None], pids_file: Path | None = None) -> dict[str, str]:
    """The core shared with `kakeya_mac local`: run the argv on `code`, copy what it wrote into
    `run_dir`, judge, fill `summary`. Returns the resolved placeholder values, for redaction."""
    command = preset.command(params, scratch.out, request_id, runtime.environ)
    # `python` means the trusted interpreter (this venv's); the code it imports is the checkout's.
    argv = [runtime.python, *command.argv[1:]]
    summary.update(argv=command.shown, started_at=report.utc_now())
    log(f"run {' '.join(command.shown)} (timeout {preset.timeout_s}s)")
    sandbox = runtime.sandbox
    env = process.child_env(runtime.environ, code, scratch.tmp, sandbox,
                            scratch.home if sandbox else None)
    job = Job(argv=argv, cwd=str(code), env=env, stdout=str(scratch.logs / "stdout.log"),
              stderr=str(scratch.logs / "stderr.log"), timeout_s=preset.timeout_s,
              kill_grace_s=runtime.kill_grace_s, sandbox=asdict(sandbox) if sandbox else None,
              pids_file=str(pids_file) if pids_file else None)
    done = process.run(job)
    copied = collect.copy_tree(scratch.out, run_dir / "artifacts", "artifacts")
    (run_dir / "logs").mkdir(exist_ok=True)
    for name in ("stdout.log", "stderr.log"):
        collect.copy_file(scratch.logs / name, run_dir / "logs" / name, f"logs/{name}", copied,
                          report.MAX_LOG_BYTES)
    summary["omitted"].update(copied.omitted)
    verdict = judge(preset, params, run_dir / "artifacts", done.exit_code, done.timed_out)
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
    run_dir = fresh_dir(out or repo / "runs" / "bridge" / request_id)
    summary = report.new_summary(request_id, preset.name, f"local:{socket.gethostname()}",
                                 executor_sha(), host_info())
    summary["params"] = dict(params)
    log = Log()
    with tempfile.TemporaryDirectory(prefix="kakeya-mac-") as tmp:
        scratch = Scratch.create(Path(tmp) / "run", None)
        secrets = run_preset(preset, params, request_id, repo, scratch, run_dir,
                             Runtime(os.environ, kill_grace_s), summary, log)
    finish_run_dir(run_dir, summary, secrets, log)
    return summary


def record_fault(summary: dict[str, Any], exc: Exception) -> None:
    """An executor fault is the request's `error` result, with the fault as its reason."""
    summary.update(status="error")
    summary["gate"]["passed"] = False
    summary["gate"]["reasons"].append(f"executor error: {type(exc).__name__}: {exc}")


def finish_run_dir(run_dir: Path, summary: dict[str, Any], secrets: Mapping[str, str],
                    log: Log) -> set[Path]:
    """Write the executor log kept in memory, then summary.json and README.md; returns the
    files too large to commit."""
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "logs" / "executor.log").write_text("".join(f"{line}\n" for line in log.lines),
                                                   "utf-8")
    return report.finalize(run_dir, summary, secrets)


def fresh_dir(path: Path) -> Path:
    """An empty directory at `path` (a symlink left there is removed, never followed)."""
    if path.is_symlink():
        path.unlink()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    return path
