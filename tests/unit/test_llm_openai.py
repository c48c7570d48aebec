"""OpenAIProvider against a local server speaking the chat completions streaming format,
and the ProviderSet that resolves agents' model strings."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing

import httpx2
import openai
import pytest

from tests.fakes.llm_servers import (
    ErrorReply,
    FakeOpenAIServer,
    Pause,
    RawReply,
    Reasoning,
    Reply,
    StreamError,
    ToolUse,
    openai_sse,
)
from threadline.errors import ThreadlineError
from threadline.llm.anthropic import AnthropicProvider
from threadline.llm.openai import OpenAIProvider
from threadline.llm.providers import ProviderSet, UnknownModelError, build_providers
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
    ToolCall,
    ToolCallRequested,
    ToolSpec,
    Usage,
)

pytestmark = pytest.mark.unit

MODEL = "gpt-4o-mini"
HELLO = ModelRequest(instructions="Be brief.", messages=(ChatMessage(Role.USER, "Hi"),))


@pytest.fixture(scope="module")
def running_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def server(running_server: FakeOpenAIServer) -> Iterator[FakeOpenAIServer]:
    running_server.reset()
    yield running_server
    running_server.reset()


@pytest.fixture
async def provider(server: FakeOpenAIServer) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider("test-key", base_url=server.base_url, timeout_seconds=5)
    yield provider
    await provider.aclose()


async def collect(provider: ModelProvider, request: ModelRequest = HELLO) -> list[ModelEvent]:
    async with asyncio.timeout(15):
        return [event async for event in provider.stream(request, model=MODEL)]


async def failure(provider: ModelProvider, request: ModelRequest = HELLO) -> ModelProviderError:
    with pytest.raises(ModelProviderError) as caught:
        await collect(provider, request)
    return caught.value


# --- streaming ---


async def test_text_streams_in_chunks_in_order(
    server: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    server.script(Reply("Hel", "lo, ", "world", input_tokens=12, output_tokens=3))

    events = await collect(provider)

    assert events == [
        TextDelta("Hel"),
        TextDelta("lo, "),
        TextDelta("world"),
        ResponseCompleted(usage=Usage(input_tokens=12, output_tokens=3), stop_reason="stop"),
    ]


async def test_tool_call_split_across_chunks_becomes_one_event(
    server: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    arguments = {"city": "Paris", "days": 3, "units": {"temp": "C"}}
    server.script(Reply(ToolUse.split("call_1", "get_weather", arguments, pieces=5)))

    events = await collect(provider)

    assert events[:-1] == [ToolCallRequested(ToolCall("call_1", "get_weather", arguments))]
    assert isinstance(events[-1], ResponseCompleted)
    assert events[-1].stop_reason == "tool_calls"


async def test_two_tool_calls_in_one_response(
    server: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    server.script(
        Reply(
            "Checking both.",
            ToolUse.split("call_a", "lookup", {"q": "alpha"}),
            ToolUse.split("call_b", "lookup", {"q": "beta"}),
        )
    )

    events = await collect(provider)

    assert events[:3] == [
        TextDelta("Checking both."),
        ToolCallRequested(ToolCall("call_a", "lookup", {"q": "alpha"})),
        ToolCallRequested(ToolCall("call_b", "lookup", {"q": "beta"})),
    ]
    assert isinstance(events[3], ResponseCompleted)


async def test_interleaved_tool_call_fragments_are_joined_by_index(
    server: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    def chunk(delta: dict[str, object], finish_reason: str | None = None) -> dict[str, object]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                "choices": [choice]}  # fmt: skip

    def call(index: int, **fields: object) -> dict[str, object]:
        return {"tool_calls": [{"index": index, **fields}]}

    server.script(
        RawReply(
            openai_sse(
                chunk(call(0, id="call_0", type="function", function={"name": "a"})),
                chunk(call(1, id="call_1", type="function", function={"name": "b"})),
                chunk(call(1, function={"arguments": '{"n": '})),
                chunk(call(0, function={"arguments": '{"n": 0}'})),
                chunk(call(1, function={"arguments": "1}"})),
                chunk({}, finish_reason="tool_calls"),
            )
        )
    )

    events = await collect(provider)

    assert events[:2] == [
        ToolCallRequested(ToolCall("call_0", "a", {"n": 0})),
        ToolCallRequested(ToolCall("call_1", "b", {"n": 1})),
    ]


async def test_malformed_tool_arguments_do_not_crash(
    server: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    server.script(Reply(ToolUse("call_1", "search", ('{"query": "unterminated',))))

    events = await collect(provider)

    broken = ToolCall("call_1", "search", {"_raw": '{"query": "unterminated'})
    assert events[0] == ToolCallRequested(broken)
    assert isinstance(events[1], ResponseCompleted)


async def test_tool_arguments_that_are_not_an_object_are_passed_raw(
    server: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    server.script(Reply(ToolUse("call_1", "search", ("[1, 2]",)), ToolUse("call_2", "now", ())))

    events = await collect(provider)

    assert events[:2] == [
        ToolCallRequested(ToolCall("call_1", "search", {"_raw": "[1, 2]"})),
        ToolCallRequested(ToolCall("call_2", "now", {})),
    ]


async def test_reasoning_content_becomes_reasoning_deltas(
    server: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    server.script(Reply(Reasoning("Thinking"), Reasoning(" hard."), "42"))

    events = await collect(provider)

    assert events[:3] == [ReasoningDelta("Thinking"), ReasoningDelta(" hard."), TextDelta("42")]


async def test_stopping_early_releases_the_connection(
    server: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    server.script(Reply("one", "two", "three"), Reply("again"))

    async with asyncio.timeout(15):
        async with aclosing(provider.stream(HELLO, model=MODEL)) as stream:
            assert await anext(stream) == TextDelta("one")
        events = await collect(provider)

    assert events[0] == TextDelta("again")


# --- the request on the wire ---


async def test_request_carries_instructions_tools_and_tool_history(
    server: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    schema: dict[str, object] = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    request = ModelRequest(
        instructions="You are a weather bot.",
        messages=(
            ChatMessage(Role.USER, "Weather in Paris?"),
            ChatMessage(
                Role.ASSISTANT,
                tool_calls=(ToolCall("call_1", "get_weather", {"city": "Paris"}),),
            ),
            ChatMessage(
                Role.TOOL,
                "18C and sunny",
                tool_call_id="call_1",
                tool_name="get_weather",
            ),
        ),
        tools=(ToolSpec("get_weather", "Current weather for a city.", schema),),
        max_tokens=256,
        temperature=0.2,
    )
    server.script(Reply("It is sunny."))

    await collect(provider, request)

    (sent,) = server.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer test-key"
    body = sent.json
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 256
    assert "max_completion_tokens" not in body  # compatible servers know max_tokens
    assert body["temperature"] == 0.2
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city.",
                "parameters": schema,
            },
        }
    ]
    messages = body["messages"]
    assert isinstance(messages, list)
    system, user, assistant, tool = messages
    assert system == {"role": "system", "content": "You are a weather bot."}
    assert user == {"role": "user", "content": "Weather in Paris?"}
    assert assistant["role"] == "assistant"
    assert assistant["content"] is None
    (wire_call,) = assistant["tool_calls"]
    assert wire_call["id"] == "call_1"
    assert wire_call["type"] == "function"
    assert wire_call["function"]["name"] == "get_weather"
    assert json.loads(wire_call["function"]["arguments"]) == {"city": "Paris"}
    assert tool == {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"}


async def test_request_without_tools_or_limits_omits_them(
    server: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    server.script(Reply("ok"))

    await collect(provider, ModelRequest(instructions="", messages=HELLO.messages))

    body = server.requests[0].json
    assert body["messages"] == [{"role": "user", "content": "Hi"}]
    for absent in ("tools", "max_tokens", "max_completion_tokens", "temperature"):
        assert absent not in body


async def test_tool_message_without_call_id_is_refused(provider: OpenAIProvider) -> None:
    request = ModelRequest(instructions="", messages=(ChatMessage(Role.TOOL, "orphan"),))

    with pytest.raises(ValueError, match="tool_call_id"):
        await collect(provider, request)


# --- failures ---


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (503, True), (429, True), (408, True), (401, False), (400, False), (404, False)],
)
async def test_http_errors_become_provider_errors(
    server: FakeOpenAIServer, provider: OpenAIProvider, status: int, retryable: bool
) -> None:
    server.script(ErrorReply(status, "Scripted trouble"))

    error = await failure(provider)

    assert error.provider == "openai"
    assert error.retryable is retryable
    assert error.code == "model_provider_error"
    assert str(status) in error.message
    assert "Scripted trouble" in error.message
    assert isinstance(error.__cause__, openai.APIStatusError)
    assert len(server.requests) == 1  # the SDK's own retries are off


async def test_connection_refused_becomes_retryable_provider_error() -> None:
    # A bound socket that never listens refuses connections, and no other test can take the port.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        provider = OpenAIProvider("k", base_url=f"http://127.0.0.1:{port}/v1", name="local")
        try:
            error = await failure(provider)
        finally:
            await provider.aclose()

    assert error.provider == "local"
    assert error.retryable is True
    assert isinstance(error.__cause__, openai.APIConnectionError)


async def test_stream_cut_short_is_a_retryable_error(
    server: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    server.script(Reply("partial", finish=False))

    error = await failure(provider)

    assert error.retryable is True
    assert "before the response finished" in error.message


async def test_error_event_mid_stream_becomes_provider_error(
    server: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    server.script(Reply("partial", StreamError("server_error", "The model crashed")))

    error = await failure(provider)

    assert error.retryable is True
    assert "The model crashed" in error.message


async def test_undecodable_stream_becomes_provider_error(
    server: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    server.script(RawReply(b"data: {this is not json\n\n"))

    error = await failure(provider)

    assert error.retryable is False
    assert "malformed" in error.message


async def test_stalled_stream_hits_the_idle_timeout(server: FakeOpenAIServer) -> None:
    server.script(Reply("first", Pause(5), "never"))
    provider = OpenAIProvider("k", base_url=server.base_url, timeout_seconds=0.3)
    try:
        started = asyncio.get_running_loop().time()
        error = await failure(provider)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        await provider.aclose()

    assert error.retryable is True
    assert "did not respond" in error.message
    assert elapsed < 3


async def test_caller_supplied_http_client_stays_open(server: FakeOpenAIServer) -> None:
    async with httpx2.AsyncClient() as http_client:
        provider = OpenAIProvider("k", base_url=server.base_url, http_client=http_client)
        server.script(Reply("hi"))
        await collect(provider)
        await provider.aclose()

        assert not http_client.is_closed


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout_seconds"):
        OpenAIProvider("k", timeout_seconds=0)


# --- ProviderSet ---


class _StubProvider:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    async def stream(self, request: ModelRequest, *, model: str) -> AsyncIterator[ModelEvent]:
        yield ResponseCompleted()

    async def aclose(self) -> None:
        self.closed = True


def test_demo_resolves_with_or_without_a_model_name() -> None:
    demo = _StubProvider("demo")
    providers = ProviderSet({"demo": demo})

    assert providers.resolve("demo") == (demo, "demo")
    assert providers.resolve("demo:echo") == (demo, "echo")


def test_vendor_prefixes_resolve_to_their_providers() -> None:
    openai_stub, anthropic_stub = _StubProvider("openai"), _StubProvider("anthropic")
    providers = ProviderSet({"openai": openai_stub, "anthropic": anthropic_stub})

    assert providers.resolve("openai:gpt-4o-mini") == (openai_stub, "gpt-4o-mini")
    assert providers.resolve("anthropic:claude-sonnet-4-5") == (
        anthropic_stub,
        "claude-sonnet-4-5",
    )
    # Only the first colon separates: some local model names contain their own.
    assert providers.resolve("openai:llama3.1:8b") == (openai_stub, "llama3.1:8b")


@pytest.mark.parametrize(
    ("model", "setting"),
    [
        ("openai:gpt-4o-mini", "OPENAI_API_KEY"),
        ("anthropic:claude-sonnet-4-5", "ANTHROPIC_API_KEY"),
    ],
)
def test_unconfigured_vendor_names_the_key_to_set(model: str, setting: str) -> None:
    providers = ProviderSet({"demo": _StubProvider("demo")})

    with pytest.raises(UnknownModelError) as caught:
        providers.resolve(model)

    assert isinstance(caught.value, ThreadlineError)
    assert caught.value.code == "unknown_model"
    assert caught.value.model == model
    assert setting in caught.value.message


@pytest.mark.parametrize("model", ["gpt-4o-mini", "mystery:model", "openai:", ":gpt-4o"])
def test_malformed_or_unknown_model_strings_are_refused(model: str) -> None:
    providers = ProviderSet({"demo": _StubProvider("demo"), "openai": _StubProvider("openai")})

    with pytest.raises(UnknownModelError) as caught:
        providers.resolve(model)

    assert caught.value.model == model


async def test_build_providers_includes_only_vendors_with_keys() -> None:
    demo = _StubProvider("demo")

    only_demo = build_providers(
        openai_api_key=None,
        openai_base_url=None,
        anthropic_api_key=None,
        anthropic_base_url=None,
        demo=demo,
    )
    everything = build_providers(
        openai_api_key="sk-test",
        openai_base_url="http://127.0.0.1:1/v1",
        anthropic_api_key="sk-ant-test",
        anthropic_base_url=None,
        demo=demo,
    )
    try:
        assert only_demo.names == ("demo",)
        assert everything.names == ("anthropic", "demo", "openai")
        assert isinstance(everything.resolve("openai:gpt-4o")[0], OpenAIProvider)
        assert isinstance(everything.resolve("anthropic:claude-x")[0], AnthropicProvider)
    finally:
        await only_demo.aclose()
        await everything.aclose()

    assert demo.closed
