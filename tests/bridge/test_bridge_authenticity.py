"""Authenticity: with plain `git push`, an agent can write any ref, but a result counts only when
a seal signed with the bridge key names it; the client also checks it is about its own commit."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from bridge import client, gitbus, report, seal
from bridge.executor import drain
from bridge.manifest import MANIFEST_PATH


def _forge_result(bus, request_id: str, request_sha: str) -> None:
    """A schema-valid PASSED result, pushed by hand to the result ref."""
    summary = report.new_summary(request_id, "test-marker", "runner", None, {})
    summary.update(status="passed", request_sha=request_sha, gate={"passed": True, "reasons": []})
    with tempfile.TemporaryDirectory() as tmp:
        report.finalize(Path(tmp), summary, {})
        tree = gitbus.tree_from_dir(bus.agent, Path(tmp))
    forged = gitbus.commit(bus.agent, tree, "a result, honest")
    gitbus.git(bus.agent, "push", "-q", "origin", f"{forged}:{gitbus.result_ref(request_id)}")


def _same_id_request(bus, request_id: str, sha: str, **params) -> str:
    """Another request commit under an existing id (same base, edited params)."""
    doc = json.loads(gitbus.read_blob(bus.agent, sha, MANIFEST_PATH))
    doc["params"].update(params)
    base = doc["base_sha"]
    tree = gitbus.tree_with_file(bus.agent, base, MANIFEST_PATH, json.dumps(doc).encode())
    return gitbus.commit(bus.agent, tree, "same id, other commit", [base])


def test_a_pushed_result_is_not_reported_and_the_runner_replaces_it(bus, capsys):
    request_id, sha = bus.submit()
    _forge_result(bus, request_id, sha)
    code, out, err = bus.kakeya("status", request_id, capsys=capsys)
    assert code == 2 and "not sealed by a runner" in err and "PASSED" not in out
    assert client.wait(bus.agent, "origin", request_id, 0.2, 0.1, sha) is None
    assert "not sealed by a runner" in capsys.readouterr().err

    (summary,) = drain(bus.config())  # not done in the runner's eyes: it runs the request
    assert bus.executions == [request_id]
    assert client.wait(bus.agent, "origin", request_id, 5, 0.1, sha) == summary
    code, out, _ = bus.kakeya("status", request_id, capsys=capsys)
    assert code == 0 and f"{request_id}: PASSED" in out


def test_a_pushed_claim_does_not_hold_up_the_request(bus):
    request_id, sha = bus.submit()
    gitbus.git(bus.agent, "push", "-q", "origin", f"{sha}:{gitbus.claim_ref(request_id)}")
    (summary,) = drain(bus.config())
    assert summary["status"] == "passed" and bus.executions == [request_id]
    assert client.result_summary(bus.agent, "origin", request_id, sha) == summary


def test_a_request_id_on_two_branches_runs_nothing(bus):
    request_id, sha = bus.submit()
    other = _same_id_request(bus, request_id, sha, count=99)
    gitbus.git(bus.agent, "push", "-q", "origin",
               f"{other}:refs/heads/AgentMemory/mac-bridge-{request_id}")
    (summary,) = drain(bus.config())
    assert bus.executions == []
    assert summary["status"] == "rejected" and summary["request_sha"] is None
    assert summary["gate"]["reasons"] == [
        f"request id on more than one branch (AgentMemory/mac-bridge-{request_id}, "
        f"mac-bridge/{request_id}): nothing runs"]


def test_the_client_refuses_a_result_for_another_commit(bus):
    request_id, sha = bus.submit()
    other = _same_id_request(bus, request_id, sha, count=99)
    gitbus.git(bus.agent, "push", "-q", "--force", "origin",
               f"{other}:refs/heads/mac-bridge/{request_id}")
    (summary,) = drain(bus.config())  # the runner ran what the branch held
    assert summary["status"] == "passed" and summary["request_sha"] == other
    with pytest.raises(client.Unverified, match=f"is for request commit {other}, not {sha}"):
        client.result_summary(bus.agent, "origin", request_id, sha)
    assert client.wait(bus.agent, "origin", request_id, 0.2, 0.1, sha) is None


def test_a_deleted_result_is_restored_from_its_seal(bus):
    request_id, sha = bus.submit()
    (summary,) = drain(bus.config())
    gitbus.git(bus.agent, "push", "-q", "origin", f":{gitbus.result_ref(request_id)}")
    assert drain(bus.config()) == []  # nothing runs again
    assert bus.executions == [request_id]
    assert client.result_summary(bus.agent, "origin", request_id, sha) == summary


def test_a_claim_verifies_only_with_its_key_and_fields():
    key = b"k" * 32
    claim = seal.Claim("test-marker-20260611T120000Z-0123abcd", "a" * 40, "r1", 1e9)
    text = seal.message(claim, key)
    assert seal.verify(text, key) == claim
    assert seal.verify(text, b"x" * 32) is None
    assert seal.verify(text.replace('"r1"', '"r2"'), key) is None
    assert seal.verify("mac-bridge claim x\n\n{}\nmac: 00\n", key) is None
    again = seal.Claim(claim.request_id, claim.request_sha, "r1", 1e9)
    assert again.nonce != claim.nonce  # one runner id, two claims: two different commits


def test_a_runner_creates_the_key_once_and_private(hermetic, monkeypatch):
    monkeypatch.delenv(seal.KEY_ENV)
    path = hermetic / ".config" / "kakeya-mac" / "bridge.key"
    assert seal.load_key(os.environ) is None
    with pytest.raises(client.UserError, match="no bridge key"):
        seal.require_key(os.environ)
    key = seal.load_key(os.environ, create=True)
    assert key and path.stat().st_mode & 0o777 == 0o600
    assert seal.load_key(os.environ, create=True) == key == seal.require_key(os.environ)
