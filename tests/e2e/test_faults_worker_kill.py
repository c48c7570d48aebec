"""Fault: a worker SIGKILLed mid-run (issue 7 item 6). Two real worker processes and an API
process on PostgreSQL; the worker holding the run's lease is killed by pid after the run's tool
call completed and while the model is still answering. The other worker takes the run over
once the lease runs out, the run ends exactly once, the completed tool call is not executed
again, the thread shows one answer, and the events say what happened."""

from __future__ import annotations

import json

import pytest

from tests.e2e.processes import Cluster, cluster, wait_for

__all__ = ["cluster"]  # the fixture, imported for this module's tests

pytestmark = pytest.mark.e2e

TERMINAL = {"completed", "failed", "cancelled", "timed_out"}
TERMINAL_EVENTS = {"agent_completed", "agent_failed", "run_cancelled"}
# Slow enough that the model's answer after the tool takes several seconds (the window in
# which the worker is killed), with a short lease so the takeover comes soon after.
WORKER_SETTINGS = {"run_lease_seconds": 2, "demo_delay_seconds": 1.5}


def test_a_worker_killed_mid_run_is_taken_over_and_the_run_ends_once(cluster: Cluster) -> None:
    api = cluster.client(cluster.api())
    workers = [cluster.worker(**WORKER_SETTINGS), cluster.worker(**WORKER_SETTINGS)]
    user = api.user()
    thread = api.thread(user)
    run_id = api.start(user, thread, "what is 12*7?", agent="logged-calculator")

    wait_for(
        lambda: any(m["role"] == "tool" for m in api.messages(user, thread)),
        seconds=60,
        what="the tool call's result to be stored",
    )
    (row,) = cluster.query("SELECT status, lease_owner FROM runs WHERE id = :id", id=run_id)
    assert row["status"] == "running", row
    (victim,) = [w for w in workers if f":{w.pid}:" in str(row["lease_owner"])]
    (survivor,) = [w for w in workers if w is not victim]
    victim.kill()

    done = api.wait_run(user, thread, run_id, TERMINAL, seconds=90)
    assert done["status"] == "completed" and done["attempt"] == 2, done
    assert cluster.tool_executions() == [run_id]  # the completed call was not run again

    messages = api.messages(user, thread)
    answers = [m["content"] for m in messages if m["role"] == "assistant" and m["content"]]
    assert answers == ["12*7 = 84."]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]

    events = cluster.query(
        "SELECT type, data FROM events WHERE run_id = :id ORDER BY seq", id=run_id
    )
    types = [e["type"] for e in events]
    assert [t for t in types if t in TERMINAL_EVENTS] == ["agent_completed"]
    started = [_data(e)["attempt"] for e in events if e["type"] == "agent_started"]
    assert started == [1, 2]  # the events say the run was retried
    assert types.count("tool_completed") == 1
    assert "Reaped 1 run" in survivor.log(), survivor.log()[-3000:]
    assert survivor.running()


def _data(event: dict[str, object]) -> dict[str, object]:
    data = event["data"]
    parsed = json.loads(data) if isinstance(data, str) else data
    assert isinstance(parsed, dict)
    return parsed
