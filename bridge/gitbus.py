"""The git bus: ref namespaces and the plumbing that moves requests, claims and results.

Only plumbing touches repositories (hash-object, mktree, commit-tree, a temporary index), so a
user's worktree, index and current branch never change. Claims and results change only by
compare-and-swap pushes (`--force-with-lease=<ref>:<expected>`, empty for "must not exist"),
checked atomically by the receiving repository, so two writers can never both win.

Every git call runs with hooks off (`core.hooksPath=/dev/null`): a hook planted in a repository
the runner uses must never run as the runner. Only the client's request push keeps the user's
hooks (git-lfs uploads objects from its pre-push hook). Credentials for the bus, once taken out of
the environment with `take_transport`, reach network calls only.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mlx_engine.errors import UserError

REQUEST_PREFIXES = ("mac-bridge/", "AgentMemory/mac-bridge-")
CLAIM_PREFIX = "mac-bridge-claims/"
RESULT_PREFIX = "mac-bridge-results/"
HEADS = "refs/heads/"
REQUEST_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}?-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")
NO_HOOKS = ("-c", "core.hooksPath=/dev/null")
NETWORK_TIMEOUT_S = 900.0
FETCH_BATCH = 200  # refspecs per fetch: thousands of refs would overflow the argv limit (E2BIG)
BRIDGE_IDENTITY = {
    "GIT_AUTHOR_NAME": "kakeya-mac-bridge",
    "GIT_AUTHOR_EMAIL": "mac-bridge@users.noreply.github.com",
    "GIT_COMMITTER_NAME": "kakeya-mac-bridge",
    "GIT_COMMITTER_EMAIL": "mac-bridge@users.noreply.github.com",
}
_TRANSPORT: dict[str, str] = {}
_TRANSPORT_VAR = re.compile(r"GIT_CONFIG_(COUNT|KEY_\d+|VALUE_\d+|PARAMETERS)|GIT_ASKPASS|"
                            r"GIT_SSH(_COMMAND)?|SSH_AUTH_SOCK")


class GitError(UserError):
    """A git command failed; the message is its last line of stderr."""


def take_transport(environ: MutableMapping[str, str]) -> None:
    """Move the bus credentials (the workflow's GIT_CONFIG_* auth header, ssh settings) out of
    `environ`: from now on only network git calls get them, never a local one or a preset."""
    for name in [k for k in environ if _TRANSPORT_VAR.fullmatch(k)]:
        _TRANSPORT[name] = environ.pop(name)


def git_bytes(repo: Path, *args: str, input: bytes | None = None,
              env: Mapping[str, str] | None = None, timeout: float | None = None,
              network: bool = False, hooks: bool = False) -> bytes:
    cmd = ["git", *(() if hooks else NO_HOOKS), "-C", str(repo), *args]
    full_env = {**os.environ, **(_TRANSPORT if network else {}), **(env or {})}
    timeout = timeout or (NETWORK_TIMEOUT_S if network else None)
    try:
        done = subprocess.run(cmd, input=input, capture_output=True, check=True, env=full_env,
                              timeout=timeout)
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


def claim_ref(request_id: str) -> str:
    return HEADS + CLAIM_PREFIX + request_id


def result_ref(request_id: str) -> str:
    return HEADS + RESULT_PREFIX + request_id


@dataclass
class BusState:
    """What the remote holds, keyed by request id (as listed: nothing here is verified)."""

    requests: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # id -> (branch, sha)
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
        return by_age(i for i in self.requests if self.state_of(i) == "pending")

    def request_sha(self, request_id: str) -> str | None:
        """The commit of a request on exactly one branch; None when absent or ambiguous."""
        branches = self.requests.get(request_id, [])
        return branches[0][1] if len(branches) == 1 else None


def by_age(ids: Iterable[str]) -> list[str]:
    return sorted(ids, key=lambda i: (i.rsplit("-", 2)[1], i))


def bus_state(repo: Path, remote: str, timeout: float | None = None) -> BusState:
    state = BusState()
    for name, sha in list_heads(repo, remote, timeout):
        claim, result = name.removeprefix(CLAIM_PREFIX), name.removeprefix(RESULT_PREFIX)
        if name.startswith(CLAIM_PREFIX) and REQUEST_ID.fullmatch(claim):
            state.claims[claim] = sha
        elif name.startswith(RESULT_PREFIX) and REQUEST_ID.fullmatch(result):
            state.results[result] = sha
        elif request_id := request_id_of(name):
            state.requests.setdefault(request_id, []).append((name, sha))
    return state


def list_heads(repo: Path, remote: str, timeout: float | None = None) -> list[tuple[str, str]]:
    """(branch, sha) of every branch on the remote; names that are not UTF-8 are skipped (git
    allows them, and no bus ref ever has one)."""
    out = git_bytes(repo, "ls-remote", "--heads", remote, timeout=timeout, network=True)
    heads = []
    for line in out.splitlines():
        sha, _, ref = line.partition(b"\t")
        try:
            name = ref.decode("utf-8")
        except UnicodeDecodeError:
            continue
        heads.append((name.removeprefix(HEADS), sha.decode("ascii")))
    return heads


def fetch(repo: Path, remote: str, refspecs: list[str]) -> list[str]:
    """Fetch refspecs in batches; a batch that fails is retried one by one. Returns the refspecs
    that could not be fetched (a ref deleted since the listing, say)."""
    failed = []
    for start in range(0, len(refspecs), FETCH_BATCH):
        batch = refspecs[start:start + FETCH_BATCH]
        try:
            _fetch(repo, remote, batch)
        except GitError:
            for spec in batch:
                try:
                    _fetch(repo, remote, [spec])
                except GitError:
                    failed.append(spec)
    return failed


def _fetch(repo: Path, remote: str, refspecs: list[str]) -> None:
    git(repo, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", remote, *refspecs,
        network=True)


def fetch_into(repo: Path, remote: str, ref: str, local: str) -> str:
    """Fetch one remote ref into a private local ref (never a branch) and return its sha."""
    _fetch(repo, remote, [f"+{ref}:{local}"])
    return git(repo, "rev-parse", "--verify", f"{local}^{{commit}}")


@dataclass(frozen=True)
class Update:
    """Set `ref` to `new` if it is still `old` (None: if it does not exist)."""

    ref: str
    new: str
    old: str | None


def push(repo: Path, remote: str, updates: list[Update], hooks: bool = False) -> bool:
    """Apply every update or none (one atomic push of compare-and-swaps). False when a ref had
    moved (someone else won); GitError when the push failed for another reason."""
    leases = [f"--force-with-lease={u.ref}:{u.old or ''}" for u in updates]
    specs = [f"{u.new}:{u.ref}" for u in updates]
    try:
        git(repo, "push", "--quiet", "--porcelain", "--atomic", *leases, remote, *specs,
            network=True, hooks=hooks)
        return True
    except GitError:
        # Lost the race, or the push failed: the remote's refs say which (and whether we won
        # after all, with the answer lost on the way back).
        now = remote_shas(repo, remote, [u.ref for u in updates])
        if all(now.get(u.ref) == u.new for u in updates):
            return True
        if any(now.get(u.ref) != u.old for u in updates):
            return False
        raise


def create_ref(repo: Path, remote: str, sha: str, ref: str, hooks: bool = False) -> bool:
    """Create `ref` on the remote at `sha`; False when it already exists (someone else won)."""
    return push(repo, remote, [Update(ref, sha, None)], hooks=hooks)


def remote_shas(repo: Path, remote: str, refs: list[str]) -> dict[str, str]:
    out = git_bytes(repo, "ls-remote", remote, *refs, network=True)
    pairs = (line.decode("utf-8", "replace").split("\t") for line in out.splitlines())
    return {ref: sha for sha, ref in pairs if ref in refs}


def blob_size(repo: Path, rev: str, path: str) -> int | None:
    """Size of the file at rev:path, or None when there is none (checked before reading it)."""
    try:
        return int(git(repo, "cat-file", "-s", f"{rev}:{path}"))
    except GitError:
        return None


def read_blob(repo: Path, rev: str, path: str) -> bytes:
    return git_bytes(repo, "cat-file", "blob", f"{rev}:{path}")


def commit_messages(repo: Path, shas: Iterable[str]) -> dict[str, str]:
    """The message of each commit present in `repo` (one `cat-file --batch` for all)."""
    wanted = list(dict.fromkeys(shas))
    out = git_bytes(repo, "cat-file", "--batch", input="".join(f"{s}\n" for s in wanted).encode())
    messages, pos = {}, 0
    for sha in wanted:
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        if header[-1] == b"missing":
            pos = end + 1
            continue
        size = int(header[2])
        body = out[end + 1:end + 1 + size]
        pos = end + 1 + size + 1
        if header[1] == b"commit":
            messages[sha] = body.partition(b"\n\n")[2].decode("utf-8", "replace")
    return messages


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
    """Store a directory's regular files as a tree in three git calls whatever its size or depth:
    hash every file, list them all into a temporary index, write the tree (linear time)."""
    files = sorted(
        path
        for root, _, names in os.walk(directory)
        for path in (Path(root) / n for n in names)
        if path.is_file() and not path.is_symlink() and path not in skip
    )
    listing = "".join(f"{p}\n" for p in files).encode()
    blobs = git(repo, "hash-object", "-w", "--stdin-paths", input=listing).split()
    index = "".join(f"100644 {blob}\t{path.relative_to(directory).as_posix()}\n"
                    for path, blob in zip(files, blobs, strict=True))
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git(repo, "update-index", "--add", "--index-info", input=index.encode(), env=env)
        return git(repo, "write-tree", env=env)


def changed_paths(repo: Path, old: str, new: str) -> list[str]:
    out = git_bytes(repo, "diff", "--name-only", "--no-renames", "-z", old, new)
    return [p for p in out.decode("utf-8", "replace").split("\0") if p]
