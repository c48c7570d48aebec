"""The offline demo model and the demo agent's tools, alone and through the agent loop."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from tests.fakes.scripted_model import RecordingSink, run_context
from threadline.agents.demo import calculator, clock, demo_agent, evaluate_arithmetic
from threadline.agents.loop import run_agent
from threadline.llm.demo import DemoProvider, find_arithmetic
from threadline.llm.types import (
    ChatMessage,
    ModelEvent,
    ModelProvider,
    ModelProviderError,
    ModelRequest,
    ReasoningDelta,
    ResponseCompleted,
    Role,
    TextDelta,
    ToolCallRequested,
)

pytestmark = pytest.mark.unit


def ask(question: str, *, tools: bool = True) -> ModelRequest:
    specs = demo_agent().tool_specs if tools else ()
    return ModelRequest("Be brief.", (ChatMessage(Role.USER, question),), specs)


async def collect(provider: DemoProvider, request: ModelRequest) -> list[ModelEvent]:
    return [event async for event in provider.stream(request, model="demo")]


def test_demo_provider_is_a_model_provider() -> None:
    assert isinstance(DemoProvider(), ModelProvider)
    assert DemoProvider().name == "demo"


async def test_arithmetic_question_calls_the_calculator() -> None:
    events = await collect(DemoProvider(), ask("what is 12*7?"))
    assert isinstance(events[0], ReasoningDelta)
    calls = [e.call for e in events if isinstance(e, ToolCallRequested)]
    assert [(c.name, c.arguments) for c in calls] == [("calculator", {"expression": "12*7"})]
    assert calls[0].call_id.startswith("call_")
    assert isinstance(events[-1], ResponseCompleted)
    assert events[-1].stop_reason == "tool_calls"
    assert events[-1].usage.input_tokens > 0 and events[-1].usage.output_tokens > 0


async def test_responses_are_deterministic() -> None:
    first = await collect(DemoProvider(), ask("compute (3+4)*2"))
    second = await collect(DemoProvider(), ask("compute (3+4)*2"))
    other = await collect(DemoProvider(), ask("compute (3+4)*3"))
    assert first == second
    assert first[1] != other[1]  # another conversation, another call id


@pytest.mark.parametrize(
    ("text", "expression"),
    [
        ("what is 12*7?", "12*7"),
        ("compute (3+4)*2", "(3+4)*2"),
        ("add 2 and 3", "2+3"),
        ("Subtract 4 from 10", "10-4"),
        ("multiply 6 by 7 please", "6*7"),
        ("what's 9 divided by 3", "9/3"),
        ("(what is 2 ^ 10)", "2 ** 10"),
        ("hello there", None),
        ("I have 3 cats", None),
    ],
)
def test_find_arithmetic(text: str, expression: str | None) -> None:
    assert find_arithmetic(text) == expression


async def test_time_question_calls_the_clock_with_a_timezone() -> None:
    events = await collect(DemoProvider(), ask("What time is it in Europe/Paris?"))
    (call,) = [e.call for e in events if isinstance(e, ToolCallRequested)]
    assert (call.name, call.arguments) == ("clock", {"timezone": "Europe/Paris"})


async def test_without_tools_it_answers_in_several_chunks() -> None:
    events = await collect(DemoProvider(), ask("what is 12*7?", tools=False))
    chunks = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(chunks) > 3
    assert "".join(chunks).startswith('You said: "what is 12*7?".')
    assert not any(isinstance(e, ToolCallRequested) for e in events)
    assert isinstance(events[-1], ResponseCompleted) and events[-1].stop_reason == "stop"


async def test_fail_with_raises_a_provider_error_after_reasoning() -> None:
    seen: list[ModelEvent] = []
    with pytest.raises(ModelProviderError, match="scripted outage"):
        async for event in DemoProvider(fail_with="scripted outage").stream(
            ask("hi"), model="demo"
        ):
            seen.append(event)
    assert len(seen) == 1 and isinstance(seen[0], ReasoningDelta)


async def test_a_slow_stream_is_cancellable() -> None:
    seen: list[ModelEvent] = []
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            async for event in DemoProvider(delay_seconds=60).stream(ask("hi"), model="demo"):
                seen.append(event)
    assert len(seen) == 1


async def test_the_demo_agent_answers_arithmetic_end_to_end() -> None:
    sink = RecordingSink()
    outcome = await run_agent(
        demo_agent(),
        history=[ChatMessage(Role.USER, "what is 12*7?")],
        context=run_context(agent_name="demo"),
        provider=DemoProvider(),
        model="demo",
        sink=sink,
    )
    assert outcome.final_text == "12*7 = 84."
    assert outcome.steps == 2
    assert sink.kinds().count("text_delta") > 1
    ((_, _, result),) = sink.of_kind("tool_completed")
    assert result.content == "84"  # type: ignore[attr-defined]


async def test_the_demo_agent_reports_tool_errors() -> None:
    sink = RecordingSink()
    outcome = await run_agent(
        demo_agent(),
        history=[ChatMessage(Role.USER, "What time is it in Mars/Olympus?")],
        context=run_context(agent_name="demo"),
        provider=DemoProvider(),
        model="demo",
        sink=sink,
    )
    assert outcome.final_text == (
        "The clock tool reported an error: ValueError: unknown time zone 'Mars/Olympus'"
    )


@pytest.mark.parametrize(
    ("expression", "result"),
    [
        ("12*7", "84"),
        ("(3+4)*2", "14"),
        ("7/2", "3.5"),
        ("6/2", "3"),
        ("2**10", "1024"),
        ("-3 + +5", "2"),
        ("10//3", "3"),
        ("10 % 3", "1"),
        ("0.1+0.2", "0.3"),
        ("2**-1", "0.5"),
    ],
)
async def test_calculator_evaluates_arithmetic(expression: str, result: str) -> None:
    outcome = await calculator.invoke({"expression": expression}, run_context())
    assert (outcome.content, outcome.is_error) == (result, False)


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "x + 1",
        "abs(-1)",
        "(1).__class__",
        "[1, 2]",
        "'a' * 3",
        "True + 1",
        "1 if 1 else 2",
        "2 ** 100000",
        "(9 ** 999) ** 999",
        "10.0 ** 400",
        "(-8) ** 0.5",
        "1 / 0",
        "1 +",
        "",
        "1+" * 150 + "1",
    ],
)
async def test_calculator_refuses_anything_but_bounded_arithmetic(expression: str) -> None:
    with pytest.raises(ValueError):
        evaluate_arithmetic(expression)
    outcome = await calculator.invoke({"expression": expression}, run_context())
    assert outcome.is_error and outcome.content.startswith("ValueError: ")


async def test_clock_returns_an_aware_iso_time() -> None:
    utc = await clock.invoke({}, run_context())
    paris = await clock.invoke({"timezone": "Europe/Paris"}, run_context())
    assert datetime.fromisoformat(utc.content).utcoffset() is not None
    assert datetime.fromisoformat(paris.content).tzinfo is not None


async def test_clock_refuses_unknown_timezones() -> None:
    for bad in ("Mars/Olympus", "../../etc/passwd"):
        outcome = await clock.invoke({"timezone": bad}, run_context())
        assert outcome.is_error and "unknown time zone" in outcome.content
