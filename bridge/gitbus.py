"""The git bus: ref namespaces and the plumbing that moves requests, claims and results.

Only plumbing touches repositories (hash-object, mktree, commit-tree, a temporary index), so a
user's worktree, index and current branch never change. Claims and results are create-only refs: a
push with `--force-with-lease=<ref>:` (empty expected value) fails when the ref exists, on the
client and again atomically in the receiving repository, so two runners can never both claim or
publish one request.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mlx_engine.errors import UserError

REQUEST_PREFIXES = ("mac-bridge/", "AgentMemory/mac-bridge-")
CLAIM_PREFIX = "mac-bridge-claims/"
RESULT_PREFIX = "mac-bridge-results/"
HEADS = "refs/heads/"
REQUEST_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}?-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")
BRIDGE_IDENTITY = {
    "GIT_AUTHOR_NAME": "kakeya-mac-bridge",
    "GIT_AUTHOR_EMAIL": "mac-bridge@users.noreply.github.com",
    "GIT_COMMITTER_NAME": "kakeya-mac-bridge",
    "GIT_COMMITTER_EMAIL": "mac-bridge@users.noreply.github.com",
}


class GitError(UserError):
    """A git command failed; the message is its last line of stderr."""


def git_bytes(repo: Path, *args: str, input: bytes | None = None,
              env: Mapping[str, str] | None = None, timeout: float | None = None) -> bytes:
    cmd = ["git", "-C", str(repo), *args]
    try:
        done = subprocess.run(cmd, input=input, capture_output=True, check=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.CalledProcessError as exc:
        lines = exc.stderr.decode("utf-8", "replace").strip().splitlines() or ["(no output)"]
        raise GitError(f"git {args[0]} failed: {lines[-1]}") from None
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]} timed out after {timeout}s") from None
    return done.stdout


def git(repo: Path, *args: str, **kwargs) -> str:
    return git_bytes(repo, *args, **kwargs).decode("utf-8").strip()


def new_request_id(preset: str) -> str:
    """<preset>-<UTC stamp>-<nonce>: sortable by time, unique without coordination."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{preset}-{stamp}-{secrets.token_hex(4)}"


def checked_request_id(text: str) -> str:
    """A request id typed by a user, refused before it becomes part of a ref name."""
    if not REQUEST_ID.fullmatch(text):
        raise UserError(f"{text!r} is not a request id (<preset>-<YYYYmmddTHHMMSSZ>-<8 hex>)")
    return text


def preset_of(request_id: str) -> str:
    return request_id.rsplit("-", 2)[0]


def request_branch(prefix: str, request_id: str, suffix: str) -> str:
    return f"{prefix}{request_id}{suffix}"


def request_id_of(branch: str) -> str | None:
    """The request id inside a request branch name, or None when it is not a request branch."""
    for prefix in REQUEST_PREFIXES:
        if branch.startswith(prefix) and (m := REQUEST_ID.match(branch, len(prefix))):
            return m[0]
    return None


@dataclass
class BusState:
    """What the remote holds, keyed by request id."""

    requests: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (branch, sha)
    claims: dict[str, str] = field(default_factory=dict)
    results: dict[str, str] = field(default_factory=dict)

    def state_of(self, request_id: str) -> str:
        if request_id in self.results:
            return "done"
        if request_id in self.claims:
            return "claimed"
        return "pending" if request_id in self.requests else "unknown"

    def pending(self) -> list[str]:
        """Unclaimed requests, oldest first (the id carries its UTC stamp after the preset)."""
        ids = [i for i in self.requests if self.state_of(i) == "pending"]
        return sorted(ids, key=lambda i: (i.rsplit("-", 2)[1], i))


def bus_state(repo: Path, remote: str, timeout: float | None = None) -> BusState:
    state = BusState()
    out = git(repo, "ls-remote", "--heads", remote, timeout=timeout)
    for line in out.splitlines():
        sha, ref = line.split("\t")
        name = ref.removeprefix(HEADS)
        if name.startswith(CLAIM_PREFIX):
            state.claims[name.removeprefix(CLAIM_PREFIX)] = sha
        elif name.startswith(RESULT_PREFIX):
            state.results[name.removeprefix(RESULT_PREFIX)] = sha
        elif (request_id := request_id_of(name)) and request_id not in state.requests:
            state.requests[request_id] = (name, sha)
    return state


def fetch(repo: Path, remote: str, refs: Iterable[str]) -> None:
    """Mirror remote refs to the same names locally (for a bare runner mirror)."""
    if specs := [f"+{ref}:{ref}" for ref in refs]:
        git(repo, "fetch", "--quiet", "--no-tags", remote, *specs)


