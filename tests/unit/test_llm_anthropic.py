"""AnthropicProvider against a local server speaking the Messages API event stream."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing

import anthropic
import pytest

from tests.fakes.llm_servers import (
    ErrorReply,
    FakeAnthropicServer,
    Pause,
    RawReply,
    Reasoning,
    Reply,
    StreamError,
    ToolUse,
    anthropic_sse,
)
from threadline.llm.anthropic import AnthropicProvider
from threadline.llm.types import (
    ChatMessage,
    ModelEvent,
    ModelProviderError,
    ModelRequest,
    ReasoningDelta,
    ResponseCompleted,
    Role,
    TextDelta,
    ToolCall,
    ToolCallRequested,
    ToolSpec,
    Usage,
)

pytestmark = pytest.mark.unit

MODEL = "claude-fake-model"  # not a real model: the SDK warns about deprecated names
HELLO = ModelRequest(instructions="Be brief.", messages=(ChatMessage(Role.USER, "Hi"),))


@pytest.fixture(scope="module")
def running_server() -> Iterator[FakeAnthropicServer]:
    with FakeAnthropicServer() as server:
        yield server


@pytest.fixture
def server(running_server: FakeAnthropicServer) -> Iterator[FakeAnthropicServer]:
    running_server.reset()
    yield running_server
    running_server.reset()


@pytest.fixture
async def provider(server: FakeAnthropicServer) -> AsyncIterator[AnthropicProvider]:
    provider = AnthropicProvider("test-key", base_url=server.base_url, timeout_seconds=5)
    yield provider
    await provider.aclose()


async def collect(provider: AnthropicProvider, request: ModelRequest = HELLO) -> list[ModelEvent]:
    async with asyncio.timeout(15):
        return [event async for event in provider.stream(request, model=MODEL)]


async def failure(provider: AnthropicProvider, request: ModelRequest = HELLO) -> ModelProviderError:
    with pytest.raises(ModelProviderError) as caught:
        await collect(provider, request)
    return caught.value


# --- streaming ---


async def test_text_streams_in_chunks_in_order(
    server: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    server.script(Reply("Hel", "lo, ", "world", input_tokens=12, output_tokens=3))

    events = await collect(provider)

    assert events == [
        TextDelta("Hel"),
        TextDelta("lo, "),
        TextDelta("world"),
        ResponseCompleted(usage=Usage(input_tokens=12, output_tokens=3), stop_reason="stop"),
    ]


async def test_tool_use_split_across_chunks_becomes_one_event(
    server: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    arguments = {"city": "Paris", "days": 3, "units": {"temp": "C"}}
    server.script(Reply(ToolUse.split("toolu_1", "get_weather", arguments, pieces=5)))

    events = await collect(provider)

    assert events[:-1] == [ToolCallRequested(ToolCall("toolu_1", "get_weather", arguments))]
    assert isinstance(events[-1], ResponseCompleted)
    assert events[-1].stop_reason == "tool_calls"


async def test_two_tool_uses_in_one_response(
    server: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    server.script(
        Reply(
            "Checking both.",
            ToolUse.split("toolu_a", "lookup", {"q": "alpha"}),
            ToolUse.split("toolu_b", "lookup", {"q": "beta"}),
        )
    )

    events = await collect(provider)

    assert events[:3] == [
        TextDelta("Checking both."),
        ToolCallRequested(ToolCall("toolu_a", "lookup", {"q": "alpha"})),
        ToolCallRequested(ToolCall("toolu_b", "lookup", {"q": "beta"})),
    ]
    assert isinstance(events[3], ResponseCompleted)


async def test_malformed_tool_input_does_not_crash(
    server: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    server.script(
        Reply(ToolUse("toolu_1", "search", ('{"query": ', "oops")), ToolUse("toolu_2", "now", ()))
    )

    events = await collect(provider)

    assert events[:2] == [
        ToolCallRequested(ToolCall("toolu_1", "search", {"_raw": '{"query": oops'})),
        ToolCallRequested(ToolCall("toolu_2", "now", {})),
    ]


async def test_thinking_becomes_reasoning_deltas(
    server: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    server.script(Reply(Reasoning("Thinking"), Reasoning(" hard."), "42"))

    events = await collect(provider)

    assert events[:3] == [ReasoningDelta("Thinking"), ReasoningDelta(" hard."), TextDelta("42")]


async def test_cached_prompt_tokens_count_as_input(
    server: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    message: dict[str, object] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 5,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": 1000,
            "output_tokens": 1,
        },
    }
    server.script(
        RawReply(
            anthropic_sse(
                {"type": "message_start", "message": message},
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "max_tokens"},
                    "usage": {"output_tokens": 9},
                },
                {"type": "message_stop"},
            )  # fmt: skip
        )
    )

    events = await collect(provider)

    assert events == [ResponseCompleted(Usage(input_tokens=1105, output_tokens=9), "length")]


# --- the request on the wire ---


async def test_request_carries_system_tools_and_tool_history(
    server: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    schema: dict[str, object] = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    request = ModelRequest(
        instructions="You are a weather bot.",
        messages=(
            ChatMessage(Role.USER, "Weather in Paris and Rome?"),
            ChatMessage(
                Role.ASSISTANT,
                "Let me look.",
                tool_calls=(
                    ToolCall("toolu_1", "get_weather", {"city": "Paris"}),
                    ToolCall("toolu_2", "get_weather", {"city": "Rome"}),
                ),
            ),
            ChatMessage(Role.TOOL, "18C and sunny", tool_call_id="toolu_1"),
            ChatMessage(Role.TOOL, "Service down", tool_call_id="toolu_2", is_error=True),
        ),
        tools=(ToolSpec("get_weather", "Current weather for a city.", schema),),
        max_tokens=256,
        temperature=0.2,
    )
    server.script(Reply("Paris is sunny."))

    await collect(provider, request)

    (sent,) = server.requests
    assert sent.path == "/v1/messages"
    # Older SDKs send the key as `x-api-key`, this one as a bearer token.
    bearer = sent.headers.get("authorization", "").removeprefix("Bearer ")
    assert "test-key" in (sent.headers.get("x-api-key"), bearer)
    assert "anthropic-version" in sent.headers
    body = sent.json
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["max_tokens"] == 256
    assert body["temperature"] == 0.2
    assert body["system"] == "You are a weather bot."
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "input_schema": schema,
        }
    ]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather",
                 "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C and sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "Service down",
                 "is_error": True},
            ],
        },
    ]  # fmt: skip


async def test_consecutive_same_role_messages_are_merged(
    server: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    request = ModelRequest(
        instructions="Base rules.",
        messages=(
            ChatMessage(Role.SYSTEM, "Extra rule."),
            ChatMessage(Role.USER, "First."),
            ChatMessage(Role.USER, "Second."),
            ChatMessage(Role.ASSISTANT, ""),
            ChatMessage(Role.ASSISTANT, "Answer."),
            ChatMessage(Role.ASSISTANT, "More."),
            ChatMessage(Role.USER, "Thanks."),
        ),
    )
    server.script(Reply("ok"))

    await collect(provider, request)

    body = server.requests[0].json
    assert body["system"] == "Base rules.\n\nExtra rule."
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "First."},
                                     {"type": "text", "text": "Second."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Answer."},
                                          {"type": "text", "text": "More."}]},
        {"role": "user", "content": [{"type": "text", "text": "Thanks."}]},
    ]  # fmt: skip


async def test_request_without_options_uses_defaults_and_omits_the_rest(
    server: FakeAnthropicServer,
) -> None:
    provider = AnthropicProvider("k", base_url=server.base_url, max_tokens_default=1234)
    server.script(Reply("ok"))
    try:
        await collect(provider, ModelRequest(instructions="", messages=HELLO.messages))
    finally:
        await provider.aclose()

    body = server.requests[0].json
    assert body["max_tokens"] == 1234
    for absent in ("system", "tools", "temperature"):
        assert absent not in body


async def test_tool_message_without_call_id_is_refused(provider: AnthropicProvider) -> None:
    request = ModelRequest(instructions="", messages=(ChatMessage(Role.TOOL, "orphan"),))

    with pytest.raises(ValueError, match="tool_call_id"):
        await collect(provider, request)


# --- failures ---


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (529, True), (429, True), (401, False), (400, False), (403, False)],
)
async def test_http_errors_become_provider_errors(
    server: FakeAnthropicServer, provider: AnthropicProvider, status: int, retryable: bool
) -> None:
    server.script(ErrorReply(status, "Scripted trouble"))

    error = await failure(provider)

    assert error.provider == "anthropic"
    assert error.retryable is retryable
    assert str(status) in error.message
    assert "Scripted trouble" in error.message
    assert isinstance(error.__cause__, anthropic.APIStatusError)
    assert len(server.requests) == 1  # the SDK's own retries are off


@pytest.mark.parametrize(
    ("error_type", "retryable"),
    [("overloaded_error", True), ("api_error", True), ("invalid_request_error", False)],
)
async def test_error_event_mid_stream_becomes_provider_error(
    server: FakeAnthropicServer, provider: AnthropicProvider, error_type: str, retryable: bool
) -> None:
    server.script(Reply("partial", StreamError(error_type, "Mid-stream trouble")))

    error = await failure(provider)

    assert error.retryable is retryable
    assert error_type in error.message
    assert "Mid-stream trouble" in error.message


async def test_connection_refused_becomes_retryable_provider_error() -> None:
    # A bound socket that never listens refuses connections, and no other test can take the port.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        provider = AnthropicProvider("k", base_url=f"http://127.0.0.1:{port}", name="claude")
        try:
            error = await failure(provider)
        finally:
            await provider.aclose()

    assert error.provider == "claude"
    assert error.retryable is True
    assert isinstance(error.__cause__, anthropic.APIConnectionError)


async def test_stream_cut_short_is_a_retryable_error(
    server: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    server.script(Reply("partial", finish=False))

    error = await failure(provider)

    assert error.retryable is True
    assert "before the response finished" in error.message


async def test_undecodable_stream_becomes_provider_error(
    server: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    server.script(RawReply(b"event: message_start\ndata: {this is not json\n\n"))

    error = await failure(provider)

    assert error.retryable is False
    assert "malformed" in error.message


async def test_stalled_stream_hits_the_idle_timeout(server: FakeAnthropicServer) -> None:
    server.script(Reply("first", Pause(5), "never"))
    provider = AnthropicProvider("k", base_url=server.base_url, timeout_seconds=0.3)
    try:
        started = asyncio.get_running_loop().time()
        error = await failure(provider)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        await provider.aclose()

    assert error.retryable is True
    assert "did not respond" in error.message
    assert elapsed < 3


async def test_stopping_early_releases_the_connection(
    server: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    server.script(Reply("one", "two", "three"), Reply("again"))

    async with asyncio.timeout(15):
        async with aclosing(provider.stream(HELLO, model=MODEL)) as stream:
            assert await anext(stream) == TextDelta("one")
        events = await collect(provider)

    assert events[0] == TextDelta("again")


@pytest.mark.parametrize("options", [{"timeout_seconds": 0}, {"max_tokens_default": 0}])
def test_invalid_options_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AnthropicProvider("k", **options)  # type: ignore[arg-type]
