"""Guarantee (a): however a run ends mid-tool-call, the thread's history stays valid for every
provider. On both backends, a run is cancelled, interrupted, failed or timed out with a tool call
outstanding; then the stored history has a result for every call, and the next runs on the
thread, through the OpenAI-compatible provider and the Anthropic provider (local fake servers
speaking their wire formats), send requests in which every tool call is answered."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import TestUser
from tests.fakes.llm_servers import FakeAnthropicServer, FakeOpenAIServer, Reply, Text
from tests.integration.test_runs_support import (
    Harness,
    run_settings,
    running_app,
    unanswered_in_anthropic_request,
    unanswered_in_openai_request,
    unanswered_in_thread,
)
from threadline.agents.history import INCOMPLETE_TOOL_CALL

pytestmark = pytest.mark.integration

# How the first run ends, the agent that gets it there, and the status it ends with.
DISRUPTIONS = {
    "cancel": ("blocker", "cancelled"),
    "interrupt": ("blocker", "cancelled"),
    "failure": ("one-step", "failed"),
    "timeout": ("sleeper", "timed_out"),
}


async def _disrupt(h: Harness, user: TestUser, thread: str, disruption: str) -> dict[str, Any]:
    """Start a run that asks for a tool and end it the given way, with its call outstanding.
    For `interrupt`, the interrupting run is the OpenAI one; return the disrupted run."""
    agent, status = DISRUPTIONS[disruption]
    run = await h.start(user, thread, "what is 12*7?", agent=agent)
    if disruption in ("cancel", "interrupt"):
        await h.wait_tool_started(run["id"])
    if disruption == "cancel":
        assert (await h.cancel(user, thread, run["id"])).status_code == 200
    if disruption == "interrupt":
        await h.start(user, thread, "never mind", agent="openai-fake", strategy="interrupt")
    ended = await h.wait_run(user, thread, run["id"])
    assert ended["status"] == status, ended
    return ended


def _openai_answers(body: dict[str, Any], call_id: str) -> dict[str, Any]:
    (calling,) = [
        m
        for m in body["messages"]
        if m["role"] == "assistant" and any(c["id"] == call_id for c in m.get("tool_calls") or ())
    ]
    (answer,) = [m for m in body["messages"] if m.get("tool_call_id") == call_id]
    assert body["messages"].index(answer) == body["messages"].index(calling) + 1
    return answer


def _anthropic_answer(body: dict[str, Any], call_id: str) -> dict[str, Any]:
    blocks = [b for m in body["messages"] if isinstance(m["content"], list) for b in m["content"]]
    assert [b["type"] for b in blocks if b.get("id") == call_id] == ["tool_use"]
    (answer,) = [b for b in blocks if b.get("tool_use_id") == call_id]
    return answer


@pytest.mark.parametrize("disruption", list(DISRUPTIONS))
async def test_history_stays_valid_for_every_provider(
    settings_factory,
    openai_server: FakeOpenAIServer,
    anthropic_server: FakeAnthropicServer,
    disruption: str,
) -> None:
    openai_server.reset()
    anthropic_server.reset()
    openai_server.script(Reply(Text("Picking up after the disruption.")))
    anthropic_server.script(Reply(Text("Still here.")))
    settings = run_settings(
        settings_factory,
        openai_url=openai_server.base_url,
        anthropic_url=anthropic_server.base_url,
        run_timeout_seconds=2 if disruption == "timeout" else 300,
    )
    async with running_app(settings) as h:
        user = await h.user()
        thread = await h.thread(user)
        disrupted = await _disrupt(h, user, thread, disruption)

        stored = await h.messages(user, thread)
        assert unanswered_in_thread(stored) == []
        (calling,) = [m for m in stored if m["run_id"] == disrupted["id"] and m["tool_calls"]]
        (call,) = calling["tool_calls"]
        (result,) = [m for m in stored if m["tool_call_id"] == call["id"]]
        assert result["run_id"] == disrupted["id"]
        assert result["content"] == INCOMPLETE_TOOL_CALL
        assert result["metadata"]["is_error"] is True

        if disruption != "interrupt":  # the interrupting run was the OpenAI one
            await h.start(user, thread, "are you still there?", agent="openai-fake")
        anthropic_run = await h.start(user, thread, "one more time", agent="anthropic-fake")
        done = await h.wait_run(user, thread, anthropic_run["id"])
        assert done["status"] == "completed", done
        runs = await h.list_runs(user, thread)
        assert [r["status"] for r in runs] == ["completed", "completed", disrupted["status"]]

        (openai_request,) = [r.json for r in openai_server.requests]
        assert unanswered_in_openai_request(openai_request) == []
        assert _openai_answers(openai_request, call["id"])["content"] == INCOMPLETE_TOOL_CALL

        (anthropic_request,) = [r.json for r in anthropic_server.requests]
        assert unanswered_in_anthropic_request(anthropic_request) == []
        answer = _anthropic_answer(anthropic_request, call["id"])
        assert answer["content"] == INCOMPLETE_TOOL_CALL and answer["is_error"] is True

        assert unanswered_in_thread(await h.messages(user, thread)) == []
