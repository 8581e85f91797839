"""The client: requests are built from committed state only, never touching the user's repo."""

from __future__ import annotations

import hashlib
import json

import pytest

from bridge import gitbus
from bridge.manifest import MANIFEST_PATH


def _snapshot(repo):
    """Everything a request must leave alone in the user's clone."""
    index = (repo / ".git" / "index").read_bytes()
    return {
        "head": gitbus.git(repo, "rev-parse", "HEAD"),
        "branch": gitbus.git(repo, "symbolic-ref", "HEAD"),
        "branches": gitbus.git(repo, "for-each-ref", "refs/heads"),
        "index": hashlib.sha256(index).hexdigest(),
        "status": gitbus.git(repo, "status", "--porcelain", "--ignored"),
        "work.py": (repo / "work.py").read_text(),
    }


@pytest.fixture
def feature(bus):
    """The agent on a feature branch with a committed engine change."""
    gitbus.git(bus.agent, "switch", "-q", "-c", "feature")
    (bus.agent / "work.py").write_text("print('feature work')\n")
    gitbus.git(bus.agent, "add", "work.py")
    gitbus.git(bus.agent, "commit", "-q", "-m", "feature work")
    return bus


def test_request_leaves_branch_index_and_worktree_alone(feature, capsys):
    before = _snapshot(feature.agent)
    code, out, _ = feature.kakeya("run", "test-marker", "--param", "count=7",
                                  "--param", "flag=yes", capsys=capsys)
    assert code == 0
    request_id = out.strip()
    assert _snapshot(feature.agent) == before

    sha = feature.remote_branches("mac-bridge/")[f"mac-bridge/{request_id}"]
    assert gitbus.git(feature.origin, "rev-parse", f"{sha}^@") == before["head"]
    changed = gitbus.git(feature.origin, "diff", "--name-only", before["head"], sha)
    assert changed == MANIFEST_PATH
    doc = json.loads(gitbus.git(feature.origin, "show", f"{sha}:{MANIFEST_PATH}"))
    assert doc["params"] == {"count": 7, "flag": True}
    assert doc["base_sha"] == before["head"] and doc["requester"] == "agent@example.com"


@pytest.mark.parametrize("dirt", ["modified", "untracked", "staged"])
def test_dirty_tree_is_refused_and_nothing_pushed(feature, capsys, dirt):
    if dirt == "untracked":
        (feature.agent / "new.py").write_text("x = 1\n")
    else:
        (feature.agent / "work.py").write_text("print('uncommitted')\n")
    if dirt == "staged":
        gitbus.git(feature.agent, "add", "work.py")
    code, _, err = feature.kakeya("run", "test-marker", capsys=capsys)
    assert code == 2
    assert "uncommitted changes" in err and "Traceback" not in err
    assert feature.remote_branches("mac-bridge/") == {}


@pytest.mark.parametrize("flags", [["--branch-suffix=-b876"], ["--branch-suffix", "-b876"]])
def test_suffix_starting_with_dash(bus, capsys, flags):
    code, out, err = bus.kakeya("run", "test-marker", "--branch-prefix=AgentMemory/mac-bridge-",
                                *flags, capsys=capsys)
    assert code == 0, err
    request_id = out.strip()
    branch = f"AgentMemory/mac-bridge-{request_id}-b876"
    assert branch in bus.remote_branches("AgentMemory/")
    assert gitbus.request_id_of(branch) == request_id
    assert gitbus.bus_state(bus.agent, "origin").pending() == [request_id]


@pytest.mark.parametrize(("args", "reason"), [
    (["run", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["run", "test-marker", "--param", "count=101"], "params.count: 101 is above the maximum 100"),
    (["run", "test-marker", "--param", "count=１２"], "params.count: '１２' is not a valid int"),
    (["run", "test-marker", "--param", "note=-rf"], "params.note: starts with '-'"),
    (["run", "test-marker", "--param", "bogus=1"], "params.bogus: unknown parameter"),
    (["run", "test-marker", "--param", "count"], "expected KEY=VALUE"),
    (["run", "test-marker", "--branch-prefix=feature/"], "is not watched by the runner"),
    (["run", "test-marker", "--branch-suffix=/../x"], "branch suffix"),
    (["status", "../../refs/heads/main"], "is not a request id"),
    (["fetch", "x"], "is not a request id"),
    (["cancel", "bridge-selftest-20260611T120000Z-0123abcd"], "no request bridge-selftest-"),
])
def test_bad_requests_exit_2_with_one_line(bus, capsys, args, reason):
    code, _, err = bus.kakeya(*args, capsys=capsys)
    assert code == 2
    assert reason in err and err.count("\n") == 1, err
    assert bus.remote_branches("mac-bridge/") == {} and bus.remote_branches("AgentMemory/") == {}


def test_a_former_preset_name_still_runs(bus, capsys):
    """`kakeya_mac run k3-fused-allmlx-code` (the old name) resolves to bench-code."""
    code, out, err = bus.kakeya("run", "k3-fused-allmlx-code", "--param", "n=4", capsys=capsys)
    assert code == 0, err
    assert "k3-fused-allmlx-code is now called bench-code" in err
    request_id = out.strip()
    assert request_id.startswith("k3-fused-allmlx-code-")
    sha = bus.remote_branches("mac-bridge/")[f"mac-bridge/{request_id}"]
    manifest_file = bus.tmp / "request.json"
    manifest_file.write_text(gitbus.git(bus.origin, "show", f"{sha}:{MANIFEST_PATH}"))
    code, out, _ = bus.kakeya("validate", str(manifest_file), capsys=capsys)
    assert code == 0 and out.strip() == f"valid: {request_id} (preset bench-code)"


def test_presets_and_doctor(bus, capsys):
    code, out, _ = bus.kakeya("presets", capsys=capsys)
    assert code == 0
    for name in ("bridge-selftest", "bench-code", "bench-overgen"):
        assert f"{name}  (timeout" in out
    assert "bench-code  (timeout 2700s, formerly k3-fused-allmlx-code)" in out
    assert "--param max_tokens=...  int 1..2048, default 256" in out
    code, out, _ = bus.kakeya("doctor", capsys=capsys)
    assert code == 0, out
    assert "[ok] remote:" in out and "0 pending" in out and "[ok] presets:" in out
    assert "[ok] bridge key: present" in out
    code, out, _ = bus.kakeya("doctor", "--remote", str(bus.tmp / "nowhere.git"), capsys=capsys)
    assert code == 1 and "[FAIL] remote:" in out
