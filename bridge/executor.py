"""The trusted executor, `python -m bridge.executor`: the one entry point of workflow and serve.

Presets, validation and the gate come from the code running here (the default branch, or the
installed package); the request commit contributes only data (its manifest) and the engine code that
the preset's argv runs by design. One pass settles what an earlier process of this runner left
undone, then claims and runs every pending request and delivers each result (with its seal) to
`mac-bridge-results/<id>`. A fault in one request is recorded as its `error` result; the pass goes
on with the next.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bridge import busview, checkout, gitbus, linux, manifest, reaper, report
from bridge.busview import Entry
from bridge.gitbus import HEADS, GitError, Update
from bridge.ledger import Debt, Ledger
from bridge.presets import Preset, default_presets_dir, load_presets
from bridge.publish import Link, deliver, result_commit
from bridge.run import (
    Log,
    Runtime,
    executor_sha,
    finish_run_dir,
    fresh_dir,
    record_fault,
    run_preset,
)
from bridge.safety import PROTECTED, Rejected, protected
from bridge.sandbox import Sandbox
from bridge.scratch import Scratch
from bridge.seal import Claim, load_key
from bridge.selftest import host_info
from mlx_engine.errors import UserError, cli_entry

BUDGET_MARGIN_S = 60.0
BATCH = 100  # requests fetched and handled per listing of the bus
REQUESTS_NS = "refs/kakeya-mac/requests/"
TRUSTED_REF = "refs/kakeya-mac/trusted"
_MIRROR_CONFIG = "[core]\n\trepositoryformatversion = 0\n\tbare = true\n\thooksPath = /dev/null\n"


@dataclass(frozen=True)
class Config:
    remote: str
    work: Path
    presets_dir: Path = field(default_factory=default_presets_dir)
    default_branch: str | None = None
    runner_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    kill_grace_s: float = 10.0
    budget_s: float | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    sandbox_user: str | None = None
    scratch: Path | None = None  # default <work>/scratch
    key_file: Path | None = None  # default ~/.config/kakeya-mac/bridge.key
    lease_margin_s: float = 900.0
    preset_python: str = sys.executable


@dataclass
class Ticket:
    """One request on its way through: what we know so far, and the summary it will publish."""

    request_id: str
    sha: str | None
    summary: dict[str, Any]
    request: manifest.Request | None = None  # None once rejected


def drain(cfg: Config) -> list[dict[str, Any]]:
    """Settle this runner's debts, then claim and run every pending request, re-listing until none
    is left; return the summaries this runner delivered."""
    presets = load_presets(cfg.presets_dir)
    with _exclusive(cfg.work):
        runner = Runner(cfg, presets)
        return runner.drain()


class Runner:
    """One pass of one runner over the bus, with what it needs at hand."""

    def __init__(self, cfg: Config, presets: Mapping[str, Preset]) -> None:
        self.cfg, self.presets = cfg, presets
        mirror = _mirror(cfg.work)
        key = load_key(cfg.environ, cfg.key_file, create=True)
        assert key is not None
        self.link = Link(mirror, _absolute_remote(cfg.remote), key, cfg.runner_id)
        self.sandbox = Sandbox.resolve(cfg.sandbox_user) if cfg.sandbox_user else None
        self.runtime = Runtime(cfg.environ, cfg.kill_grace_s, self.sandbox, cfg.preset_python)
        self.scratch_root = cfg.scratch or cfg.work / "scratch"
        self.ledger = Ledger(cfg.work)
        self.default = cfg.default_branch or _default_branch(mirror, self.link.remote)
        self.deadline = None if cfg.budget_s is None else time.monotonic() + cfg.budget_s
        self.delivered: list[dict[str, Any]] = []

    def drain(self) -> list[dict[str, Any]]:
        self.settle_debts()
        seen: set[str] = set()
        while not self._out_of_time(0.0):
            view = busview.read(self.link.mirror, self.link.remote, self.link.key)
            self.restore([e for e in view.values() if e.state == "tampered"])
            todo = [view[i] for i in gitbus.by_age(view) if i not in seen
                    and view[i].state in ("pending", "ambiguous", "expired")][:BATCH]
            if not todo:
                break
            seen.update(e.request_id for e in todo)
            fetched = self._fetch(todo)
            for entry in todo:
                if self._out_of_time(0.0):
                    print(f"{entry.request_id}: left pending (budget spent)", file=sys.stderr)
                elif entry.state != "pending" or entry.request_id in fetched:
                    self.serve(entry, fetched.get(entry.request_id))
            # Keep the mirror's refs few: every fetch and check walks them all.
            gitbus.git(self.link.mirror, "update-ref", "--stdin", input="".join(
                f"delete {REQUESTS_NS}{i}\n" for i in fetched).encode())
            self.settle_debts()
        return self.delivered

    def settle_debts(self) -> None:
        """Finish what is owed: a run cut off by the death of an earlier process becomes an
        error result; every undelivered result is pushed again."""
        for debt in self.ledger.debts():
            self._deliver(debt if debt.result is not None else self._cut_off(debt))

    def restore(self, tampered: list[Entry]) -> None:
        """Put back a sealed result whose ref was deleted or replaced, when we hold its commit."""
        for entry in tampered:
            assert entry.claim is not None and entry.claim.result is not None
            if gitbus.commit_messages(self.link.mirror, [entry.claim.result]):
                update = Update(gitbus.result_ref(entry.request_id), entry.claim.result,
                                entry.result_sha)
                with contextlib.suppress(GitError):
                    if gitbus.push(self.link.mirror, self.link.remote, [update]):
                        print(f"{entry.request_id}: sealed result restored", file=sys.stderr)

    def serve(self, entry: Entry, sha: str | None) -> None:
        """Take one request from listing to a delivered result; any fault becomes its error."""
        rid = entry.request_id
        log = Log()
        summary = report.new_summary(rid, gitbus.preset_of(rid), self.cfg.runner_id,
                                     executor_sha(), host_info())
        summary["request_sha"] = sha
        debt = Debt(rid, sha, replaces=entry.claim_sha)
        run_dir = fresh_dir(self.cfg.work / "runs" / rid)
        secrets: dict[str, str] = {}
        scratch = None
        try:
            ticket = self._ticket(entry, sha, summary)
            if ticket.request is None:
                log(f"{summary['status']}: {'; '.join(summary['gate']['reasons'])}")
            elif (claimed := self._claim(ticket, entry)) is None:
                shutil.rmtree(run_dir)
                return
            else:
                debt = claimed
                scratch = Scratch.create(self.scratch_root / rid, self.sandbox)
                secrets = self._run(ticket, scratch, run_dir, log)
        except Exception as exc:  # an executor fault must still publish a result, never lose one
            record_fault(summary, exc)
        finally:
            if scratch is not None:
                scratch.remove(self.sandbox)
        log(f"status {summary['status']}")
        self._deliver(self._owe(debt, summary, run_dir, secrets, log))

    def _ticket(self, entry: Entry, sha: str | None, summary: dict[str, Any]) -> Ticket:
        ticket = Ticket(entry.request_id, sha, summary)
        if entry.state == "expired":
            assert entry.claim is not None
            until = datetime.fromtimestamp(entry.claim.lease_until, timezone.utc)
            summary.update(status="error", request_sha=entry.claim.request_sha, gate={
                "passed": False, "reasons": [f"runner {entry.claim.runner} claimed it and its "
                                             f"lease ran out at {until:%Y-%m-%dT%H:%M:%SZ} "
                                             "without a result"]})
        elif entry.state == "ambiguous":
            branches = ", ".join(b for b, _ in entry.branches)
            summary.update(status="rejected", gate={"passed": False, "reasons": [
                f"request id on more than one branch ({branches}): nothing runs"]})
        else:
            admit(self.link.mirror, self.presets, TRUSTED_REF, ticket)
        return ticket

    def _claim(self, ticket: Ticket, entry: Entry) -> Debt | None:
        """Claim with a compare-and-swap over whatever the claim ref held (nothing, or a forged
        claim); None when another runner won, or when the budget cannot fit the run."""
        assert ticket.request is not None and ticket.sha is not None
        preset = ticket.request.preset
        if self._out_of_time(preset.timeout_s + BUDGET_MARGIN_S):
            print(f"{ticket.request_id}: left pending (not enough budget left)", file=sys.stderr)
            return None
        lease = time.time() + preset.timeout_s + self.cfg.kill_grace_s + self.cfg.lease_margin_s
        claim = Claim(ticket.request_id, ticket.sha, self.cfg.runner_id, lease)
        sha = self.link.sign(claim)
        update = Update(gitbus.claim_ref(ticket.request_id), sha, entry.claim_sha)
        if not gitbus.push(self.link.mirror, self.link.remote, [update]):
            return None
        debt = Debt(ticket.request_id, ticket.sha, replaces=sha, claim=sha)
        self.ledger.write(debt)
        return debt

    def _run(self, ticket: Ticket, scratch: Scratch, run_dir: Path, log: Log) -> dict[str, str]:
        req = ticket.request
        assert req is not None and ticket.sha is not None
        log(f"request {req.request_id} at {ticket.sha} by {req.requester}: preset "
            f"{req.preset.name} with {req.params}")
        problem = checkout.materialize(self.link.mirror, ticket.sha, scratch.checkout,
                                       self.link.remote)
        if problem:
            ticket.summary.update(status="error", gate={"passed": False, "reasons": [problem]})
            return {}
        return run_preset(req.preset, req.params, req.request_id, scratch.checkout, scratch,
                          run_dir, self.runtime, ticket.summary, log,
                          self.ledger.pids_file(req.request_id))

    def _owe(self, debt: Debt, summary: dict[str, Any], run_dir: Path,
             secrets: Mapping[str, str], log: Log) -> Debt:
        """Finish the run directory, commit it as the result, and record that it is owed."""
        too_large = finish_run_dir(run_dir, summary, secrets, log)
        debt = replace(debt, request_sha=summary["request_sha"],
                       result=result_commit(self.link, debt.request_id, run_dir, too_large))
        self.ledger.write(debt)
        return debt

    def _deliver(self, debt: Debt) -> None:
        rid = debt.request_id
        outcome = deliver(self.link, debt)
        if outcome is None:
            print(f"{rid}: result not delivered yet; retried on the next pass", file=sys.stderr)
            return
        self.ledger.clear(rid)
        run_dir = self.cfg.work / "runs" / rid
        if outcome:
            summary = report.load(run_dir / "summary.json")
            print(f"{rid}: {summary['status']}")
            self.delivered.append(summary)
        else:
            print(f"{rid}: another runner settled it; ours stays in {run_dir}", file=sys.stderr)

    def _cut_off(self, debt: Debt) -> Debt:
        """A run whose runner process died: kill what is left of it, record it as an error."""
        if self.sandbox is not None:
            self.sandbox.kill_all()
        reaper.kill_recorded(self.ledger.pids_file(debt.request_id))
        summary = report.new_summary(debt.request_id, gitbus.preset_of(debt.request_id),
                                     self.cfg.runner_id, executor_sha(), host_info())
        summary.update(status="error", request_sha=debt.request_sha, gate={
            "passed": False, "reasons": ["the runner stopped during the run; the runner that "
                                         "restarted recorded it as an error"]})
        log = Log()
        log("the runner process running this request died; recorded as an error on restart")
        return self._owe(debt, summary, fresh_dir(self.cfg.work / "runs" / debt.request_id), {},
                         log)

    def _fetch(self, todo: list[Entry]) -> dict[str, str]:
        """Fetch the trusted branch and the pending requests into private refs; returns the
        request commits fetched (a branch deleted since the listing is skipped)."""
        pending = [e for e in todo if e.state == "pending"]
        specs = [f"+{HEADS}{self.default}:{TRUSTED_REF}"]
        specs += [f"+{HEADS}{e.branches[0][0]}:{REQUESTS_NS}{e.request_id}" for e in pending]
        failed = set(gitbus.fetch(self.link.mirror, self.link.remote, specs))
        if specs[0] in failed:
            raise GitError(f"cannot fetch the default branch {self.default}")
        return {e.request_id: gitbus.git(self.link.mirror, "rev-parse",
                                         f"{REQUESTS_NS}{e.request_id}^{{commit}}")
                for e, spec in zip(pending, specs[1:], strict=True) if spec not in failed}

    def _out_of_time(self, need_s: float) -> bool:
        return self.deadline is not None and time.monotonic() + need_s > self.deadline


def admit(mirror: Path, presets: Mapping[str, Preset], trusted: str, ticket: Ticket) -> None:
    """Read the manifest as data and decide whether the request may run; run nothing."""
    summary = ticket.summary
    try:
        assert ticket.sha is not None
        ticket.request = _validated(mirror, presets, trusted, ticket.request_id, ticket.sha)
    except Rejected as exc:
        summary.update(status="rejected", gate={"passed": False, "reasons": exc.reasons})
        return
    req = ticket.request
    summary.update(preset=req.preset.name, params=req.params, requester=req.requester,
                   base_sha=req.base_sha)


def _validated(mirror: Path, presets: Mapping[str, Preset], trusted: str, request_id: str,
               sha: str) -> manifest.Request:
    size = gitbus.blob_size(mirror, sha, manifest.MANIFEST_PATH)
    if size is None:
        raise Rejected([f"the request commit has no {manifest.MANIFEST_PATH}"])
    manifest.check_size(size)
    request = manifest.load_request(gitbus.read_blob(mirror, sha, manifest.MANIFEST_PATH), presets)
    if request.request_id != request_id:
        raise Rejected([f"request_id {request.request_id!r} does not match its branch"])
    parent = gitbus.git(mirror, "rev-parse", f"{sha}^@").splitlines()
    if parent != [request.base_sha]:
        raise Rejected(["base_sha: the request commit must have base_sha as its only parent"])
    if gitbus.changed_paths(mirror, request.base_sha, sha) != [manifest.MANIFEST_PATH]:
        raise Rejected([f"the request commit may only add {manifest.MANIFEST_PATH}"])
    try:
        fork = gitbus.git(mirror, "merge-base", trusted, sha)
    except GitError:
        raise Rejected([f"the request shares no history with {trusted}"]) from None
    if touched := [p for p in gitbus.changed_paths(mirror, fork, sha) if protected(p)]:
        dirs = ", ".join(f"{d}/" for d in PROTECTED)
        raise Rejected([f"the request changes protected paths ({dirs}, in any letter case): "
                        + ", ".join(touched[:5])])
    return request


@contextlib.contextmanager
def _exclusive(work: Path) -> Iterator[None]:
    """One runner process per work directory: its mirror, ledger and runs are not shared."""
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o711)
    with (work / "lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another runner is using {work}") from None
        yield


def _absolute_remote(remote: str) -> str:
    """A local path is made absolute: git runs it from inside the mirror."""
    return str(Path(remote).resolve()) if Path(remote).exists() else remote


def _mirror(work: Path) -> Path:
    """The runner's bare mirror, reset on every pass: its config names no remote (the URL is only
    ever an argument) and turns hooks off, and it has no hooks directory."""
    mirror = work / "mirror.git"
    if not (mirror / "HEAD").is_file():
        mirror.mkdir(mode=0o700, exist_ok=True)
        gitbus.git(mirror, "init", "--bare", "--quiet")
    (mirror / "config").write_text(_MIRROR_CONFIG, "utf-8")
    shutil.rmtree(mirror / "hooks", ignore_errors=True)
    return mirror


def _default_branch(mirror: Path, remote: str) -> str:
    out = gitbus.git(mirror, "ls-remote", "--symref", remote, "HEAD", network=True)
    for line in out.splitlines():
        if line.startswith("ref: ") and line.endswith("\tHEAD"):
            return line[len("ref: "):-len("\tHEAD")].removeprefix(HEADS)
    raise GitError(f"cannot tell the default branch of {remote}; pass --default-branch")


def add_runner_options(parser: argparse.ArgumentParser) -> None:
    """The options `python -m bridge.executor` and `kakeya_mac serve` share."""
    env = os.environ
    parser.add_argument("--remote", required=True, help="git remote URL or path (the bus)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kakeya-mac",
                        help="mirror, ledger and run directories (default ~/.cache/kakeya-mac)")
    parser.add_argument("--presets-dir", type=Path, default=default_presets_dir())
    parser.add_argument("--default-branch", help="trusted branch (default: the remote's HEAD)")
    parser.add_argument("--runner-id", default=f"{socket.gethostname()}:{os.getpid()}")
    parser.add_argument("--budget-s", type=float,
                        help="leave requests pending that cannot finish within this many seconds")
    parser.add_argument("--kill-grace-s", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL on timeout")
    parser.add_argument("--sandbox-user", default=env.get("KAKEYA_SANDBOX_USER") or None,
                        help="run presets as this unprivileged user (name or uid; default "
                             "$KAKEYA_SANDBOX_USER)")
    parser.add_argument("--scratch", type=Path, default=env.get("KAKEYA_SCRATCH") or None,
                        help="checkouts and preset dirs, reachable by the sandbox user "
                             "(default <work>/scratch, or $KAKEYA_SCRATCH)")
    parser.add_argument("--key-file", type=Path,
                        help="bridge key (default $KAKEYA_BRIDGE_KEY, else "
                             "~/.config/kakeya-mac/bridge.key, created when missing)")
    parser.add_argument("--lease-margin-s", type=float, default=900.0,
                        help="a claim's lease: preset timeout + kill grace + this")
    parser.add_argument("--preset-python", default=sys.executable,
                        help="the interpreter a preset's `python` means (default: this one)")


def config_from(args: argparse.Namespace) -> Config:
    return Config(remote=args.remote, work=args.work, presets_dir=args.presets_dir,
                  default_branch=args.default_branch, runner_id=args.runner_id,
                  kill_grace_s=args.kill_grace_s, budget_s=args.budget_s,
                  sandbox_user=args.sandbox_user, scratch=args.scratch, key_file=args.key_file,
                  lease_margin_s=args.lease_margin_s, preset_python=args.preset_python)


def harden() -> None:
    """For a runner process: its bus credentials reach network git calls only, and (Linux) its
    /proc entries are closed to code running as the same user."""
    gitbus.take_transport(os.environ)
    linux.forbid_inspection()


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.executor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runner_options(parser)
    args = parser.parse_args(argv)
    harden()
    drain(config_from(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
