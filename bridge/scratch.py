"""The directories one run uses, apart from everything else the runner keeps.

`checkout` (the request's code, written by the runner), `out` (the preset's `{out}`), `tmp`
(`TMPDIR`) and `home` (`HOME` for a sandbox user) are the command's; `logs` receives its stdout and
stderr and is the runner's alone. The root is traversable but not listable, so a sandbox user can
reach its own run and nothing else. Nothing here is published directly: `bridge.collect` copies
what may be.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bridge.sandbox import Sandbox


class Scratch:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.checkout, self.out, self.tmp, self.home, self.logs = (
            root / part for part in ("checkout", "out", "tmp", "home", "logs"))

    @classmethod
    def create(cls, root: Path, sandbox: Sandbox | None) -> Scratch:
        scratch = cls(root)
        scratch.remove(sandbox)
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(mode=0o711)
        root.chmod(0o711)  # mkdir's mode is masked by the umask
        scratch.logs.mkdir(mode=0o700)
        for own in (scratch.out, scratch.tmp, scratch.home):
            own.mkdir(mode=0o700)
            if sandbox is not None:
                sandbox.give(own)
        return scratch

    def remove(self, sandbox: Sandbox | None) -> None:
        """`rm -rf`, which walks without recursion: the command may have left a tree deeper than
        Python's recursion limit (shutil.rmtree would fail on it)."""
        if self.root.is_symlink():
            self.root.unlink()
            return
        if sandbox is not None:
            sandbox.remove_own(self.root)
        subprocess.run(["/bin/rm", "-rf", "--", str(self.root)], capture_output=True, check=False)