def fetch_into(repo: Path, remote: str, ref: str, local: str) -> str:
    """Fetch one remote ref into a private local ref (never a branch) and return its sha."""
    git(repo, "fetch", "--quiet", "--no-tags", remote, f"+{ref}:{local}")
    return git(repo, "rev-parse", "--verify", f"{local}^{{commit}}")


def create_ref(repo: Path, remote: str, sha: str, ref: str) -> bool:
    """Create `ref` on the remote at `sha`; False when it already exists (someone else won)."""
    try:
        git(repo, "push", "--quiet", "--porcelain", f"--force-with-lease={ref}:", remote,
            f"{sha}:{ref}")
        return True
    except GitError:
        # Lost the race, or the push failed: the remote's ref says which (and whether we won
        # after all, with the answer lost on the way back).
        current = remote_sha(repo, remote, ref)
        if current is None:
            raise
        return current == sha


def remote_sha(repo: Path, remote: str, ref: str) -> str | None:
    out = git(repo, "ls-remote", remote, ref)
    return out.split("\t")[0] if out else None


def blob_size(repo: Path, rev: str, path: str) -> int | None:
    """Size of the file at rev:path, or None when there is none (checked before reading it)."""
    try:
        return int(git(repo, "cat-file", "-s", f"{rev}:{path}"))
    except GitError:
        return None


def read_blob(repo: Path, rev: str, path: str) -> bytes:
    return git_bytes(repo, "cat-file", "blob", f"{rev}:{path}")


def empty_tree(repo: Path) -> str:
    return git(repo, "mktree", input=b"")


def commit(repo: Path, tree: str, message: str, parents: Iterable[str] = (),
           env: Mapping[str, str] | None = None) -> str:
    args = [a for p in parents for a in ("-p", p)]
    return git(repo, "commit-tree", tree, *args, "-m", message, env=env)


def tree_with_file(repo: Path, base: str, path: str, data: bytes) -> str:
    """`base`'s tree plus one file, built in a temporary index: the real index is never read."""
    blob = git(repo, "hash-object", "-w", "--stdin", input=data)
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git(repo, "read-tree", base, env=env)
        git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
        return git(repo, "write-tree", env=env)


def tree_from_dir(repo: Path, directory: Path, skip: frozenset[Path] = frozenset()) -> str:
    """Store a directory's regular files as a tree: one hash-object call, then mktree per dir."""
    files = sorted(
        path
        for root, _, names in os.walk(directory)
        for path in (Path(root) / n for n in names)
        if path.is_file() and not path.is_symlink() and path not in skip
    )
    listing = "".join(f"{p}\n" for p in files).encode()
    blobs = git(repo, "hash-object", "-w", "--stdin-paths", input=listing).split()
    return _mktree(repo, directory, dict(zip(files, blobs, strict=True)))


def _mktree(repo: Path, directory: Path, blobs: Mapping[Path, str]) -> str:
    entries = []
    for child in sorted(directory.iterdir()):
        if child in blobs:
            entries.append(f"100644 blob {blobs[child]}\t{child.name}")
        elif child.is_dir() and not child.is_symlink() and any(child in b.parents for b in blobs):
            entries.append(f"040000 tree {_mktree(repo, child, blobs)}\t{child.name}")
    return git(repo, "mktree", input="".join(e + "\n" for e in entries).encode())


def claim(repo: Path, remote: str, request_id: str, note: str) -> bool:
    """Take a request before running it; exactly one claimant wins (create-only ref)."""
    message = f"claim {request_id}\n\n{note}\n"
    sha = commit(repo, empty_tree(repo), message, env=BRIDGE_IDENTITY)
    return create_ref(repo, remote, sha, HEADS + CLAIM_PREFIX + request_id)


def publish(repo: Path, remote: str, request_id: str, run_dir: Path,
            skip: Iterable[Path] = ()) -> bool:
    """Push a run directory as an orphan commit on mac-bridge-results/<id>; never overwrites."""
    tree = tree_from_dir(repo, run_dir, frozenset(skip))
    sha = commit(repo, tree, f"mac-bridge result {request_id}", env=BRIDGE_IDENTITY)
    return create_ref(repo, remote, sha, HEADS + RESULT_PREFIX + request_id)


def changed_paths(repo: Path, old: str, new: str) -> list[str]:
    out = git_bytes(repo, "diff", "--name-only", "--no-renames", "-z", old, new)
    return [p for p in out.decode("utf-8", "replace").split("\0") if p]
