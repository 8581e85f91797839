"""The requester's side of the bus: submit a request, wait for it, read its result.

A request is HEAD plus one commit that adds the manifest, built with plumbing in a temporary index
and pushed straight to a new branch: the user's worktree, index and current branch are never
touched, and uncommitted work is refused rather than silently swept in.
"""

from __future__ import annotations

import getpass
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridge import busview, gitbus, manifest, report, seal
from bridge.gitbus import HEADS, GitError
from bridge.ledger import Debt
from bridge.presets import Preset, find_preset, former_names, load_presets, models_root
from bridge.publish import RESULTS_NS, Link, deliver, result_commit
from bridge.safety import Rejected
from bridge.schema import schema_errors
from bridge.selftest import host_info, mlx_status
from mlx_engine.errors import UserError

STATUS_EXIT = {"passed": 0, "failed": 1, "error": 1, "cancelled": 1, "rejected": 2}
EXIT_TIMEOUT = 3
_SUFFIX = re.compile(r"[A-Za-z0-9._-]{0,40}")


class Unverified(UserError):
    """A result no runner sealed (a plain push), or one about another request commit."""


def find_repo() -> Path | None:
    try:
        return Path(gitbus.git(Path.cwd(), "rev-parse", "--show-toplevel"))
    except GitError:
        return None


def repo_root() -> Path:
    if (repo := find_repo()) is None:
        raise UserError("not inside a git repository")
    return repo


def preset_named(presets: Mapping[str, Preset], name: str) -> Preset:
    """The preset `name` calls, saying so on stderr when it is a former name."""
    preset = find_preset(presets, name)
    if preset is None:
        raise Rejected([f"preset: unknown preset {name!r} (see `kakeya_mac presets`)"])
    if preset.name != name:
        print(f"note: preset {name} is now called {preset.name}; the old name is accepted "
              "until kakeya-mlx 0.2", file=sys.stderr)
    return preset


