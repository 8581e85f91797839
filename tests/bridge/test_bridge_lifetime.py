"""Process lifetime: no process of a request outlives its run, whatever it did to escape, and a
runner that dies mid-run leaves a lease that its restart, or another runner, settles once."""

from __future__ import annotations

import os
import time

from bridgetest import survivors, wait_for

from bridge import client, gitbus, seal
from bridge.executor import drain
from bridge.publish import Link


def _pids(data: bytes) -> list[int]:
    return [int(p) for p in data.split()]


def test_descendants_that_left_the_session_die_when_the_command_exits(bus):
    request_id = bus.submit("test-attack", "attack=daemons")[0]
    (summary,) = drain(bus.config())
    assert summary["status"] == "passed"
    pids = _pids(bus.result_file(request_id, "artifacts/pids.txt"))
    assert len(pids) == 4, "a child, a setsid child, a setpgid child and a daemon forked twice"
    assert survivors(pids) == []


def test_a_killed_runner_leaves_no_process_and_its_restart_settles_the_request(bus):
    request_id = bus.submit("test-attack", "attack=hang")[0]
    runner = bus.serve("doomed", poll="0.2")
    pids_file = bus.tmp / "work-doomed" / "scratch" / request_id / "out" / "pids.txt"
    wait_for(pids_file.exists, "the command to start its descendants")
    pids = _pids(pids_file.read_bytes())
    runner.kill()  # SIGKILL: no handler runs, no cleanup in the runner itself
    runner.communicate(timeout=60)
    assert survivors(pids) == [], "the supervisor kills the tree when its runner dies"
    assert gitbus.bus_state(bus.agent, "origin").state_of(request_id) == "claimed"

    (summary,) = drain(bus.config("doomed"))  # the restart, same work directory
    assert summary["status"] == "error" and summary["request_id"] == request_id
    assert summary["gate"]["reasons"] == [
        "the runner stopped during the run; the runner that restarted recorded it as an error"]
    assert client.result_summary(bus.agent, "origin", request_id)["status"] == "error"
    assert drain(bus.config("doomed")) == [] and drain(bus.config("other")) == []


def test_an_expired_lease_is_settled_once_by_the_other_runners(bus):
    request_id, sha = bus.submit()
    link = Link(bus.agent, "origin", seal.load_key(os.environ), "dead-runner")
    lapsed = seal.Claim(request_id, sha, "dead-runner", lease_until=time.time() - 1)
    assert gitbus.create_ref(bus.agent, "origin", link.sign(lapsed), gitbus.claim_ref(request_id))
    other_id, other_sha = bus.submit()
    live = seal.Claim(other_id, other_sha, "busy-runner", lease_until=time.time() + 3600)
    assert gitbus.create_ref(bus.agent, "origin", link.sign(live), gitbus.claim_ref(other_id))

    runners = [bus.serve(name, "--once") for name in ("r1", "r2")]
    outputs = [proc.communicate(timeout=120)[0] for proc in runners]
    assert [proc.returncode for proc in runners] == [0, 0]
    assert bus.executions == []
    assert "".join(outputs).splitlines() == [f"{request_id}: error"]  # settled by one runner
    summary = client.result_summary(bus.agent, "origin", request_id, sha)
    assert summary["request_sha"] == sha
    assert summary["gate"]["reasons"][0].startswith("runner dead-runner claimed it and its "
                                                    "lease ran out at ")
    assert gitbus.bus_state(bus.agent, "origin").state_of(other_id) == "claimed"  # still leased
