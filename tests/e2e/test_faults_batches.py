"""Fault: a worker SIGKILLed between two of a run's batches (issue 11). Two real worker
processes and an API process on PostgreSQL; the worker holding the run's lease is killed by pid
after its tool step was written (the assistant message with its tool call, `message_created`
and `tool_executing`, one transaction) and while the tool runs, before its result is written.
The other worker takes the run over: it resumes the unanswered call (announced in its start
batch), the tool completes once, the history is valid, and the two attempts' events share the
thread's numbering with no duplicate."""

from __future__ import annotations

import json

import pytest

from tests.e2e.processes import Cluster, cluster, wait_for

__all__ = ["cluster"]  # the fixture, imported for this module's tests

pytestmark = pytest.mark.e2e

TERMINAL = {"completed", "failed", "cancelled", "timed_out"}
WORKER_SETTINGS = {"run_lease_seconds": 2}


def test_a_worker_killed_between_two_batches_is_resumed_without_repeats(
    cluster: Cluster,
) -> None:
    api = cluster.client(cluster.api())
    workers = [cluster.worker(**WORKER_SETTINGS), cluster.worker(**WORKER_SETTINGS)]
    user = api.user()
    thread = api.thread(user)
    run_id = api.start(user, thread, "what is 12*7?", agent="stalling-calculator")

    started = cluster.tool_log.with_name(f"{cluster.tool_log.name}.started")
    wait_for(
        lambda: started.exists() and run_id in started.read_text().split(),
        seconds=60,
        what="the tool to be running",
    )
    step = cluster.query("SELECT type FROM events WHERE run_id = :id ORDER BY seq", id=run_id)
    assert [e["type"] for e in step][-2:] == ["message_created", "tool_executing"], step
    assert [m["role"] for m in api.messages(user, thread)] == ["user", "assistant"]
    (row,) = cluster.query("SELECT lease_owner FROM runs WHERE id = :id", id=run_id)
    (victim,) = [w for w in workers if f":{w.pid}:" in str(row["lease_owner"])]
    victim.kill()

    done = api.wait_run(user, thread, run_id, TERMINAL, seconds=90)
    assert done["status"] == "completed" and done["attempt"] == 2, done
    assert done["result"]["text"] == "12*7 = 84."
    assert cluster.tool_executions() == [run_id]  # completed once, by the second attempt
    messages = api.messages(user, thread)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    (call,) = messages[1]["tool_calls"]
    assert messages[2]["tool_call_id"] == call["id"]

    events = cluster.query(
        "SELECT seq, type, data, run_id FROM events WHERE thread_id = :thread ORDER BY seq",
        thread=thread,
    )
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    mine = [e for e in events if e["run_id"] == run_id and e["type"] != "run_queued"]
    types = [e["type"] for e in mine]
    retried = types.index("agent_started", 1)
    assert types[:retried][-2:] == ["message_created", "tool_executing"]
    # The second attempt announces the call it resumes with its start, then completes it.
    assert types[retried : retried + 3] == ["agent_started", "tool_executing", "tool_completed"]
    assert types.count("tool_completed") == 1
    assert types[-2:] == ["message_created", "agent_completed"]
    assert [_data(e)["attempt"] for e in mine if e["type"] == "agent_started"] == [1, 2]


def _data(event: dict[str, object]) -> dict[str, object]:
    data = event["data"]
    parsed = json.loads(data) if isinstance(data, str) else data
    assert isinstance(parsed, dict)
    return parsed
