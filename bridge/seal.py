"""Claims and seals: the runner's signed word on the bus, kept on `mac-bridge-claims/<id>`.

A claim commit says which runner took which request commit, and until when (its lease). When the
result is ready, the runner replaces the claim with a seal: the same fields plus the result
commit's sha, pushed atomically with the result ref. Each carries a random nonce (two runners, even
with one runner id, never write the same commit, so only one compare-and-swap can win) and an
HMAC-SHA256 over its fields with the bridge key. Runners and the clients that read results hold
the key; a plain `git push` of a claim or result, and a preset's own code, do not.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlx_engine.errors import UserError

KEY_ENV = "KAKEYA_BRIDGE_KEY"
DEFAULT_KEY_FILE = Path("~/.config/kakeya-mac/bridge.key")
MIN_KEY_BYTES = 16
_DOMAIN = b"kakeya-mac-bridge/claim/v1\0"


@dataclass(frozen=True)
class Claim:
    request_id: str
    request_sha: str | None
    runner: str
    lease_until: float
    result: str | None = None  # set in a seal: the result commit
    note: str = ""
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def sealed(self) -> bool:
        return self.result is not None

    def expired(self) -> bool:
        """An unsealed claim past its lease: its runner died or lost the bus."""
        return not self.sealed and time.time() > self.lease_until


def message(claim: Claim, key: bytes) -> str:
    """The commit message of a claim or seal: subject, canonical JSON fields, their MAC."""
    body = json.dumps(asdict(claim), sort_keys=True, separators=(",", ":"))
    kind = "seal" if claim.sealed else "claim"
    return f"mac-bridge {kind} {claim.request_id}\n\n{body}\nmac: {_mac(key, body)}\n"


def verify(text: str, key: bytes) -> Claim | None:
    """The claim a commit message carries, or None when it is not one signed with `key`."""
    lines = text.strip("\n").split("\n")
    if len(lines) != 4 or not lines[3].startswith("mac: "):
        return None
    if not hmac.compare_digest(lines[3].removeprefix("mac: "), _mac(key, lines[2])):
        return None
    try:  # signed, so written by a key holder; still, a malformed one must not crash a runner
        return Claim(**json.loads(lines[2]))
    except (TypeError, ValueError):
        return None


def _mac(key: bytes, body: str) -> str:
    return hmac.new(key, _DOMAIN + body.encode("utf-8"), hashlib.sha256).hexdigest()


def load_key(environ: Mapping[str, str], path: Path | None = None,
             create: bool = False) -> bytes | None:
    """$KAKEYA_BRIDGE_KEY, else the key file (default ~/.config/kakeya-mac/bridge.key). A runner
    creates a missing file (random, mode 0600); a client only reads. None when there is none."""
    if value := environ.get(KEY_ENV):
        return _checked(value.encode(), KEY_ENV)
    path = (path or DEFAULT_KEY_FILE).expanduser()
    if create and not path.exists():
        _create(path)
    try:
        return _checked(path.read_bytes().strip(), str(path))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(f"cannot read the bridge key {path}: {exc.strerror}") from None


def require_key(environ: Mapping[str, str]) -> bytes:
    """The key a client needs to check that a result was sealed by a runner."""
    if (key := load_key(environ)) is None:
        raise UserError(f"no bridge key to verify results: set {KEY_ENV} or copy the runner's "
                        f"{DEFAULT_KEY_FILE} here")
    return key


def _checked(key: bytes, where: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise UserError(f"the bridge key in {where} is shorter than {MIN_KEY_BYTES} bytes")
    return key


def _create(path: Path) -> None:
    """Write a new key atomically: a runner racing us either links first or reads ours."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
