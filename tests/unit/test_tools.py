"""Tools: schemas from type hints and docstrings, and invoke's error-as-result contract."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import pytest
from pydantic import BaseModel

from tests.fakes.scripted_model import run_context
from threadline.agents import RunContext, Tool, ToolResult, tool
from threadline.agents.tools import ToolDefinitionError, serialize_result

pytestmark = pytest.mark.unit


class Point(BaseModel):
    x: int
    y: int


@dataclass
class Deps:
    greeting: str


@tool
def search(
    query: str,
    tags: list[int],
    mode: Literal["fast", "exact"],
    point: Point,
    limit: int = 3,
    cursor: str | None = None,
) -> str:
    """Search the catalogue.

    Looks through every item, slowly.

    Args:
        query: Words to look for.
        tags: Tag ids that results
            must all carry.
        mode (str): How to match.
        point: Where to search around.
        limit: Most results to return.

    Returns:
        The matches, one per line.
    """
    return query


def test_description_comes_from_the_docstring_body() -> None:
    assert search.name == "search"
    assert search.description == "Search the catalogue.\n\nLooks through every item, slowly."


def test_schema_comes_from_type_hints() -> None:
    schema = search.parameters
    props = schema["properties"]
    assert isinstance(props, dict)
    assert props["query"]["type"] == "string"
    assert props["tags"]["type"] == "array"
    assert props["tags"]["items"] == {"type": "integer"}
    assert props["mode"]["enum"] == ["fast", "exact"]
    assert props["limit"]["default"] == 3
    assert props["limit"]["type"] == "integer"
    assert {"type": "null"} in props["cursor"]["anyOf"]
    assert props["cursor"]["default"] is None
    assert props["point"]["$ref"] == "#/$defs/Point"
    assert schema["$defs"]["Point"]["required"] == ["x", "y"]  # type: ignore[index]
    assert schema["required"] == ["query", "tags", "mode", "point"]
    assert schema["additionalProperties"] is False
    assert "title" not in schema


def test_parameter_descriptions_come_from_the_args_section() -> None:
    props = search.parameters["properties"]
    assert isinstance(props, dict)
    assert props["query"]["description"] == "Words to look for."
    assert props["tags"]["description"] == "Tag ids that results must all carry."
    assert props["mode"]["description"] == "How to match."
    assert "description" not in props["cursor"]


def test_spec_is_a_copy() -> None:
    spec = search.spec
    assert (spec.name, spec.description) == (search.name, search.description)
    spec.parameters["properties"] = {}
    assert search.spec.parameters["properties"] != {}


def test_options_override_name_description_and_timeout() -> None:
    @tool(name="add-up", description="Adds.", timeout_seconds=2)
    def add(a: int, b: int) -> int:
        """Ignored."""
        return a + b

    assert isinstance(add, Tool)
    assert (add.name, add.description, add.timeout_seconds) == ("add-up", "Adds.", 2)


def test_parameters_named_like_basemodel_attributes_work() -> None:
    @tool
    def odd(json: str, schema: int, model_config: bool = False) -> str:
        return f"{json}{schema}{model_config}"

    props = odd.parameters["properties"]
    assert isinstance(props, dict)
    assert set(props) == {"json", "schema", "model_config"}


async def test_run_context_is_injected_and_not_in_the_schema() -> None:
    @tool
    def greet(ctx: RunContext[Deps], name: str) -> str:
        return f"{ctx.deps.greeting}, {name} (run {ctx.run_id})"

    @tool
    async def who(ctx: RunContext) -> str:  # type: ignore[type-arg]
        return ctx.agent_name

    assert greet.parameters["properties"] == {"name": {"title": "Name", "type": "string"}}
    assert who.parameters["properties"] == {}
    ctx = run_context(Deps("Hello"), agent_name="greeter")
    result = await greet.invoke({"name": "Ada"}, ctx)
    assert result == ToolResult(f"Hello, Ada (run {ctx.run_id})", False, result.duration_ms)
    assert (await who.invoke({}, ctx)).content == "greeter"


@pytest.mark.parametrize(
    "source",
    [
        "def f(x): return x",
        "def f(*args: int) -> int: return 0",
        "def f(**kwargs: int) -> int: return 0",
        "def f(x: int, ctx: RunContext) -> int: return x",
        "def f(*, ctx: RunContext, x: int) -> int: return x",
    ],
)
def test_misdeclared_functions_are_refused(source: str) -> None:
    namespace: dict[str, object] = {"RunContext": RunContext}
    exec(source, namespace)
    with pytest.raises(ToolDefinitionError) as info:
        Tool.from_function(namespace["f"])  # type: ignore[arg-type]
    assert info.value.code == "tool_definition_error"


def test_bad_names_and_timeouts_are_refused() -> None:
    with pytest.raises(ToolDefinitionError):
        tool(lambda x: x)
    with pytest.raises(ToolDefinitionError):
        tool(name="has space")(search.function)
    with pytest.raises(ToolDefinitionError):
        tool(timeout_seconds=0)(search.function)


async def test_sync_tools_run_off_the_event_loop_thread() -> None:
    seen: list[threading.Thread] = []

    @tool
    def where() -> str:
        seen.append(threading.current_thread())
        return "ok"

    result = await where.invoke({}, run_context())
    assert result.content == "ok" and not result.is_error
    assert seen and seen[0] is not threading.current_thread()


async def test_async_tool_result_is_serialized() -> None:
    @tool
    async def point(x: int) -> Point:
        return Point(x=x, y=2)

    result = await point.invoke({"x": "5"}, run_context())  # lax: "5" is accepted as 5
    assert result == ToolResult('{"x":5,"y":2}', False, result.duration_ms)
    assert result.duration_ms >= 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain text", "plain text"),
        ({"a": [1, 2]}, '{"a":[1,2]}'),
        ([1, "b"], '[1,"b"]'),
        (None, "null"),
        (42, "42"),
        (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), '"2024-01-02T03:04:05Z"'),
        (Point(x=1, y=2), '{"x":1,"y":2}'),
    ],
)
def test_serialize_result(value: object, expected: str) -> None:
    assert serialize_result(value) == expected


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({}, "- a: Field required"),
        ({"a": "many"}, "- a: Input should be a valid integer"),
        ({"a": 1, "c": 2}, "- c: Extra inputs are not permitted"),
    ],
)
async def test_invalid_arguments_become_an_error_result(
    arguments: dict[str, object], fragment: str
) -> None:
    @tool
    def double(a: int) -> int:
        return a * 2

    result = await double.invoke(arguments, run_context())
    assert result.is_error
    assert "Invalid arguments for tool 'double'" in result.content
    assert fragment in result.content


async def test_raising_tool_becomes_an_error_result() -> None:
    @tool
    def broken() -> str:
        raise ValueError("boom")

    result = await broken.invoke({}, run_context())
    assert result.is_error and result.content == "ValueError: boom"


async def test_timeout_becomes_an_error_result() -> None:
    @tool(timeout_seconds=0.05)
    async def stuck() -> str:
        await asyncio.Event().wait()
        return "never"

    result = await stuck.invoke({}, run_context())
    assert result.is_error
    assert result.content == "Tool 'stuck' timed out after 0.05 seconds"


async def test_agent_default_timeout_applies_to_sync_tools() -> None:
    release = threading.Event()

    @tool
    def blocking() -> str:
        release.wait(timeout=10)
        return "late"

    try:
        result = await blocking.invoke({}, run_context(), default_timeout_seconds=0.05)
    finally:
        release.set()  # let the worker thread finish: threads cannot be cancelled
    assert result.is_error and "timed out" in result.content


async def test_a_timeout_raised_by_the_tool_itself_is_a_plain_error() -> None:
    @tool
    async def flaky() -> str:
        raise TimeoutError("upstream took too long")

    result = await flaky.invoke({}, run_context())
    assert result.is_error and result.content == "TimeoutError: upstream took too long"


async def test_cancellation_propagates_into_async_tools() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    @tool
    async def wait_forever() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    task = asyncio.create_task(wait_forever.invoke({}, run_context()))
    async with asyncio.timeout(5):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()


async def test_positional_only_parameters_are_passed_positionally() -> None:
    @tool
    def minus(a: int, /, b: int = 1) -> int:
        return a - b

    assert (await minus.invoke({"a": 5, "b": 2}, run_context())).content == "3"
