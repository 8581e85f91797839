"""The runner's own record of what it owes the bus, kept on disk so that a crash loses nothing.

An entry is written when the runner takes a request (its claim, or the claim it replaces) and gets
the result commit once there is one; it is removed when the result has landed or another runner
has provably settled the request. On start a runner finds what its previous process left: an entry
without a result is a run that was cut off, one with a result is a push still to retry.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Debt:
    request_id: str
    request_sha: str | None
    replaces: str | None  # the claim ref value the result's seal replaces (ours, or a dead one's)
    claim: str | None = None  # our claim commit, when we ran the request
    result: str | None = None  # the result commit, once written


class Ledger:
    def __init__(self, work: Path) -> None:
        self.dir = work / "inflight"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def write(self, debt: Debt) -> None:
        tmp = self.dir / f".{debt.request_id}.tmp"
        tmp.write_text(json.dumps(asdict(debt)), "utf-8")
        os.replace(tmp, self._path(debt.request_id))

    def clear(self, request_id: str) -> None:
        self._path(request_id).unlink(missing_ok=True)
        self.pids_file(request_id).unlink(missing_ok=True)

    def debts(self) -> list[Debt]:
        return [Debt(**json.loads(p.read_text("utf-8"))) for p in sorted(self.dir.glob("*.json"))]

    def pids_file(self, request_id: str) -> Path:
        """Where the supervisor of this request's run records the processes it has seen."""
        return self.dir / f"{request_id}.pids"

    def _path(self, request_id: str) -> Path:
        return self.dir / f"{request_id}.json"
