"""The agent loop against a scripted model: event order, tools, limits, resume, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tests.fakes.scripted_model import (
    RecordingSink,
    ScriptedModel,
    ScriptItem,
    WaitFor,
    call,
    run_context,
    text,
    tool_calls,
)
from threadline.agents import Agent, RunContext, Tool, ToolResult, tool
from threadline.agents.errors import MaxStepsExceededError
from threadline.agents.history import INCOMPLETE_TOOL_CALL
from threadline.agents.loop import AgentOutcome, run_agent
from threadline.llm.types import (
    ChatMessage,
    ModelProviderError,
    ReasoningDelta,
    ResponseCompleted,
    Role,
    TextDelta,
    Usage,
)

pytestmark = pytest.mark.unit

QUESTION = ChatMessage(Role.USER, "What is the weather?")


@tool
def weather(city: str) -> str:
    """Current weather in a city."""
    return f"Sunny in {city}"


def make_agent(*tools: Tool, max_steps: int = 8) -> Agent:
    return Agent.create(
        "tester", instructions="Be brief.", model="scripted", tools=tools, max_steps=max_steps
    )


async def run(
    agent: Agent,
    model: ScriptedModel,
    history: Sequence[ChatMessage] = (QUESTION,),
    *,
    sink: RecordingSink | None = None,
    context: RunContext[object] | None = None,
    idle_timeout: float = 5,
) -> tuple[AgentOutcome, RecordingSink]:
    sink = sink or RecordingSink()
    outcome = await run_agent(
        agent,
        history=history,
        context=context or run_context(),
        provider=model,
        model="scripted-1",
        sink=sink,
        model_idle_timeout_seconds=idle_timeout,
    )
    return outcome, sink


async def test_a_final_answer_streams_and_ends_the_run() -> None:
    model = ScriptedModel([[ReasoningDelta("Hmm."), *text("It is sunny.", usage=Usage(7, 3))]])
    outcome, sink = await run(make_agent(weather), model)
    assert outcome == AgentOutcome("It is sunny.", Usage(7, 3), 1)
    assert sink.events == [
        ("step_started",),
        ("thinking", "Hmm."),
        ("text_delta", "It "),
        ("text_delta", "is "),
        ("text_delta", "sunny."),
        ("assistant_message", ChatMessage(Role.ASSISTANT, "It is sunny.")),
    ]
    (request,) = model.requests
    assert request.instructions == "Be brief."
    assert request.messages == (QUESTION,)
    assert [spec.name for spec in request.tools] == ["weather"]
    assert model.models == ["scripted-1"]


async def test_tool_step_events_come_in_order_and_results_reach_the_model() -> None:
    lookup = call("weather", city="Paris")
    model = ScriptedModel(
        [tool_calls(lookup, usage=Usage(5, 1)), text("Sunny.", usage=Usage(9, 1))]
    )
    outcome, sink = await run(make_agent(weather), model)

    assert outcome == AgentOutcome("Sunny.", Usage(14, 2), 2)
    assert sink.kinds() == [
        "step_started",
        "assistant_message",
        "tool_executing",
        "tool_completed",
        "step_started",
        "text_delta",
        "assistant_message",
    ]
    # Each write says what follows it: the tools, then (the last result) the next model call.
    assert sink.hints == [("final", False), ("last", True), ("final", True)]
    assert sink.events[1] == ("assistant_message", ChatMessage(Role.ASSISTANT, "", (lookup,)))
    _, completed_call, result = sink.events[3]
    assert completed_call == lookup
    assert isinstance(result, ToolResult) and result.content == "Sunny in Paris"
    assert model.requests[1].messages[1:] == (
        ChatMessage(Role.ASSISTANT, "", (lookup,)),
        ChatMessage(Role.TOOL, "Sunny in Paris", tool_call_id=lookup.call_id, tool_name="weather"),
    )


async def test_tool_calls_of_one_step_run_concurrently() -> None:
    arrived = 0
    both_started = asyncio.Event()

    async def rendezvous() -> str:
        # Each call waits for the other: this only finishes if both run at the same time.
        nonlocal arrived
        arrived += 1
        if arrived == 2:
            both_started.set()
        await both_started.wait()
        return "met"

    first = tool(name="first", timeout_seconds=5)(rendezvous)
    second = tool(name="second", timeout_seconds=5)(rendezvous)
    model = ScriptedModel([tool_calls(call("first"), call("second")), text("Done.")])
    outcome, sink = await run(make_agent(first, second), model)

    results = [event[2] for event in sink.of_kind("tool_completed")]
    assert [r.content for r in results if isinstance(r, ToolResult)] == ["met", "met"]
    assert sink.kinds()[2:6] == [
        "tool_executing",
        "tool_executing",
        "tool_completed",
        "tool_completed",
    ]
    # Only the second call to finish is the step's last one.
    assert sink.hints[1:3] == [("last", False), ("last", True)]
    assert outcome.final_text == "Done."


async def test_unknown_tool_is_an_error_result_for_the_model() -> None:
    ghost = call("teleport", place="Mars")
    model = ScriptedModel([tool_calls(ghost), text("Sorry.")])
    outcome, sink = await run(make_agent(weather), model)

    ((_, _, result),) = sink.of_kind("tool_completed")
    assert isinstance(result, ToolResult) and result.is_error
    assert result.content == "Unknown tool 'teleport'. Available tools: weather."
    tool_reply = model.requests[1].messages[-1]
    assert (tool_reply.role, tool_reply.is_error, tool_reply.tool_call_id) == (
        Role.TOOL,
        True,
        ghost.call_id,
    )
    assert outcome.final_text == "Sorry."


async def test_failing_tool_does_not_end_the_run() -> None:
    @tool
    def broken() -> str:
        raise RuntimeError("disk on fire")

    model = ScriptedModel([tool_calls(call("broken")), text("It failed.")])
    outcome, _ = await run(make_agent(broken), model)
    assert model.requests[1].messages[-1].content == "RuntimeError: disk on fire"
    assert outcome.final_text == "It failed."


async def test_run_context_reaches_tools() -> None:
    @tool
    def whoami(ctx: RunContext[dict[str, str]]) -> str:
        return f"{ctx.user.user_id}/{ctx.deps['role']}"

    ctx = run_context({"role": "admin"})
    model = ScriptedModel([tool_calls(call("whoami")), text("ok")])
    await run(make_agent(whoami), model, context=ctx)
    assert model.requests[1].messages[-1].content == f"{ctx.user.user_id}/admin"


async def test_max_steps_ends_the_run_without_running_the_last_tools() -> None:
    runs = 0

    @tool
    def again() -> str:
        nonlocal runs
        runs += 1
        return "more"

    model = ScriptedModel([tool_calls(call("again", "c1")), tool_calls(call("again", "c2"))])
    sink = RecordingSink()
    with pytest.raises(MaxStepsExceededError) as info:
        await run(make_agent(again, max_steps=2), model, sink=sink)
    assert (info.value.code, info.value.max_steps, info.value.agent) == (
        "max_steps_exceeded",
        2,
        "tester",
    )
    assert runs == 1
    assert len(model.requests) == 2
    # The last step's calls are never run: its message is the run's last write.
    assert sink.hints[-1] == ("final", True)


async def test_resume_runs_only_the_calls_missing_a_result() -> None:
    executed: list[str] = []

    @tool
    def fetch(key: str) -> str:
        executed.append(key)
        return key.upper()

    done, missing = call("fetch", "c1", key="a"), call("fetch", "c2", key="b")
    history = [
        QUESTION,
        ChatMessage(Role.ASSISTANT, "", (done, missing)),
        ChatMessage(Role.TOOL, "A", tool_call_id="c1", tool_name="fetch"),
    ]
    model = ScriptedModel([text("A and B.")])
    outcome, sink = await run(make_agent(fetch), model, history)

    assert executed == ["b"]
    assert sink.kinds() == [
        "tool_executing",
        "tool_completed",
        "step_started",
        "text_delta",
        "text_delta",
        "text_delta",
        "assistant_message",
    ]
    assert [m.content for m in model.requests[0].messages[2:]] == ["A", "B"]
    assert outcome == AgentOutcome("A and B.", Usage(3, 3), 1)


async def test_interrupted_earlier_calls_are_repaired_before_the_model_sees_them() -> None:
    lost = call("weather", "old", city="Oslo")
    history = [
        ChatMessage(Role.USER, "Weather in Oslo?"),
        ChatMessage(Role.ASSISTANT, "", (lost,)),
        QUESTION,
    ]
    model = ScriptedModel([text("Sunny.")])
    await run(make_agent(weather), model, history)
    sent = model.requests[0].messages
    assert sent[2] == ChatMessage(
        Role.TOOL, INCOMPLETE_TOOL_CALL, tool_call_id="old", tool_name="weather", is_error=True
    )
    assert sent[3] == QUESTION


async def test_a_stream_that_stops_early_is_a_retryable_provider_error() -> None:
    model = ScriptedModel([[TextDelta("Half an ans")]])
    with pytest.raises(ModelProviderError) as info:
        await run(make_agent(), model)
    assert info.value.retryable and info.value.provider == "scripted"


async def test_a_silent_model_times_out() -> None:
    model = ScriptedModel([[TextDelta("Wait"), WaitFor()]])
    with pytest.raises(ModelProviderError, match="sent nothing"):
        await run(make_agent(), model, idle_timeout=0.05)
    assert model.closed_streams == 1


async def test_cancelling_the_run_stops_the_model_stream() -> None:
    streaming = asyncio.Event()

    def script(_: object) -> list[ScriptItem]:
        streaming.set()
        return [TextDelta("partial"), WaitFor()]

    model = ScriptedModel([script])
    task = asyncio.create_task(run(make_agent(), model))
    async with asyncio.timeout(5):
        await streaming.wait()
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert model.closed_streams == 1


async def test_cancelling_the_run_cancels_running_tools() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    @tool
    async def slow() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return "never"

    sink = RecordingSink()
    model = ScriptedModel([tool_calls(call("slow"))])
    task = asyncio.create_task(run(make_agent(slow), model, sink=sink))
    async with asyncio.timeout(5):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()
    assert sink.kinds()[-1] == "tool_executing"  # never reported as completed


async def test_responses_with_only_completion_are_empty_answers() -> None:
    model = ScriptedModel([[ResponseCompleted()]])
    outcome, sink = await run(make_agent(), model)
    assert outcome == AgentOutcome("", Usage(), 1)
    assert sink.events[-1] == ("assistant_message", ChatMessage(Role.ASSISTANT, ""))
