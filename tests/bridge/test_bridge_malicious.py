"""Hostile manifests: each is refused with a reason, by `kakeya_mac validate` and by the executor,
and nothing runs. Plus overlay requests that edit the bridge itself."""

from __future__ import annotations

import json

import pytest

from bridge import gitbus
from bridge.executor import drain
from bridge.runner import serve

GOOD_ID = "test-marker-20260611T120000Z-0123abcd"


def good(**changes) -> dict:
    doc = {"version": 1, "request_id": GOOD_ID, "preset": "test-marker",
           "params": {"note": "ok", "count": 3}, "created_at": "2026-06-11T12:00:00Z",
           "requester": "agent@example.com", "base_sha": "0" * 40}
    return {**doc, **changes}


def params(**values) -> bytes:
    return json.dumps(good(params=values)).encode()


def raw(**changes) -> bytes:
    return json.dumps(good(**changes)).encode()


MALICIOUS: dict[str, tuple[bytes, str]] = {
    "unknown preset": (raw(preset="rm-rf"), "unknown preset 'rm-rf'"),
    "look-alike preset (U+2010 hyphen)": (raw(preset="test\u2010marker"), "preset: "),
    "extra top-level key": (raw(argv=["sh", "-c", "id"]), "Additional properties"),
    "unknown param": (params(evil=1), "params.evil: unknown parameter"),
    "look-alike param key (Cyrillic o)": (params(**{"n\u043ete": "x"}), "params: "),
    "string for int": (params(count="5"), "params.count: expected an integer, got '5'"),
    "bool for int": (params(count=True), "params.count: expected an integer, got True"),
    "float for int": (params(count=5.0), "params.count: expected an integer, got 5.0"),
    "huge int": (params(count=10**30), "is above the maximum 100"),
    "negative int": (params(count=-1), "params.count: -1 is below the minimum 0"),
    "float out of range": (params(ratio=1.5), "params.ratio: 1.5 is above the maximum 1"),
    "string for bool": (params(flag="true"), "params.flag: expected true or false"),
    "enum outside its values": (params(level="extreme"), "'extreme' is not one of low, high"),
    "leading dash": (params(note="-rf"), "params.note: starts with '-'"),
    "leading fullwidth dash": (params(note="\uff0drf"), "params.note: starts with '-'"),
    "path traversal": (params(note="../../etc/passwd"), "params.note: path traversal"),
    "absolute path": (params(note="/etc/passwd"), "params.note: absolute paths"),
    "shell metacharacters": (params(note="x; rm -rf ~"), "does not match"),
    "command substitution": (params(note="$(id)"), "does not match"),
    "env placeholder in params": (params(note="${ENV:HOME}"), "allowed only in preset files"),
    "newline (control character)": (params(note="a\nb"), "control or invisible characters"),
    "bidi override": (params(note="ab\u202ecd"), "control or invisible characters"),
    "id with traversal": (raw(request_id="../../refs/heads/main"), "request_id: "),
    "id of another preset": (raw(request_id="bridge-selftest-20260611T120000Z-0123abcd"),
                             "must start with the preset name"),
    "base_sha not a sha": (raw(base_sha="HEAD~1"), "base_sha: "),
    "wrong version": (raw(version=2), "version: 1 was expected"),
    "nested value": (params(note={"$ne": 1}), "params.note: "),
    "not an object": (b"[1, 2, 3]", "is not of type 'object'"),
    "broken JSON": (b'{"version": 1, "preset": ', "not valid JSON"),
    "duplicate keys": (b'{"preset": "test-marker", "preset": "ar-baseline"}',
                       "duplicate key 'preset'"),
    "NaN": (params(ratio=float("nan")), "NaN is not allowed"),
    "Infinity": (params(ratio=float("inf")), "Infinity is not allowed"),
    "4300+ digit integer": (b'{"version": ' + b"9" * 5000 + b"}", "not valid JSON"),
    "deep nesting": (b"[" * 10000 + b"]" * 10000, "manifest"),
    "not UTF-8": (b'{"preset": "\xff"}', "not UTF-8"),
    "oversize": (json.dumps(good(created_at="x" * 20000)).encode(), "bytes; the limit is 16384"),
}


