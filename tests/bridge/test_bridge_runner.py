"""The runner side: exactly-once under contention, timeouts that leave no process behind, a scrubbed
environment, redacted logs, and nothing published that the runner did not mean to publish."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
from bridgetest import survivors

from bridge import gitbus
from bridge.executor import drain


def _submit(bus, preset: str = "test-marker", *params: str) -> str:
    return bus.submit(preset, *params)[0]


@pytest.mark.parametrize(("names", "count"), [(("r1", "r2"), 10), (("twin", "twin"), 12)],
                         ids=["two runners", "two runners with one runner id"])
def test_two_runners_run_each_request_exactly_once(bus, names, count):
    ids = {_submit(bus, "test-marker", f"count={n}") for n in range(count)}
    runners = [bus.serve(name, "--once", work=f"{n}") for n, name in enumerate(names)]
    for proc in runners:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert sorted(bus.executions) == sorted(ids)  # each ran once: none twice, none lost
    state = gitbus.bus_state(bus.agent, "origin")
    assert set(state.results) == ids and set(state.claims) == ids and state.pending() == []
    assert {bus.summary(i)["runner"] for i in ids} <= set(names)
    assert all(bus.summary(i)["status"] == "passed" for i in ids)


def test_timeout_kills_every_descendant_setsid_and_daemons_included(bus):
    request_id = _submit(bus, "test-runaway")
    (summary,) = drain(bus.config())
    pids = [int(p) for p in (bus.tmp / "work-runner" / "runs" / request_id / "artifacts" /
                             "pids.txt").read_text().split()]
    assert len(pids) == 8, "a child, a setsid child, a setpgid child, a double-forked daemon, " \
        "two SIGTERM-ignoring children and their two children were started"
    assert survivors(pids) == []
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
    assert evidence["cwd"] == str(bus.tmp / "work-runner" / "scratch" / marker / "checkout")
    assert "KAKEYA_BRIDGE_KEY" in environ

    summary = bus.summary(selftest)
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
    assert summary["omitted"] == {"artifacts/soft.txt": "symbolic link",
                                  "artifacts/hard.txt": "hard link"}
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
