"""The runner's view of the bus: every request id with its branches, its verified claim and its
result, and what a runner should do about it.

Only what the bridge key signed counts: a claim ref that does not verify is treated as absent (a
runner replaces it), and a result counts only when a seal names exactly that result commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bridge import gitbus, seal
from bridge.seal import Claim

CLAIMS_NS = "refs/kakeya-mac/claims/"  # private mirror refs: the claim commits, fetched to verify


@dataclass
class Entry:
    request_id: str
    branches: list[tuple[str, str]] = field(default_factory=list)  # (branch, sha)
    claim_sha: str | None = None  # what the claim ref holds now, verified or not
    claim: Claim | None = None  # the verified claim or seal, None when absent or forged
    result_sha: str | None = None
    unread: bool = False  # the claim commit could not be fetched this time

    @property
    def state(self) -> str:
        """pending / ambiguous (id on several branches) / running / expired (lease over, no
        result) / done / tampered (sealed, result ref gone or replaced) / orphan / unread."""
        if self.unread:
            return "unread"
        if self.claim is not None and self.claim.sealed:
            return "done" if self.result_sha == self.claim.result else "tampered"
        if self.claim is not None:
            return "expired" if self.claim.expired() else "running"
        if not self.branches:
            return "orphan"
        return "ambiguous" if len(self.branches) > 1 else "pending"


def read(mirror: Path, remote: str, key: bytes) -> dict[str, Entry]:
    """List the bus, fetch the claim commits not seen before, and verify each claim."""
    state = gitbus.bus_state(mirror, remote)
    entries: dict[str, Entry] = {}

    def entry(request_id: str) -> Entry:
        return entries.setdefault(request_id, Entry(request_id))

    for request_id, branches in state.requests.items():
        entry(request_id).branches = branches
    for request_id, sha in state.results.items():
        entry(request_id).result_sha = sha
    for request_id, sha in state.claims.items():
        entry(request_id).claim_sha = sha
    claimed = {e.claim_sha: e for e in entries.values() if e.claim_sha}
    missing = [s for s in claimed if s not in gitbus.commit_messages(mirror, claimed)]
    gitbus.fetch(mirror, remote, [f"+{gitbus.claim_ref(claimed[s].request_id)}:"
                                  f"{CLAIMS_NS}{claimed[s].request_id}" for s in missing])
    messages = gitbus.commit_messages(mirror, claimed)
    for sha, e in claimed.items():
        if sha in messages:
            e.claim = _verified(messages[sha], key, e.request_id)
        else:
            e.unread = True
    return entries


def read_claim(repo: Path, remote: str, key: bytes, request_id: str, sha: str) -> Claim | None:
    """The verified claim or seal at `sha` on `request_id`'s claim ref (fetched when needed)."""
    if sha not in gitbus.commit_messages(repo, [sha]):
        gitbus.fetch(repo, remote, [f"+{gitbus.claim_ref(request_id)}:{CLAIMS_NS}{request_id}"])
    text = gitbus.commit_messages(repo, [sha]).get(sha)
    return None if text is None else _verified(text, key, request_id)


def _verified(text: str, key: bytes, request_id: str) -> Claim | None:
    claim = seal.verify(text, key)
    return claim if claim is not None and claim.request_id == request_id else None
