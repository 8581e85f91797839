"""`kakeya_mac serve`: a runner for any git remote, no GitHub needed.

Each poll is one executor pass (the code the workflow runs), so serve and the workflow can share one
remote: create-only claim refs decide which of them runs each request.
"""

from __future__ import annotations

import sys
import time

from bridge.executor import Config, drain
from bridge.gitbus import GitError


def serve(cfg: Config, once: bool, poll_s: float) -> int:
    while True:
        try:
            drain(cfg)
        except GitError as exc:
            if once:
                raise
            print(f"poll failed, retrying in {poll_s}s: {exc}", file=sys.stderr)
        if once:
            return 0
        time.sleep(poll_s)