def test_the_baseline_manifest_is_valid(kakeya, tmp_path):
    path = tmp_path / "request.json"
    path.write_bytes(raw())
    code, out, _ = kakeya("validate", str(path))
    assert code == 0 and out.strip() == f"valid: {GOOD_ID} (preset test-marker)"


@pytest.mark.parametrize("case", MALICIOUS)
def test_validate_rejects_with_a_reason(kakeya, tmp_path, case):
    data, reason = MALICIOUS[case]
    path = tmp_path / "request.json"
    path.write_bytes(data)
    code, out, err = kakeya("validate", str(path))
    assert code == 2, out
    assert err.startswith("error: ") and reason in err, err
    assert "Traceback" not in err


def test_executor_rejects_every_malicious_request_and_runs_nothing(bus):
    ids = {f"test-marker-20260611T1200{n:02d}Z-0123abcd": case for n, case in enumerate(MALICIOUS)}
    bus.push_manifests({rid: MALICIOUS[case][0].replace(GOOD_ID.encode(), rid.encode())
                        for rid, case in ids.items()})
    summaries = {s["request_id"]: s for s in drain(bus.config())}
    assert set(summaries) == set(ids)
    for request_id, summary in summaries.items():
        assert summary["status"] == "rejected", ids[request_id]
        assert summary["gate"]["reasons"], ids[request_id]
        assert summary["exit_code"] is None and summary["argv"] == []
        published = json.loads(bus.result_file(request_id, "summary.json"))
        assert published["gate"]["reasons"] == summary["gate"]["reasons"]
    assert bus.executions == []


@pytest.mark.parametrize("path", [
    "bridge/executor.py", "presets/bridge-selftest.yaml", ".github/workflows/mac-bridge.yaml",
    # A Mac's disk folds case (and HFS+ drops some code points): these are the same dirs there.
    "Bridge/executor.py", ".GitHub/workflows/run.yaml", "PRESETS/evil.yaml",
    "bri\u200cdge/executor.py", "\uff42ridge/executor.py", "BRIDGE",
])
def test_overlay_request_is_refused(bus, capsys, path):
    target = bus.agent / path
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.read_text() if target.is_file() else ""
    target.write_text(old + "\n# overlay: run my own executor\n")
    gitbus.git(bus.agent, "add", "-A")
    gitbus.git(bus.agent, "commit", "-q", "-m", "overlay")
    code, out, _ = bus.kakeya("run", "test-marker", capsys=capsys)
    assert code == 0
    request_id = out.strip()
    assert serve(bus.config(), once=True, poll_s=0) == 0
    summary = json.loads(bus.result_file(request_id, "summary.json"))
    assert summary["status"] == "rejected"
    assert summary["gate"]["reasons"] == [
        "the request changes protected paths (bridge/, presets/, .github/, in any letter case): "
        f"{path}"]
    assert bus.executions == []


def test_request_commit_must_only_add_the_manifest(bus):
    (bus.agent / "smuggled.py").write_text("x = 1\n")
    gitbus.git(bus.agent, "add", "smuggled.py")
    head = gitbus.git(bus.agent, "rev-parse", "HEAD")
    request_id = "test-marker-20260611T120000Z-0123abcd"
    doc = good(request_id=request_id, base_sha=head)
    tree = gitbus.tree_with_file(bus.agent, gitbus.git(bus.agent, "write-tree"),
                                 ".mac-bridge/request.json", json.dumps(doc).encode())
    sha = gitbus.commit(bus.agent, tree, "manifest plus a file", [head])
    assert gitbus.create_ref(bus.agent, "origin", sha, f"refs/heads/mac-bridge/{request_id}")
    (summary,) = drain(bus.config())
    assert summary["gate"]["reasons"] == [
        "the request commit may only add .mac-bridge/request.json"]
    assert bus.executions == []


def test_base_sha_must_be_the_parent(bus):
    request_id = "test-marker-20260611T120000Z-0123abcd"
    bus.push_manifests({request_id: raw(request_id=request_id)})  # base_sha is 000...0
    (summary,) = drain(bus.config())
    assert summary["gate"]["reasons"] == [
        "base_sha: the request commit must have base_sha as its only parent"]
    assert bus.executions == []
