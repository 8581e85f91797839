"""Deliver a result: the result commit and the seal that vouches for it, in one atomic push.

The push swaps the claim ref from the value the runner expects (its own claim, a dead runner's
expired claim, a forged one, or nothing) to the seal, and the result ref to the result commit. If
another runner settled the request first, ours is dropped (the run directory keeps it); if the
push fails for any other reason (network, a rejecting hook) it is retried, a few times at once and
then on every later pass, until it lands: the ledger keeps it across restarts.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bridge import busview, gitbus, seal
from bridge.gitbus import BRIDGE_IDENTITY, GitError, Update
from bridge.ledger import Debt

RESULTS_NS = "refs/kakeya-mac/results/"  # mirror refs keeping undelivered result commits alive
RETRY_S = (0.5, 2.0, 8.0)


@dataclass(frozen=True)
class Link:
    """A runner's connection to the bus: its mirror, the remote, the key, its name."""

    mirror: Path
    remote: str
    key: bytes
    runner: str

    def sign(self, claim: seal.Claim) -> str:
        """A claim or seal as a commit in the mirror (empty tree, bridge identity)."""
        return gitbus.commit(self.mirror, gitbus.empty_tree(self.mirror),
                             seal.message(claim, self.key), env=BRIDGE_IDENTITY)


def result_commit(link: Link, request_id: str, run_dir: Path, skip: set[Path]) -> str:
    """The run directory as an orphan commit, kept alive by a private ref until delivered."""
    tree = gitbus.tree_from_dir(link.mirror, run_dir, frozenset(skip))
    sha = gitbus.commit(link.mirror, tree, f"mac-bridge result {request_id}",
                        env=BRIDGE_IDENTITY)
    gitbus.git(link.mirror, "update-ref", RESULTS_NS + request_id, sha)
    return sha


def deliver(link: Link, debt: Debt) -> bool | None:
    """True when the result landed (now or earlier), False when another runner settled the
    request, None when every attempt failed (try again on a later pass)."""
    for wait_s in (0.0, *RETRY_S):
        time.sleep(wait_s)
        try:
            landed = _attempt(link, debt)
        except GitError as exc:
            print(f"{debt.request_id}: result push failed: {exc}", file=sys.stderr)
            continue
        if landed is not None:
            if landed:
                gitbus.git(link.mirror, "update-ref", "-d", RESULTS_NS + debt.request_id)
            return landed
    return None


def _attempt(link: Link, debt: Debt) -> bool | None:
    """One compare-and-swap push; None when a ref moved under us to something not genuine."""
    assert debt.result is not None
    claim_ref, result_ref = gitbus.claim_ref(debt.request_id), gitbus.result_ref(debt.request_id)
    now = gitbus.remote_shas(link.mirror, link.remote, [claim_ref, result_ref])
    current = now.get(claim_ref)
    if current is not None and current != debt.replaces:
        other = busview.read_claim(link.mirror, link.remote, link.key, debt.request_id, current)
        if other is not None:
            return other.result == debt.result
    stamp = seal.Claim(debt.request_id, debt.request_sha, link.runner, 0.0, result=debt.result)
    updates = [Update(claim_ref, link.sign(stamp), current),
               Update(result_ref, debt.result, now.get(result_ref))]
    return True if gitbus.push(link.mirror, link.remote, updates) else None
