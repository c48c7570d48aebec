"""Agent execution through the API and the embedded worker (C4, C5, C6), on both backends:
start-up, live events and their order, completion, timeout, and error recovery.

Only the model is fake: the offline demo model, or a local server speaking OpenAI's wire format.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.fakes.llm_servers import ErrorReply, FakeOpenAIServer
from tests.integration._support import assert_error
from tests.integration.test_runs_support import (
    TERMINAL_EVENTS,
    Harness,
    hold_the_model_after_tools,
    metric_samples,
    run_settings,
    running_app,
    unanswered_in_thread,
    wait_until,
)
from tests.live_order import assert_in_place
from threadline.agents.history import INCOMPLETE_TOOL_CALL

pytestmark = pytest.mark.integration


@pytest.fixture
async def h(settings_factory, openai_server: FakeOpenAIServer) -> AsyncIterator[Harness]:
    openai_server.reset()
    async with running_app(run_settings(settings_factory, openai_url=openai_server.base_url)) as h:
        yield h


def _index(messages: list[dict[str, Any]], event_type: str) -> int:
    return next(i for i, m in enumerate(messages) if m["type"] == event_type)


# --- start-up ---


async def test_unknown_agent_is_422_and_writes_nothing(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    events_before = await h.events(user, thread)

    response = await h.post(user, thread, "hello", agent="no-such-agent")
    assert_error(response, 422, "agent_not_found")
    direct = await h.client.post(
        f"/v1/threads/{thread}/runs", json={"agent": "no-such-agent"}, headers=user.headers
    )
    assert_error(direct, 422, "agent_not_found")

    assert await h.messages(user, thread) == []
    assert await h.list_runs(user, thread) == []
    assert await h.events(user, thread) == events_before
    detail = await h.client.get(f"/v1/threads/{thread}", headers=user.headers)
    assert detail.json()["message_count"] == 0


async def test_invalid_run_parameters_are_422_and_write_nothing(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    invalid_runs: list[dict[str, Any]] = [
        {"agent": "demo", "multitask_strategy": "sometimes"},
        {"agent": "demo", "multitask_strategy": 3},
        {"agent": ""},
        {"agent": "x" * 65},
        {"multitask_strategy": "enqueue"},
    ]
    for run in invalid_runs:
        response = await h.client.post(
            f"/v1/threads/{thread}/messages",
            json={"content": "what is 1+1?", "run": run},
            headers=user.headers,
        )
        assert_error(response, 422, "validation_error")
        direct = await h.client.post(f"/v1/threads/{thread}/runs", json=run, headers=user.headers)
        assert_error(direct, 422, "validation_error")
    assert await h.messages(user, thread) == []
    assert await h.list_runs(user, thread) == []


# --- running: live events, their order, state transitions ---


async def test_run_streams_every_step_live_in_order(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    # after_seq=0: replay the thread's stored events, then go live (a fresh subscription
    # without a resume point is covered in test_guarantees_snapshot.py).
    async with h.watch(user, thread, after_seq=0) as watcher:
        snapshot = await watcher.next()
        assert snapshot["type"] == "snapshot"
        assert snapshot["active_run"] is None
        run = await h.start(user, thread, "what is 12*7?", agent="demo")
        live = await watcher.until_terminal(run["id"])

    # Every durable event, once, in order; each delta right after the durable event it follows.
    assert_in_place(live, after_seq=0)
    assert snapshot["last_seq"] < live[-1]["seq"]
    mine = [m for m in live if m["run_id"] == run["id"]]
    types = [m["type"] for m in mine]
    assert types[0] == "run_queued"
    assert [t for t in types if t in TERMINAL_EVENTS] == ["agent_completed"]
    assert types[-1] == "agent_completed"
    assert types.count("agent_started") == 1

    started = _index(mine, "agent_started")
    thinking = _index(mine, "agent_thinking")
    executing = _index(mine, "tool_executing")
    completed_tool = _index(mine, "tool_completed")
    deltas = [i for i, t in enumerate(types) if t == "message_delta"]
    assert started < thinking < executing < completed_tool < deltas[0]
    assert deltas[-1] < len(types) - 1

    assert mine[started]["data"] == {"agent": "demo", "attempt": 1}
    assert mine[thinking]["data"]["text"]
    call = mine[executing]["data"]
    assert call["tool"] == "calculator"
    assert call["arguments"] == {"expression": "12*7"}
    assert call["call_id"]
    result = mine[completed_tool]["data"]
    assert result["call_id"] == call["call_id"]
    assert result["result"] == "84"
    assert result["is_error"] is False
    assert result["duration_ms"] >= 0
    assert "".join(mine[i]["data"]["text"] for i in deltas) == "12*7 = 84."
    final = mine[-1]["data"]
    assert final["text"] == "12*7 = 84."

    # Deltas are live only; everything else is in the durable log, in the same order. (An
    # event is published just before its transaction commits: wait for the commit.)
    await h.wait_run(user, thread, run["id"])
    stored = await h.run_events(user, thread, run["id"])
    assert [(e.seq, e.type.value) for e in stored] == [
        (m["seq"], m["type"]) for m in mine if m["type"] != "message_delta"
    ]


async def test_status_moves_queued_running_completed(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    run = await h.start(user, thread, "what is 6*7?", agent="blocker")
    assert run["status"] == "queued"
    assert run["attempt"] == 0 and run["started_at"] is None

    await h.wait_tool_started(run["id"])
    running = await h.get_run(user, thread, run["id"])
    assert running["status"] == "running"
    assert running["attempt"] == 1
    assert running["started_at"] is not None and running["finished_at"] is None
    assert running["result"] is None

    h.controls.gate.set()
    done = await h.wait_run(user, thread, run["id"])
    assert done["status"] == "completed"
    assert done["started_at"] == running["started_at"]
    assert done["finished_at"] >= done["started_at"]
    assert done["result"]["text"] == "6*7 = 42."
    assert [r["id"] for r in await h.list_runs(user, thread)] == [run["id"]]


# --- completion ---


async def test_completed_run_persists_result_and_messages(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    run = await h.start(user, thread, "what is 12*7?", agent="demo")
    done = await h.wait_run(user, thread, run["id"])
    assert done["status"] == "completed", done
    assert done["error"] is None
    result = done["result"]
    assert result["text"] == "12*7 = 84."
    assert result["usage"]["input_tokens"] > 0 and result["usage"]["output_tokens"] > 0
    assert result["steps"] == 2 and result["tool_calls"] == 1

    messages = await h.messages(user, thread)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    user_message, calling, tool_result, answer = messages
    assert user_message["run_id"] is None
    assert {calling["run_id"], tool_result["run_id"], answer["run_id"]} == {run["id"]}
    (call,) = calling["tool_calls"]
    assert call["name"] == "calculator" and call["arguments"] == {"expression": "12*7"}
    assert tool_result["tool_call_id"] == call["id"]
    assert tool_result["content"] == "84"
    assert tool_result["metadata"]["is_error"] is False
    assert answer["content"] == "12*7 = 84." and not answer["tool_calls"]
    assert result["message_id"] == answer["id"]

    (completed,) = [
        e for e in await h.run_events(user, thread, run["id"]) if e.type.value in TERMINAL_EVENTS
    ]
    assert completed.type.value == "agent_completed"
    assert completed.data == {
        "message_id": answer["id"],
        "text": "12*7 = 84.",
        "usage": result["usage"],
    }
    await h.wait_idle(user)


# --- timeout ---


async def test_run_timeout_stops_the_tool_and_times_out(settings_factory) -> None:
    settings = run_settings(settings_factory, run_timeout_seconds=1)
    async with running_app(settings) as h:
        user = await h.user()
        thread = await h.thread(user)
        run = await h.start(user, thread, "what is 2+2?", agent="sleeper")
        done = await h.wait_run(user, thread, run["id"])
        assert done["status"] == "timed_out", done
        assert done["error"]["code"] == "run_timed_out"
        assert done["result"] is None

        terminal = [
            e
            for e in await h.run_events(user, thread, run["id"])
            if e.type.value in TERMINAL_EVENTS
        ]
        assert [(e.type.value, e.data["code"]) for e in terminal] == [
            ("agent_failed", "run_timed_out")
        ]
        # The tool really stopped: its coroutine was cancelled, not left sleeping.
        assert h.controls.cancelled == [run["id"]]
        assert h.controls.completed == []
        messages = await h.messages(user, thread)
        assert unanswered_in_thread(messages) == []
        assert messages[-1]["role"] == "tool"
        assert messages[-1]["content"] == INCOMPLETE_TOOL_CALL
        assert messages[-1]["metadata"]["is_error"] is True
        await h.wait_idle(user)


# --- error recovery ---


async def test_tool_error_is_a_result_and_the_run_completes(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    run = await h.start(user, thread, "what is 12*7?", agent="crasher")
    done = await h.wait_run(user, thread, run["id"])
    assert done["status"] == "completed", done
    assert "calculator exploded" in done["result"]["text"]

    events = await h.run_events(user, thread, run["id"])
    (tool_completed,) = [e for e in events if e.type.value == "tool_completed"]
    assert tool_completed.data["is_error"] is True
    assert "RuntimeError: calculator exploded on 12*7" in tool_completed.data["error"]
    assert "result" not in tool_completed.data
    tool_message = next(m for m in await h.messages(user, thread) if m["role"] == "tool")
    assert tool_message["metadata"]["is_error"] is True


async def test_model_failure_fails_the_run_with_a_code(
    h: Harness, openai_server: FakeOpenAIServer
) -> None:
    openai_server.script(ErrorReply(500, "the fake model is down"))
    user = await h.user()
    thread = await h.thread(user)
    run = await h.start(user, thread, "hello", agent="openai-fake")
    done = await h.wait_run(user, thread, run["id"])
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "model_provider_error"
    assert "500" in done["error"]["message"]
    terminal = [
        e for e in await h.run_events(user, thread, run["id"]) if e.type.value in TERMINAL_EVENTS
    ]
    assert [(e.type.value, e.data["code"]) for e in terminal] == [
        ("agent_failed", "model_provider_error")
    ]
    assert len(openai_server.requests) == 1


async def test_agent_failures_fail_the_run_and_leave_a_valid_history(h: Harness) -> None:
    user = await h.user()
    for agent, code in [("broken", "agent_error"), ("one-step", "max_steps_exceeded")]:
        thread = await h.thread(user)
        run = await h.start(user, thread, "what is 3*3?", agent=agent)
        done = await h.wait_run(user, thread, run["id"])
        assert done["status"] == "failed", done
        assert done["error"]["code"] == code
        terminal = [
            e
            for e in await h.run_events(user, thread, run["id"])
            if e.type.value in TERMINAL_EVENTS
        ]
        assert [(e.type.value, e.data["code"]) for e in terminal] == [("agent_failed", code)]
        assert unanswered_in_thread(await h.messages(user, thread)) == []
        # The worker is unharmed: the next run on the same thread works.
        again = await h.start(user, thread, "what is 12*7?", agent="demo")
        assert (await h.wait_run(user, thread, again["id"]))["status"] == "completed"


async def test_a_failing_run_does_not_affect_another_users_concurrent_run(
    h: Harness, openai_server: FakeOpenAIServer
) -> None:
    alice, bob = await h.user(), await h.user()
    alice_thread, bob_thread = await h.thread(alice), await h.thread(bob)
    bobs = await h.start(bob, bob_thread, "what is 12*7?", agent="blocker")
    await h.wait_tool_started(bobs["id"])

    openai_server.script(ErrorReply(500))
    failures = [
        await h.start(alice, alice_thread, "what is 1+1?", agent="broken"),
        await h.start(alice, alice_thread, "hello", agent="openai-fake"),
        await h.start(alice, alice_thread, "what is 2+2?", agent="crasher"),
    ]
    outcomes = [(await h.wait_run(alice, alice_thread, r["id"]))["status"] for r in failures]
    assert outcomes == ["failed", "failed", "completed"]

    still = await h.get_run(bob, bob_thread, bobs["id"])
    assert still["status"] == "running" and still["error"] is None
    h.controls.gate.set()
    done = await h.wait_run(bob, bob_thread, bobs["id"])
    assert done["status"] == "completed"
    assert done["result"]["text"] == "12*7 = 84."
    assert h.controls.cancelled == []


# --- metrics ---


async def test_metrics_count_finished_runs_tool_calls_and_durations(h: Harness) -> None:
    user = await h.user()
    threads = [await h.thread(user) for _ in range(4)]
    completed = [await h.start(user, t, "what is 12*7?", agent="demo") for t in threads[:2]]
    failed = await h.start(user, threads[2], "what is 1+1?", agent="broken")
    blocked = await h.start(user, threads[3], "what is 1+2?", agent="blocker")
    await h.wait_tool_started(blocked["id"])
    assert (await h.cancel(user, threads[3], blocked["id"])).status_code == 200
    for thread, run in [*zip(threads, completed, strict=False), (threads[2], failed)]:
        await h.wait_run(user, thread, run["id"])
    await h.wait_run(user, threads[3], blocked["id"])
    await h.wait_idle(user)

    samples = await metric_samples(h.client)

    def finished(status: str) -> float:
        return samples.get(("threadline_runs_finished_total", (("status", status),)), 0.0)

    assert finished("completed") == 2
    assert finished("failed") == 1
    assert finished("cancelled") == 1
    assert finished("timed_out") == 0
    assert samples[("threadline_tool_calls_total", ())] >= 2
    assert samples[("threadline_run_duration_seconds_count", ())] == 4
    assert samples[("threadline_run_duration_seconds_sum", ())] > 0
    assert samples[("threadline_runs_started_total", ())] == 4
    assert samples[("threadline_runs", (("status", "completed"),))] == 2
    assert samples[("threadline_runs_active", ())] == 0


async def test_tool_calls_metric_counts_calls_of_runs_that_did_not_complete(h: Harness) -> None:
    """A tool call that ran to completion counts, however its run ends afterwards."""
    hold_the_model_after_tools(h)
    user = await h.user()
    thread = await h.thread(user)
    run = await h.start(user, thread, "what is 12*7?", agent="counter")
    await wait_until(lambda: h.controls.model_held, what="the model step after the tool")
    assert h.controls.invocations[run["id"]] == 1  # the tool ran, and finished
    assert (await h.cancel(user, thread, run["id"])).status_code == 200
    assert (await h.wait_run(user, thread, run["id"]))["status"] == "cancelled"
    await h.wait_idle(user)

    samples = await metric_samples(h.client)
    assert samples[("threadline_runs_finished_total", (("status", "cancelled"),))] == 1
    assert samples[("threadline_tool_calls_total", ())] == 1


async def test_cancelling_a_queued_run_counts_it_as_finished(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    first = await h.start(user, thread, "what is 1+1?", agent="blocker")
    queued = await h.start(user, thread, "what is 2+2?", agent="blocker")
    cancelled = await h.cancel(user, thread, queued["id"])
    assert cancelled.json()["status"] == "cancelled"
    h.controls.gate.set()
    await h.wait_run(user, thread, first["id"])
    await h.wait_idle(user)

    samples = await metric_samples(h.client)
    assert samples.get(("threadline_runs_finished_total", (("status", "completed"),))) == 1
    assert samples.get(("threadline_runs_finished_total", (("status", "cancelled"),))) == 1
