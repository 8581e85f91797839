"""End to end over a bare remote: the client pushes, `serve --once` executes, the client reads."""

from __future__ import annotations

import hashlib
import json
import time

from bridge import gitbus
from bridge.runner import serve


def _wait_for_request(bus, deadline_s: float = 60.0) -> str:
    """The request branch the client pushed (waits on the condition, not a fixed sleep)."""
    deadline = time.monotonic() + deadline_s
    while not (found := bus.remote_branches("mac-bridge/")):
        assert time.monotonic() < deadline, "the client never pushed a request branch"
        time.sleep(0.05)
    (branch,) = found
    return gitbus.request_id_of(branch)


def test_run_wait_serve_fetch_status(bus, capsys, tmp_path):
    head = gitbus.git(bus.agent, "rev-parse", "HEAD")
    client = bus.spawn("run", "bridge-selftest", "--wait", "--poll", "0.1", "--timeout", "120")
    request_id = _wait_for_request(bus)
    assert serve(bus.config(), once=True, poll_s=0) == 0
    out, err = client.communicate(timeout=120)
    assert client.returncode == 0, err
    assert out.splitlines()[0] == request_id
    assert f"{request_id}: PASSED" in out

    summary = json.loads(bus.result_file(request_id, "summary.json"))
    assert summary["status"] == "passed"
    assert summary["preset"] == "bridge-selftest"
    assert summary["request_sha"] == gitbus.git(bus.origin, "rev-parse",
                                                f"refs/heads/mac-bridge/{request_id}")
    assert summary["base_sha"] == head
    assert summary["exit_code"] == 0 and summary["timed_out"] is False
    assert summary["gate"] == {"passed": True, "reasons": []}
    for path in ("logs/stdout.log", "logs/stderr.log", "logs/executor.log",
                 "artifacts/evidence.json"):
        assert summary["artifacts"][path] == hashlib.sha256(
            bus.result_file(request_id, path)).hexdigest()
    evidence = json.loads(bus.result_file(request_id, "artifacts/evidence.json"))
    assert evidence["schema"] == "kakeya-bridge-selftest/v1" and evidence["ok"] is True
    readme = bus.result_file(request_id, "README.md").decode()
    assert "**PASSED**" in readme and "artifacts/evidence.json" in readme

    code, out, _ = bus.kakeya("status", request_id, capsys=capsys)
    assert code == 0 and f"{request_id}: PASSED" in out
    code, out, _ = bus.kakeya("status", capsys=capsys)
    assert code == 0 and f"done     {request_id}" in out
    dest = tmp_path / "fetched"
    code, out, _ = bus.kakeya("fetch", request_id, "--out", str(dest), capsys=capsys)
    assert code == 0 and out.strip() == str(dest)
    assert json.loads((dest / "summary.json").read_text()) == summary
    assert (dest / "artifacts" / "evidence.json").is_file()

    # Nothing in the agent's clone moved: same branch, same commit, clean tree.
    assert gitbus.git(bus.agent, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert gitbus.git(bus.agent, "rev-parse", "HEAD") == head
    assert gitbus.git(bus.agent, "status", "--porcelain") == ""


def test_gate_failure_and_wait_timeout(bus, capsys):
    code, out, _ = bus.kakeya("run", "test-marker", "--param", "lossless=false", capsys=capsys)
    failing = out.strip()
    serve(bus.config(), once=True, poll_s=0)
    code, out, _ = bus.kakeya("run", "test-marker", "--wait", "--timeout", "0.3", "--poll", "0.1",
                              capsys=capsys)
    assert code == 3, "a request nobody serves times out with exit 3"
    serve(bus.config(), once=True, poll_s=0)

    summary = json.loads(bus.result_file(failing, "summary.json"))
    assert summary["status"] == "failed"
    assert summary["gate"]["reasons"] == ["aggregate.lossless_all == true: got false"]
    code, out, _ = bus.kakeya("status", failing, capsys=capsys)
    assert "FAILED" in out and "aggregate.lossless_all == true: got false" in out


def test_cancel_before_claim(bus, capsys):
    code, out, _ = bus.kakeya("run", "test-marker", capsys=capsys)
    request_id = out.strip()
    code, out, _ = bus.kakeya("cancel", request_id, capsys=capsys)
    assert code == 0 and "cancelled" in out
    assert serve(bus.config(), once=True, poll_s=0) == 0
    assert bus.executions == []
    assert json.loads(bus.result_file(request_id, "summary.json"))["status"] == "cancelled"
    code, _, err = bus.kakeya("cancel", request_id, capsys=capsys)
    assert code == 1 and "already finished" in err
