"""Find and kill every process a preset command started, including ones that left its session.

A process group kill misses descendants that called `setsid`/`setpgid`, and a daemon that forked
twice is no longer anyone's descendant. On Linux the supervisor is a child subreaper, so such
orphans are re-parented to it and its children always cover the whole tree. On macOS the
supervisor also remembers every descendant it has seen (pid + start time, checked before a kill),
and a sandbox user closes the rest of the gap: all its processes are killed by uid.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterable
from pathlib import Path

import psutil

_MAX_ROUNDS = 50


class Tracker:
    """The descendants of this process seen so far, recorded in `pids_file` for a restart."""

    def __init__(self, pids_file: Path | None) -> None:
        self.me = psutil.Process()
        self.seen: dict[int, float] = {}
        self.pids_file = pids_file

    def scan(self) -> list[psutil.Process]:
        found = self.me.children(recursive=True)
        fresh = {p.pid: _started(p) for p in found if p.pid not in self.seen}
        if fresh:
            self.seen.update(fresh)
            if self.pids_file is not None:
                self.pids_file.write_text(json.dumps(self.seen), "utf-8")
        return found + [p for p in alive(self.seen.items()) if p not in found]

    def signal_all(self, sig: signal.Signals) -> None:
        for proc in self.scan():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)

    def kill_all(self, keep_unreaped: int) -> None:
        """Freeze every process found (so none can fork behind our back), look again until no
        new one appears, then SIGKILL them all and reap our own children except `keep_unreaped`
        (the command itself, whose exit status its Popen collects)."""
        frozen: dict[int, psutil.Process] = {}
        for _ in range(_MAX_ROUNDS):
            fresh = [p for p in self.scan() if p.pid not in frozen]
            if not fresh:
                break
            for proc in fresh:
                frozen[proc.pid] = proc
                with contextlib.suppress(psutil.Error):
                    proc.suspend()
        for proc in frozen.values():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        children = [p for p in frozen.values() if p.pid != keep_unreaped and _is_child(p)]
        psutil.wait_procs(children, timeout=10)


def kill_recorded(pids_file: Path) -> None:
    """Kill what a dead supervisor had recorded (only processes with the recorded start time)."""
    try:
        seen = json.loads(pids_file.read_text("utf-8"))
    except (OSError, ValueError):
        return
    for proc in alive((int(pid), started) for pid, started in seen.items()):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def alive(recorded: Iterable[tuple[int, float]]) -> list[psutil.Process]:
    """The recorded processes still running (a reused pid has another start time)."""
    procs = []
    for pid, started in recorded:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if _started(proc) == started and proc.status() != psutil.STATUS_ZOMBIE:
                procs.append(proc)
    return procs


def _started(proc: psutil.Process) -> float:
    try:
        return proc.create_time()
    except psutil.Error:
        return 0.0


def _is_child(proc: psutil.Process) -> bool:
    try:
        return proc.ppid() == psutil.Process().pid
    except psutil.Error:
        return False
