"""`python -m bridge.supervise`: run one preset command and leave no process of it behind.

The executor starts this in a session of its own with an environment holding no credential,
writes the job as one JSON line to its stdin and keeps stdin open. The supervisor starts the
command (argv list, no shell, new session, stdin closed, output to the log files, rlimits, as the
sandbox user when there is one) and waits. On timeout the whole tree gets SIGTERM, then SIGKILL
after the grace period; after any exit every remaining descendant is killed. End of file on stdin
means the executor died: the tree is killed at once, so a SIGKILLed runner leaves nothing running.
The outcome goes to stdout as one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bridge import linux, reaper
from bridge.sandbox import Sandbox, apply_limits, limits

POLL_S = 0.1


@dataclass(frozen=True)
class Job:
    argv: list[str]
    cwd: str
    env: dict[str, str]
    stdout: str
    stderr: str
    timeout_s: float
    kill_grace_s: float
    sandbox: dict[str, object] | None = None  # Sandbox fields
    pids_file: str | None = None


@dataclass
class Outcome:
    exit_code: int | None  # negative: killed by that signal
    timed_out: bool = False
    duration_s: float = 0.0


def supervise(job: Job, lifeline: int) -> Outcome:
    """Run the job's command to its end (or timeout, or the executor's death), then kill every
    process it left."""
    linux.become_subreaper()
    sandbox = Sandbox(**job.sandbox) if job.sandbox else None  # type: ignore[arg-type]
    tracker = reaper.Tracker(Path(job.pids_file) if job.pids_file else None)
    argv, env, kwargs = (sandbox.command(job.argv, job.env) if sandbox
                         else (job.argv, job.env, {}))
    chosen = limits(job.timeout_s, sandbox is not None)
    start = time.monotonic()
    with open(job.stdout, "wb") as out, open(job.stderr, "wb") as err:
        proc = subprocess.Popen(argv, cwd=job.cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True,
                                preexec_fn=lambda: apply_limits(chosen), **kwargs)
    outcome = Outcome(None)
    kill_at = None
    while not _exited(proc):
        tracker.scan()
        now = time.monotonic()
        if _executor_gone(lifeline):  # nobody to report to: just leave nothing behind
            break
        if kill_at is None and now - start > job.timeout_s:
            outcome.timed_out = True
            kill_at = now + job.kill_grace_s
            tracker.signal_all(signal.SIGTERM)
        if kill_at is not None and now > kill_at:
            break
    tracker.kill_all(keep_unreaped=proc.pid)
    if sandbox is not None:
        sandbox.kill_all()
    outcome.exit_code = proc.wait()
    outcome.duration_s = round(time.monotonic() - start, 3)
    return outcome


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Wait up to one poll interval for the command (returns at once when it exits)."""
    try:
        proc.wait(timeout=POLL_S)
    except subprocess.TimeoutExpired:
        return False
    return True


def _executor_gone(lifeline: int) -> bool:
    """The executor never writes after the job line: readable stdin means end of file."""
    readable, _, _ = select.select([lifeline], [], [], 0)
    return bool(readable) and os.read(lifeline, 1) == b""


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the executor's to act on
    job = Job(**json.loads(sys.stdin.buffer.readline()))
    outcome = supervise(job, sys.stdin.fileno())
    with contextlib.suppress(BrokenPipeError):  # the executor may be gone
        print(json.dumps(asdict(outcome)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