def parse_params(preset: Preset, texts: list[str]) -> dict[str, Any]:
    """`--param k=v` pairs, typed by the preset; Rejected lists every bad one."""
    reasons, params = [], {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep:
            reasons.append(f"--param {text!r}: expected KEY=VALUE")
        elif key not in preset.params:
            reasons.append(f"params.{key}: unknown parameter for preset {preset.name}")
        else:
            try:
                params[key] = preset.params[key].parse_text(value)
            except ValueError as exc:
                reasons.append(f"params.{key}: {exc}")
    if reasons:
        raise Rejected(reasons)
    return params


def check_branch_policy(repo: Path, prefix: str, suffix: str) -> None:
    if prefix not in gitbus.REQUEST_PREFIXES:
        raise UserError(f"branch prefix {prefix!r} is not watched by the runner; "
                        f"use one of {', '.join(gitbus.REQUEST_PREFIXES)}")
    if not _SUFFIX.fullmatch(suffix):
        raise UserError(f"branch suffix {suffix!r}: use at most 40 of A-Z a-z 0-9 . _ -")
    example = gitbus.request_branch(prefix, gitbus.new_request_id("x"), suffix)
    try:
        gitbus.git(repo, "check-ref-format", "--branch", example)
    except GitError:
        raise UserError(f"{example!r} is not a valid branch name") from None


def submit(repo: Path, presets: Mapping[str, Preset], preset_name: str, param_texts: list[str],
           remote: str, prefix: str, suffix: str) -> tuple[str, str, str]:
    """Push a request branch; return (request id, branch, request commit)."""
    if dirty := gitbus.git(repo, "status", "--porcelain", "--untracked-files=normal"):
        first = dirty.splitlines()[0]
        raise UserError(f"the working tree has uncommitted changes ({first.strip()} ...); "
                        "commit or stash them: a request runs committed code only")
    check_branch_policy(repo, prefix, suffix)
    preset = preset_named(presets, preset_name)
    head = gitbus.git(repo, "rev-parse", "--verify", "HEAD^{commit}")
    request_id = gitbus.new_request_id(preset_name)
    doc = {
        "version": manifest.SCHEMA_VERSION,
        "request_id": request_id,
        "preset": preset_name,
        "params": parse_params(preset, param_texts),
        "created_at": report.utc_now(),
        "requester": _requester(repo),
        "base_sha": head,
    }
    manifest.validate(doc, presets)  # the executor's own check, before anything leaves this machine
    tree = gitbus.tree_with_file(repo, head, manifest.MANIFEST_PATH, manifest.dump(doc))
    sha = gitbus.commit(repo, tree, f"mac-bridge request {request_id}", [head])
    branch = gitbus.request_branch(prefix, request_id, suffix)
    if not gitbus.create_ref(repo, remote, sha, HEADS + branch, hooks=True):
        raise UserError(f"branch {branch} already exists on {remote}")
    return request_id, branch, sha


def _requester(repo: Path) -> str:
    """The committer's email as git sees it (config or GIT_AUTHOR_* env), schema-safe."""
    try:
        ident = gitbus.git(repo, "var", "GIT_AUTHOR_IDENT")
        who = ident[ident.index("<") + 1:ident.index(">")]
    except (GitError, ValueError):
        who = getpass.getuser()
    who = re.sub(r"[^A-Za-z0-9._@+-]", "_", who).lstrip("._@+-")[:128]
    return who or "unknown"


def result_summary(repo: Path, remote: str, request_id: str,
                   request_sha: str | None = None) -> dict[str, Any] | None:
    """The summary.json of a request's result, or None while there is none.

    Unverified unless a seal signed with the bridge key names exactly this result commit, the
    summary is about the sealed request commit, and that commit is `request_sha` (what the client
    pushed; by default the request branch's commit)."""
    rid = gitbus.checked_request_id(request_id)
    claim_ref, result_ref = gitbus.claim_ref(rid), gitbus.result_ref(rid)
    refs = gitbus.remote_shas(repo, remote, [claim_ref, result_ref])
    if result_ref not in refs:
        return None
    key = seal.require_key(os.environ)
    stamp = refs.get(claim_ref) and busview.read_claim(repo, remote, key, rid, refs[claim_ref])
    if not stamp or stamp.result != refs[result_ref]:
        raise Unverified(f"the result on {result_ref} is not sealed by a runner: ignored")
    sha = gitbus.fetch_into(repo, remote, result_ref, RESULTS_NS + rid)
    try:
        doc = json.loads(gitbus.read_blob(repo, stamp.result, "summary.json"))
    except (GitError, ValueError):
        doc = None
    if errors := schema_errors("summary.v1", doc):
        raise UserError(f"malformed result for {rid}: {errors[0]}")
    if sha != stamp.result or doc["request_id"] != rid or doc["request_sha"] != stamp.request_sha:
        raise Unverified(f"the result of {rid} does not match its seal: ignored")
    if request_sha is None:  # no commit of our own to compare: the request branch's, if one
        request_sha = gitbus.bus_state(repo, remote).request_sha(rid) or stamp.request_sha
    if stamp.request_sha not in (None, request_sha):
        raise Unverified(f"the result of {rid} is for request commit {stamp.request_sha}, "
                         f"not {request_sha}")
    return doc


def wait(repo: Path, remote: str, request_id: str, timeout_s: float, poll_s: float,
         request_sha: str | None = None) -> dict[str, Any] | None:
    """Poll until a verified result appears; an unverified one is reported once and waited past
    (a runner replaces a forged result with the real one)."""
    deadline = time.monotonic() + timeout_s
    warned = False
    while True:
        try:
            if (summary := result_summary(repo, remote, request_id, request_sha)) is not None:
                return summary
        except Unverified as exc:
            if not warned:
                print(f"warning: {exc}", file=sys.stderr)
                warned = True
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(poll_s, left))


def finished(summary: dict[str, Any] | None, request_id: str, timeout_s: float) -> int:
    """Print a waited-for result; the exit code says passed / failed / invalid / timed out."""
    if summary is None:
        print(f"{request_id}: no result after {timeout_s:g}s", file=sys.stderr)
        return EXIT_TIMEOUT
    print(report.text(summary))
    return STATUS_EXIT[summary["status"]]


def status(repo: Path, remote: str, request_id: str | None) -> int:
    state = gitbus.bus_state(repo, remote)
    if request_id is None:
        for rid in sorted({*state.requests, *state.claims, *state.results}):
            print(f"{state.state_of(rid):8} {rid}")
        return 0
    where = state.state_of(gitbus.checked_request_id(request_id))
    if where == "unknown":
        raise UserError(f"no request {request_id} on {remote}")
    summary = result_summary(repo, remote, request_id) if where == "done" else None
    if summary is not None:
        print(report.text(summary))
    else:
        print(f"{request_id}: {where}")
    return 0


def fetch(repo: Path, remote: str, request_id: str, out: Path | None) -> Path:
    """Unpack a verified result into `out` (default runs/bridge/<id>, which .gitignore keeps out
    of git)."""
    if result_summary(repo, remote, request_id) is None:
        raise UserError(f"no result for {request_id} on {remote} yet")
    ref = RESULTS_NS + request_id  # fetched and verified just now
    out = out or repo / "runs" / "bridge" / request_id
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = gitbus.git_bytes(repo, "archive", "--format=tar", ref)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(out, filter="data")
    return out


