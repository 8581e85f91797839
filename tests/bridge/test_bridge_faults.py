"""Hostile output and faults: whatever a request's code leaves behind, and whatever the bus does,
the runner publishes only safe copies, leaks no runner file, and goes on serving."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time

import pytest

from bridge import checkout, client, executor, gitbus, publish
from bridge.executor import drain
from bridge.ledger import Ledger

SECRET = b"runner-private-key-0123456789"


@pytest.fixture
def secret(hermetic):
    (hermetic / "secret.txt").write_bytes(SECRET)
    return SECRET


def _attack(bus, attack: str) -> str:
    return bus.submit("test-attack", f"attack={attack}")[0]


def _published(bus, request_id: str) -> dict[str, bytes]:
    """Every file of a result commit, by path."""
    data = gitbus.git_bytes(bus.origin, "archive", "--format=tar",
                            gitbus.result_ref(request_id))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_hostile_output_is_refused_and_the_runner_goes_on(bus, secret):
    attacks = {a: _attack(bus, a) for a in ("log-links", "fifo", "names", "deep", "hardlink")}
    plain, _ = bus.submit()
    summaries = {s["request_id"]: s for s in drain(bus.config())}
    assert set(summaries) == {*attacks.values(), plain}
    assert summaries[plain]["status"] == "passed"
    for attack, request_id in attacks.items():
        files = _published(bus, request_id)
        assert all(SECRET not in data for data in files.values()), attack
        assert summaries[request_id]["status"] == "passed", attack
        assert set(files) == {"summary.json", "README.md", *summaries[request_id]["artifacts"]}

    def omitted(attack: str) -> dict[str, str]:
        return summaries[attacks[attack]]["omitted"]

    # logs/*.log swapped for a symlink to a secret and one to /dev/zero; a hard link beside them
    assert set(omitted("log-links")) == {"logs/stdout.log", "logs/stderr.log"}
    assert "logs/extra.log" not in summaries[attacks["log-links"]]["artifacts"]
    assert omitted("fifo") == {"artifacts/pipe": "not a regular file",
                               "logs/stdout.log": "not a regular file"}
    assert set(omitted("names")) == {"artifacts/new\\nline.txt", "artifacts/ctrl\\x01dir",
                                     "artifacts/not-utf8-\\udcff", "artifacts/.GIT"}
    assert omitted("deep") == {"artifacts" + "/d" * 33: "deeper than 32 directories"}
    assert omitted("hardlink") == {"artifacts/hard.txt": "hard link",
                                   "artifacts/root": "symbolic link",
                                   "artifacts/soft.txt": "symbolic link"}
    readme = _published(bus, attacks["names"])["README.md"].decode()
    assert "| artifacts/new\\nline.txt | omitted: name not allowed" in readme


def test_publishing_2000_files_takes_a_fixed_number_of_git_calls(bus, monkeypatch):
    calls: list[str] = []
    real = gitbus.git_bytes

    def counting(repo, *args, **kwargs):
        calls.append(args[0])
        return real(repo, *args, **kwargs)

    monkeypatch.setattr(gitbus, "git_bytes", counting)
    few = bus.tmp / "few"
    (few / "a").mkdir(parents=True)
    (few / "a" / "x.txt").write_text("x")
    gitbus.tree_from_dir(bus.origin, few)
    assert len(calls) == 3
    many = _attack(bus, "many")
    start = time.monotonic()
    assert [s["status"] for s in drain(bus.config())] == ["passed"]
    assert time.monotonic() - start < 120  # linear publishing; a quadratic one blows this
    files = _published(bus, many)
    assert sum(p.startswith("artifacts/dir") for p in files) == 2000
    assert files["artifacts/dir19/f99.txt"] == b"19 99\n"
    calls.clear()
    gitbus.tree_from_dir(bus.origin, bus.tmp / "work-runner" / "runs" / many)
    assert len(calls) == 3


def _pack_refs(repo, refs: list[str], sha: str) -> None:
    """Create many refs at once, packed as a server keeps them."""
    (repo / "packed-refs").write_text("# pack-refs with: peeled fully-peeled sorted \n"
                                      + "".join(f"{sha} {ref}\n" for ref in sorted(refs)))


def test_twenty_thousand_request_refs_do_not_stop_a_pass(bus, monkeypatch):
    _, sha = bus.submit()
    _pack_refs(bus.origin, [f"refs/heads/mac-bridge/test-marker-20200101T000000Z-{n:08x}"
                            for n in range(20_000)], sha)
    served: list[str] = []
    serve = executor.Runner.serve
    monkeypatch.setattr(executor.Runner, "serve",
                        lambda self, entry, sha: served.append(entry.request_id)
                        or serve(self, entry, sha))
    monkeypatch.setattr(executor.Runner, "_out_of_time", lambda self, need_s: len(served) >= 5)
    summaries = drain(bus.config())  # lists all 20,000, fetches a batch, stops as its budget says
    assert len(summaries) == 5 and all(s["status"] == "rejected" for s in summaries)
    assert "does not match its branch" in summaries[0]["gate"]["reasons"][0]
    assert gitbus.bus_state(bus.agent, "origin").results.keys() == set(served)


def test_fetching_refs_beyond_the_argv_limit(bus):
    _, sha = bus.submit()
    refs = [f"refs/heads/mac-bridge/test-marker-20200101T000000Z-{n:08x}{'/long' * 200}"
            for n in range(2_500)]
    _pack_refs(bus.origin, refs, sha)
    specs = [f"+{ref}:refs/kakeya-mac/requests/{n}" for n, ref in enumerate(refs)]
    assert sum(len(s) + 1 for s in specs) > os.sysconf("SC_ARG_MAX")  # one git call: E2BIG
    mirror = bus.tmp / "mirror.git"
    gitbus.git(bus.tmp, "init", "--quiet", "--bare", str(mirror))
    assert gitbus.fetch(mirror, str(bus.origin), specs) == []
    listed = gitbus.git(mirror, "for-each-ref", "--format=%(objectname)", "refs/kakeya-mac/")
    assert listed.split() == [sha] * len(refs)


def test_a_ref_name_that_is_not_utf8_is_ignored(bus, capsys):
    request_id, sha = bus.submit()
    subprocess.run(["git", "-C", str(bus.origin), "update-ref",
                    os.fsdecode(b"refs/heads/mac-bridge/\xff\xfe"), sha], check=True)
    (summary,) = drain(bus.config())
    assert summary["request_id"] == request_id and summary["status"] == "passed"
    code, out, _ = bus.kakeya("status", capsys=capsys)
    assert code == 0 and out.split() == ["done", request_id]


def test_a_rejected_results_push_is_retried_until_it_lands(bus, monkeypatch):
    monkeypatch.setattr(publish, "RETRY_S", (0.0,))
    frozen = bus.tmp / "results-frozen"
    hook = bus.origin / "hooks" / "pre-receive"
    hook.write_text(f"#!/bin/sh\nwhile read old new ref; do case \"$ref\" in\n"
                    f"  refs/heads/mac-bridge-results/*) [ -e '{frozen}' ] && exit 1;;\n"
                    "esac; done\nexit 0\n")
    hook.chmod(0o755)
    frozen.touch()
    ids = {bus.submit()[0], bus.submit()[0]}
    assert drain(bus.config()) == []  # nothing landed, and the pass did not crash
    assert sorted(bus.executions) == sorted(ids)
    assert {d.request_id for d in Ledger(bus.tmp / "work-runner").debts()} == ids
    frozen.unlink()
    summaries = drain(bus.config())  # the next pass delivers from the ledger, running nothing
    assert {s["request_id"] for s in summaries} == ids
    assert sorted(bus.executions) == sorted(ids)
    assert Ledger(bus.tmp / "work-runner").debts() == []
    for request_id in ids:
        assert client.result_summary(bus.agent, "origin", request_id)["status"] == "passed"


def test_an_executor_fault_is_that_requests_error_and_the_pass_goes_on(bus, monkeypatch):
    real = checkout.materialize
    faults = iter([RuntimeError("disk on fire")])

    def flaky(*args, **kwargs):
        if (fault := next(faults, None)) is not None:
            raise fault
        return real(*args, **kwargs)

    monkeypatch.setattr(checkout, "materialize", flaky)
    first, second = bus.submit()[0], bus.submit()[0]
    summaries = {s["request_id"]: s for s in drain(bus.config())}
    statuses = sorted(s["status"] for s in summaries.values())
    assert set(summaries) == {first, second} and statuses == ["error", "passed"]
    (failed,) = [s for s in summaries.values() if s["status"] == "error"]
    assert failed["gate"]["reasons"] == ["executor error: RuntimeError: disk on fire"]
    assert json.loads(bus.result_file(failed["request_id"], "summary.json")) == failed
