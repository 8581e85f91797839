"""The runner side: exactly-once under contention, timeouts that leave no process behind, a scrubbed
environment, redacted logs, and nothing published that the runner did not mean to publish."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from bridge import client, gitbus
from bridge.executor import drain
from bridge.presets import load_presets


def _submit(bus, preset: str = "test-marker", *params: str) -> str:
    request_id, _ = client.submit(bus.agent, load_presets(bus.presets_dir), preset, list(params),
                                  "origin", "mac-bridge/", "")
    return request_id


def _summary(bus, request_id: str) -> dict:
    return json.loads(bus.result_file(request_id, "summary.json"))


def test_two_runners_run_each_of_ten_requests_exactly_once(bus):
    ids = {_submit(bus, "test-marker", f"count={n}") for n in range(10)}
    runners = [bus.spawn("serve", "--remote", str(bus.origin), "--once", "--runner-id", name,
                         "--work", str(bus.tmp / f"work-{name}"), "--kill-grace-s", "1")
               for name in ("r1", "r2")]
    for proc in runners:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert sorted(bus.executions) == sorted(ids)  # each ran once: none twice, none lost
    state = gitbus.bus_state(bus.agent, "origin")
    assert set(state.results) == ids and set(state.claims) == ids and state.pending() == []
    runs = {_summary(bus, i)["runner"] for i in ids}
    assert runs <= {"r1", "r2"}
    assert all(_summary(bus, i)["status"] == "passed" for i in ids)


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting for its reaper."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def test_timeout_kills_the_whole_process_group(bus):
    request_id = _submit(bus, "test-runaway")
    (summary,) = drain(bus.config())
    pids = [int(p) for p in (bus.tmp / "work-runner" / "runs" / request_id / "artifacts" /
                             "pids.txt").read_text().split()]
    assert len(pids) == 4, "two children and two grandchildren were started"
    deadline = time.monotonic() + 10
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive == [], f"survivors: {alive}"
    assert summary["status"] == "failed" and summary["timed_out"] is True
    assert summary["exit_code"] == -signal.SIGKILL  # it ignored SIGTERM, so SIGKILL it got
    assert summary["gate"]["reasons"] == ["timed out after 3s"]
    assert "timed out after 3s" in bus.result_file(request_id, "README.md").decode()


def test_scrubbed_environment_and_redacted_logs(bus, hermetic):
    models = hermetic / "private-models-dir"
    (models / "verifier").mkdir(parents=True)
    environ = {**os.environ, "KAKEYA_MODELS": str(models), "GITHUB_TOKEN": "ghs_secret",
               "GIT_CONFIG_VALUE_0": "AUTHORIZATION: basic c2VjcmV0", "BASH_ENV": "/tmp/x",
               "LD_PRELOAD": "/tmp/evil.so", "DYLD_INSERT_LIBRARIES": "/tmp/evil.dylib",
               "PYTHONSTARTUP": "/tmp/evil.py", "KAKEYA_VERIFIER": ""}
    marker, selftest = _submit(bus), _submit(bus, "bridge-selftest")
    drain(bus.config(environ=environ))

    evidence = json.loads(bus.result_file(marker, "artifacts/evidence.json"))
    assert set(evidence["env"]) <= {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL",
                                    "LC_CTYPE", "TZ", "HF_HOME", "XDG_CACHE_HOME",
                                    "KAKEYA_CACHE_DIR", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE",
                                    "PYTHONUNBUFFERED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                    "TMPDIR"}
    assert evidence["cwd"].startswith(str(bus.tmp / "work-runner" / "checkouts"))

    summary = _summary(bus, selftest)
    assert summary["argv"][-2:] == ["--models", "${ENV:KAKEYA_MODELS}"]
    stdout = bus.result_file(selftest, "logs/stdout.log").decode()
    assert '"root": "${ENV:KAKEYA_MODELS}"' in stdout and str(models) not in stdout
    # The runner's models dir does reach the command (and its evidence), just not the logs.
    evidence = json.loads(bus.result_file(selftest, "artifacts/evidence.json"))
    assert evidence["models"]["root"] == str(models)
    assert evidence["models"]["entries"] == [{"name": "verifier", "symlink": False,
                                              "resolves": True}]


def test_links_to_runner_secrets_are_not_published(bus, hermetic):
    (hermetic / "secret.txt").write_text("runner-private-key")
    request_id = _submit(bus, "test-marker", "note=leak")
    (summary,) = drain(bus.config())
    assert summary["status"] == "passed"
    assert summary["omitted"] == {"artifacts/soft.txt": "symbolic link: removed",
                                  "artifacts/hard.txt": "hard link: removed"}
    listing = gitbus.git(bus.origin, "ls-tree", "-r", "--name-only",
                         f"refs/heads/{gitbus.RESULT_PREFIX}{request_id}")
    assert "soft.txt" not in listing and "hard.txt" not in listing
    assert sorted(listing.split()) == sorted(["README.md", "summary.json", *summary["artifacts"]])


def test_lfs_pointer_left_in_the_checkout_fails_fast(bus):
    weights = bus.agent / "models" / "drafter.safetensors"
    weights.parent.mkdir()
    weights.write_text("version https://git-lfs.github.com/spec/v1\n"
                       "oid sha256:" + "ab" * 32 + "\nsize 123456789\n")
    gitbus.git(bus.agent, "add", "-A")
    gitbus.git(bus.agent, "commit", "-q", "-m", "weights as an LFS pointer")
    _submit(bus)
    (summary,) = drain(bus.config())
    assert summary["status"] == "error"
    assert summary["gate"]["reasons"] == [
        "Git LFS pointer files were not materialized: models/drafter.safetensors"]
    assert bus.executions == []


def test_budget_leaves_long_requests_pending(bus):
    request_id = _submit(bus)  # timeout_s 60 + margin 60 does not fit in 30 s
    assert drain(bus.config(budget_s=30)) == []
    assert gitbus.bus_state(bus.agent, "origin").pending() == [request_id]
    assert bus.executions == []


def test_local_runs_a_preset_on_the_working_tree(bus, capsys):
    code, out, err = bus.kakeya("local", "test-marker", "--param", "count=2", capsys=capsys,
                                cwd=bus.agent)
    assert code == 0, err
    (run_dir,) = (bus.agent / "runs" / "bridge").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "passed" and summary["params"]["count"] == 2
    assert "PASSED" in out and sys.executable