def cancel(repo: Path, remote: str, request_id: str) -> int:
    """Settle a pending request as cancelled: a sealed `cancelled` result, pushed atomically
    with its seal, so a runner that has not claimed it yet never will."""
    state = gitbus.bus_state(repo, remote)
    where = state.state_of(gitbus.checked_request_id(request_id))
    if where == "unknown":
        raise UserError(f"no request {request_id} on {remote}")
    who = _requester(repo)
    link = Link(repo, remote, seal.require_key(os.environ), f"client:{who}")
    summary = report.new_summary(request_id, gitbus.preset_of(request_id), link.runner, None,
                                 host_info())
    summary.update(status="cancelled", request_sha=state.request_sha(request_id),
                   gate={"passed": False, "reasons": [f"cancelled by {who}"]})
    if where == "pending":
        with tempfile.TemporaryDirectory() as tmp:
            report.finalize(Path(tmp), summary, {})
            result = result_commit(link, request_id, Path(tmp), set())
        if deliver(link, Debt(request_id, summary["request_sha"], None, result=result)):
            print(f"{request_id}: cancelled")
            return 0
    print(f"{request_id}: already {'finished' if where == 'done' else 'claimed by a runner'};"
          " not cancelled", file=sys.stderr)
    return 1


def describe_presets(presets: Mapping[str, Preset]) -> str:
    lines = []
    for preset in presets.values():
        formerly = "".join(f", formerly {old}" for old in former_names(preset.name))
        lines += [f"{preset.name}  (timeout {preset.timeout_s}s{formerly})",
                  f"    {preset.description}"]
        for p in preset.params.values():
            kind = f"{p.type} {p.min:g}..{p.max:g}" if p.type in ("int", "float") else p.type
            if p.type == "enum":
                kind = "one of " + "|".join(p.values)
            default = "required" if p.required else f"default {json.dumps(p.default)}"
            lines.append(f"    --param {p.name}=...  {kind}, {default}. {p.help}".rstrip())
    return "\n".join(lines)


def validate_file(path: Path, presets: Mapping[str, Preset]) -> manifest.Request:
    try:
        manifest.check_size(path.stat().st_size)  # before reading it
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    return manifest.load_request(data, presets)


def doctor(repo: Path | None, remote: str, presets_dir: Path, prefix: str, suffix: str) -> int:
    """Check what a request needs, print one line per check; exit 1 when any check fails."""
    checks: list[tuple[str, str, str]] = []

    def check(name: str, fn) -> None:
        try:
            level, detail = fn()
        except UserError as exc:
            level, detail = "FAIL", str(exc)
        checks.append((level, name, detail))

    checks.append(("ok" if sys.version_info >= (3, 10) else "FAIL", "python",
                   sys.version.split()[0]))
    check("presets", lambda: ("ok", f"{len(load_presets(presets_dir))} valid in {presets_dir}"))
    check("bridge key", _doctor_key)
    if repo is None:
        checks.append(("FAIL", "repository", "not inside a git repository"))
    else:
        check("remote", lambda: _doctor_remote(repo, remote))
        check("branch policy", lambda: _doctor_policy(repo, prefix, suffix))
    mlx = mlx_status()
    checks.append(("ok" if mlx["importable"] else "FAIL", "mlx",
                   mlx.get("version") or mlx.get("error", "")))
    if sys.platform == "darwin":
        checks.append(("ok" if mlx["metal"] else "FAIL", "metal", str(mlx["metal"])))
        root = models_root(os.environ)
        linked = [n for n in ("verifier", "drafter") if (root / n).exists()]
        links = ", ".join(linked) or "no verifier/drafter links: presets use the offline pair"
        checks.append(("ok" if root.is_dir() else "warn", "model dirs", f"{root}: {links}"))
        checks.append(("ok" if shutil.which("git-lfs") else "warn", "git-lfs",
                       shutil.which("git-lfs") or "not installed"))
    for level, name, detail in checks:
        print(f"[{level}] {name}: {detail}")
    return 1 if any(level == "FAIL" for level, _, _ in checks) else 0


def _doctor_key() -> tuple[str, str]:
    if seal.load_key(os.environ) is None:
        return "warn", (f"none: results cannot be verified (set {seal.KEY_ENV} or copy the "
                        f"runner's {seal.DEFAULT_KEY_FILE})")
    return "ok", "present (results are verified against it)"


def _doctor_policy(repo: Path, prefix: str, suffix: str) -> tuple[str, str]:
    check_branch_policy(repo, prefix, suffix)
    return "ok", f"{prefix}<preset>-<stamp>-<nonce>{suffix}"


def _doctor_remote(repo: Path, remote: str) -> tuple[str, str]:
    state = gitbus.bus_state(repo, remote, timeout=30)
    pending = len(state.pending())
    return "ok", f"{remote} reachable; {pending} pending, {len(state.results)} finished requests"
