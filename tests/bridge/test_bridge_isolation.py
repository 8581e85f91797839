"""Isolation: a request's code (it runs by design) must not reach the runner's credentials, its
key, its mirror or the bus, nor leave anything that runs in a later request."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bridge import client, gitbus
from bridge.executor import drain
from bridge.sandbox import MAX_PROCESSES, Sandbox

TOKEN = "ghs_runner_token_0123456789"
CREDENTIALS = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraheader",
               "GIT_CONFIG_VALUE_0": f"AUTHORIZATION: basic {TOKEN}"}


def _loot(bus, request_id: str) -> dict:
    return json.loads(bus.result_file(request_id, "artifacts/loot.json"))


def _everything_published(bus) -> bytes:
    """Every blob of every result on the bus."""
    refs = gitbus.git(bus.origin, "for-each-ref", "--format=%(refname)",
                      f"refs/heads/{gitbus.RESULT_PREFIX}").split()
    blobs = gitbus.git(bus.origin, "rev-list", "--objects", *refs).split("\n")
    return b"".join(gitbus.git_bytes(bus.origin, "cat-file", "-p", line.split()[0])
                    for line in blobs if " " in line)


def test_a_sandboxed_preset_reaches_no_secret_and_no_bus(bus, sandboxed):
    done, _ = bus.submit()
    assert drain(bus.config()), "a finished request whose result the attack tries to delete"
    main = gitbus.git(bus.origin, "rev-parse", "refs/heads/main")
    victim, victim_sha = bus.submit()
    steal = bus.submit("test-attack", "attack=environ")[0]
    reach = bus.submit("test-attack", "attack=reach", f"victim={victim}", f"done={done}")[0]
    limits = bus.submit("test-attack", "attack=limits")[0]
    runner = bus.serve("runner", "--once", env={**os.environ, **CREDENTIALS}, **sandboxed(0))
    _, err = runner.communicate(timeout=120)
    assert runner.returncode == 0, err

    environs = _loot(bus, steal)
    assert environs and all(v.startswith("denied") for v in environs.values()), environs
    published = _everything_published(bus)
    assert TOKEN.encode() not in published
    assert os.environ["KAKEYA_BRIDGE_KEY"].encode() not in published
    got = _loot(bus, reach)
    assert got["remotes"] == [str(bus.origin)]  # cmdlines are public; the repository is not
    assert [v for k, v in got.items() if k.startswith("push ")] == [128, 128, 128]
    assert got["hook"].startswith("denied")
    assert gitbus.git(bus.origin, "rev-parse", "refs/heads/main") == main
    assert client.result_summary(bus.agent, "origin", done)["status"] == "passed"
    assert client.result_summary(bus.agent, "origin", victim, victim_sha)["runner"] == "runner"
    assert not (bus.tmp / "work-runner" / "mirror.git" / "hooks").exists()
    assert _loot(bus, limits)["RLIMIT_NPROC"] == MAX_PROCESSES


def test_the_commands_parent_holds_no_credential(bus):
    request_id = bus.submit("test-attack", "attack=environ")[0]
    runner = bus.serve("runner", "--once", env={**os.environ, **CREDENTIALS})
    _, err = runner.communicate(timeout=120)
    assert runner.returncode == 0, err
    parent = next(iter(_loot(bus, request_id).values()))  # /proc/$PPID/environ: the supervisor
    assert "PATH=" in parent and TOKEN not in parent and "KAKEYA_BRIDGE_KEY" not in parent


def test_a_runner_process_closes_its_proc_entries():
    if not sys.platform.startswith("linux"):
        pytest.skip("prctl is Linux's; on macOS use a sandbox user")
    probe = ("import ctypes, ctypes.util; from bridge import linux; "
             "libc = ctypes.CDLL(ctypes.util.find_library('c')); "
             "print(linux.forbid_inspection(), libc.prctl(3, 0, 0, 0, 0), "
             "linux.become_subreaper())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["True", "0", "True"]  # PR_GET_DUMPABLE 0: /proc is root's


def test_the_checkout_shares_nothing_with_the_mirror(bus):
    request_id = bus.submit("test-attack", "attack=reach")[0]
    drain(bus.config())
    got = _loot(bus, request_id)
    config = got[".git/config"]
    assert "[core]" in config and "remote" not in config and "mirror" not in config
    assert got[".git/FETCH_HEAD"].startswith("denied")  # removed: it named the mirror


def test_hooks_planted_in_the_mirror_never_run(bus):
    bus.submit()
    drain(bus.config())
    mirror = bus.tmp / "work-runner" / "mirror.git"
    ran = bus.tmp / "hook-ran"
    hooks = bus.tmp / "planted-hooks"
    for where in (mirror / "hooks", hooks):
        where.mkdir(exist_ok=True)
        for name in ("post-checkout", "pre-push", "reference-transaction", "post-update",
                     "pre-auto-gc", "post-index-change", "fsmonitor-watchman"):
            (where / name).write_text(f"#!/bin/sh\necho {name} >> '{ran}'\n")
            (where / name).chmod(0o755)
    with (mirror / "config").open("a") as f:
        f.write(f"[core]\n\thooksPath = {hooks}\n\tfsmonitor = {hooks}/fsmonitor-watchman\n")
    request_id, sha = bus.submit()
    (summary,) = drain(bus.config())
    assert summary["status"] == "passed" and not ran.exists()
    assert client.result_summary(bus.agent, "origin", request_id, sha) == summary


def test_without_root_the_sandbox_user_is_reached_through_sudo(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    sandbox = Sandbox("kakeya-sandbox", 64_000, 64_000)
    argv, env, kwargs = sandbox.command(["python", "-m", "x"], {"HOME": "/h", "A": "b c"})
    assert argv == ["sudo", "-n", "-u", "#64000", "--", "/usr/bin/env", "-i", "HOME=/h", "A=b c",
                    "python", "-m", "x"]
    assert set(env) == {"PATH"} and kwargs == {}


def test_a_sandbox_user_must_be_unprivileged_and_other():
    with pytest.raises(client.UserError, match="unprivileged user other than"):
        Sandbox.resolve(str(os.geteuid()))
    with pytest.raises(client.UserError, match="does not exist"):
        Sandbox.resolve("no-such-user-here")
