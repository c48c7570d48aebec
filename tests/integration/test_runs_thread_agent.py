"""Agents working inside a thread (C3, C4, C5), on both backends: a run answers on a thread
that already has history, several agents take turns on one thread, the thread's history is the
model's context (bounded by `Agent.history_window`), and nothing of a run is left behind in the
engine once it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.fakes.llm_servers import FakeOpenAIServer, Reply, Text, ToolUse
from tests.integration.test_runs_support import (
    Harness,
    run_settings,
    running_app,
    unanswered_in_openai_request,
    unanswered_in_thread,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def h(settings_factory, openai_server: FakeOpenAIServer) -> AsyncIterator[Harness]:
    openai_server.reset()
    async with running_app(run_settings(settings_factory, openai_url=openai_server.base_url)) as h:
        yield h


def _conversation(request_body: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(role, content) of each message the model was sent."""
    return [(m["role"], m.get("content")) for m in request_body["messages"]]


async def test_run_answers_in_a_thread_with_prior_messages(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    prior = ["hello", "I have a question", "about arithmetic"]
    for content in prior:
        assert (await h.post(user, thread, content)).status_code == 201

    run = await h.start(user, thread, "what is 12*7?", agent="demo")
    done = await h.wait_run(user, thread, run["id"])
    assert done["status"] == "completed", done

    messages = await h.messages(user, thread)
    assert [m["position"] for m in messages] == list(range(1, 8))
    assert [m["content"] for m in messages[:4]] == [*prior, "what is 12*7?"]
    assert [m["run_id"] for m in messages[:4]] == [None] * 4
    assert [(m["role"], m["run_id"]) for m in messages[4:]] == [
        ("assistant", run["id"]),
        ("tool", run["id"]),
        ("assistant", run["id"]),
    ]
    assert messages[-1]["content"] == "12*7 = 84." == done["result"]["text"]
    thread_out = (await h.client.get(f"/v1/threads/{thread}", headers=user.headers)).json()
    assert thread_out["message_count"] == 7


async def test_several_agents_take_turns_on_one_thread(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    turns = [
        ("echo", "hello there", 'You said: "hello there"'),
        ("counter", "what is 2*3?", "2*3 = 6 (invocation 1)."),
        ("demo", "what is 12*7?", "12*7 = 84."),
        ("echo", "thanks", 'You said: "thanks"'),
    ]
    run_ids = []
    for agent, question, expected in turns:
        run = await h.start(user, thread, question, agent=agent)
        done = await h.wait_run(user, thread, run["id"])
        assert done["status"] == "completed", done
        assert done["agent"] == agent
        assert expected in done["result"]["text"]
        run_ids.append(run["id"])

    runs = await h.list_runs(user, thread)
    assert [r["id"] for r in runs] == run_ids[::-1]  # newest first
    assert [r["agent"] for r in runs] == [agent for agent, _, _ in turns][::-1]

    messages = await h.messages(user, thread)
    # Each run's messages follow its question, and each answer is the run's last message.
    for (_, question, expected), run_id in zip(turns, run_ids, strict=True):
        asked = next(i for i, m in enumerate(messages) if m["content"] == question)
        answers = [m for m in messages if m["run_id"] == run_id]
        assert answers and all(m["position"] > messages[asked]["position"] for m in answers)
        assert expected in answers[-1]["content"]
    assert unanswered_in_thread(messages) == []
    assert h.controls.invocations == {run_ids[1]: 1}


async def test_thread_history_is_the_models_context(
    h: Harness, openai_server: FakeOpenAIServer
) -> None:
    openai_server.script(
        Reply(Text("First answer.")),
        Reply(ToolUse.split("call_sum", "calculator", {"expression": "2+3"})),
        Reply(Text("It is 5.")),
        Reply(Text("Short memory answer.")),
    )
    user = await h.user()
    thread = await h.thread(user)
    first = await h.start(user, thread, "first question", agent="openai-fake")
    assert (await h.wait_run(user, thread, first["id"]))["status"] == "completed"
    second = await h.start(user, thread, "what is 2+3?", agent="openai-fake")
    assert (await h.wait_run(user, thread, second["id"]))["status"] == "completed"
    third = await h.start(user, thread, "and now?", agent="openai-short")
    done = await h.wait_run(user, thread, third["id"])
    assert done["status"] == "completed", done
    assert done["result"]["text"] == "Short memory answer."

    requests = [r.json for r in openai_server.requests]
    assert len(requests) == 4
    system = ("system", "You are the OpenAI-compatible test agent.")
    assert _conversation(requests[0]) == [system, ("user", "first question")]
    assert _conversation(requests[1]) == [
        system,
        ("user", "first question"),
        ("assistant", "First answer."),
        ("user", "what is 2+3?"),
    ]
    # The step after the tool call sees the call and its result.
    assert _conversation(requests[2])[-2:] == [("assistant", None), ("tool", "5 (invocation 1)")]
    assert requests[2]["messages"][-2]["tool_calls"][0]["id"] == "call_sum"
    assert requests[2]["messages"][-1]["tool_call_id"] == "call_sum"
    assert [t["function"]["name"] for t in requests[0]["tools"]] == ["calculator"]

    # history_window=3 over [..., assistant(call), tool, assistant, user]: the last three
    # messages would open on a tool result without its call, so the window starts after it.
    assert _conversation(requests[3]) == [
        ("system", "You are the OpenAI-compatible test agent with a short memory."),
        ("assistant", "It is 5."),
        ("user", "and now?"),
    ]
    for body in requests:
        assert unanswered_in_openai_request(body) == []
        assert body["model"] == "fake"


async def test_history_window_bounds_the_context(
    h: Harness, openai_server: FakeOpenAIServer
) -> None:
    user = await h.user()
    thread = await h.thread(user)
    for i in range(6):
        assert (await h.post(user, thread, f"note {i}")).status_code == 201
    openai_server.script(Reply(Text("ok")))
    run = await h.start(user, thread, "last", agent="openai-short")
    assert (await h.wait_run(user, thread, run["id"]))["status"] == "completed"
    (request,) = openai_server.requests
    assert _conversation(request.json)[1:] == [
        ("user", "note 4"),
        ("user", "note 5"),
        ("user", "last"),
    ]


async def test_engine_keeps_nothing_of_finished_runs(h: Harness) -> None:
    user = await h.user()
    threads = [await h.thread(user) for _ in range(3)]
    runs = [
        await h.start(user, threads[0], "what is 12*7?", agent="demo"),
        await h.start(user, threads[1], "what is 1+1?", agent="broken"),
        await h.start(user, threads[2], "what is 2+2?", agent="blocker"),
    ]
    await h.wait_tool_started(runs[2]["id"])
    assert h.services.execution.running_for(user.id) >= 1
    assert runs[2]["id"] in h.services.execution.active_run_ids
    assert (await h.cancel(user, threads[2], runs[2]["id"])).status_code == 200
    statuses = [
        (await h.wait_run(user, thread, run["id"]))["status"]
        for thread, run in zip(threads, runs, strict=True)
    ]
    assert statuses == ["completed", "failed", "cancelled"]

    await h.wait_idle(user)
    execution = h.services.execution
    assert execution.active_run_ids == []
    assert execution.running_for(user.id) == 0
    assert execution._cancel_reasons == {}  # no reason left waiting for a run that ended
    assert h.controls.active == 0
