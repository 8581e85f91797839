"""`kakeya_mac serve`: a runner for any git remote, no GitHub needed.

Each poll is one executor pass (the code the workflow runs), so serve and the workflow can share one
remote: claims decide which of them runs each request. No fault ends the loop: a pass that fails
is reported and the next poll starts afresh (the ledger keeps what is owed).
"""

from __future__ import annotations

import sys
import time

from bridge.executor import Config, drain
from mlx_engine.errors import UserError


def serve(cfg: Config, once: bool, poll_s: float) -> int:
    while True:
        try:
            drain(cfg)
        except Exception as exc:  # any fault: the runner must keep serving
            if once:
                raise UserError(f"runner pass failed: {exc}") from None
            print(f"poll failed, retrying in {poll_s}s: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
        if once:
            return 0
        time.sleep(poll_s)
