"""Who a preset command runs as, and with which limits.

With a sandbox user (`--sandbox-user`), the command runs as that unprivileged account: it cannot
read the runner's files, its key, its mirror or /proc of the runner's processes, and every process
it leaves behind is found by its uid, `setsid` daemons included. A root runner (Linux CI) switches
user itself; any other runner goes through `sudo -n -u` (setup_mac.sh writes the sudoers rule).
The sandbox user must serve one runner only: cleaning up kills every process it owns.
"""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from mlx_engine.errors import UserError

MAX_PROCESSES = 1024  # per user (threads count on Linux): stops fork bombs
MAX_FILE_BYTES = 16 << 30  # a converted model is a few GB; a runaway writer is stopped


@dataclass(frozen=True)
class Sandbox:
    name: str
    uid: int
    gid: int

    @classmethod
    def resolve(cls, spec: str) -> Sandbox:
        """A user name, or a numeric uid (which needs no account when the runner is root)."""
        try:
            entry = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
            sandbox = cls(entry.pw_name, entry.pw_uid, entry.pw_gid)
        except KeyError:
            if not spec.isdigit():
                raise UserError(f"sandbox user {spec!r} does not exist") from None
            sandbox = cls(spec, int(spec), int(spec))
        if sandbox.uid in (0, os.geteuid()):
            raise UserError(f"sandbox user {spec!r} must be an unprivileged user other than the "
                            "runner's")
        if os.geteuid() != 0 and shutil.which("sudo") is None:
            raise UserError("a sandbox user needs the runner to be root or to have sudo")
        return sandbox

    @property
    def direct(self) -> bool:
        """Root switches user itself; anyone else asks sudo."""
        return os.geteuid() == 0

    def command(self, argv: list[str], env: Mapping[str, str]) -> tuple[list[str], dict[str, str],
                                                                         dict[str, Any]]:
        """argv, environment and Popen arguments that run `argv` as this user with `env`."""
        if self.direct:
            return argv, dict(env), {"user": self.uid, "group": self.gid, "extra_groups": []}
        wrapped = ["sudo", "-n", "-u", f"#{self.uid}", "--", "/usr/bin/env", "-i",
                   *(f"{k}={v}" for k, v in env.items()), *argv]
        return wrapped, {"PATH": os.environ.get("PATH", os.defpath)}, {}

    def processes(self) -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["uids"])
                if p.info["uids"] is not None and p.info["uids"].real == self.uid]

    def kill_all(self) -> None:
        """SIGKILL every process of the sandbox user (kill(-1) as that user), until none is left."""
        for _ in range(20):
            if not self.processes():
                return
            argv, env, kwargs = self.command(["/bin/kill", "-9", "-1"], {})
            subprocess.run(argv, env=env, capture_output=True, timeout=60, check=False, **kwargs)
        raise RuntimeError(f"processes of sandbox user {self.name} survive SIGKILL")

    def give(self, directory: Path) -> None:
        """Let the sandbox user write `directory`: owned by it (root), or open to all (sudo;
        its parent is not listable, so only the executor knows the path)."""
        if self.direct:
            os.chown(directory, self.uid, self.gid)
        else:
            directory.chmod(0o777)

    def remove_own(self, directory: Path) -> None:
        """Delete what the sandbox user wrote under `directory`, as that user (a runner that is
        not root may not delete inside the user's directories)."""
        if not self.direct and directory.exists():
            argv, env, kwargs = self.command(["/bin/rm", "-rf", "--", str(directory)], {})
            subprocess.run(argv, env=env, capture_output=True, timeout=600, check=False, **kwargs)


def limits(timeout_s: float, sandboxed: bool) -> list[tuple[int, int]]:
    """rlimits for a preset command: CPU time bounded by its timeout on every core, no core
    dumps, bounded file size, and (per-uid, so only for a sandbox user) a process count."""
    cpu = int(timeout_s * (os.cpu_count() or 1)) + 60
    chosen = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_CORE, 0),
              (resource.RLIMIT_FSIZE, MAX_FILE_BYTES)]
    if sandboxed:
        chosen.append((resource.RLIMIT_NPROC, MAX_PROCESSES))
    return chosen


def apply_limits(chosen: list[tuple[int, int]]) -> None:
    """Lower each limit in the child before exec (never raise one above its hard limit)."""
    for which, value in chosen:
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value if hard == resource.RLIM_INFINITY else hard))
