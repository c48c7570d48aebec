"""Anthropic's Messages API behind `ModelProvider`.

Request model: the instructions (and any SYSTEM messages) become `system`; the conversation is
rebuilt as strictly alternating user/assistant turns, because the API rejects two turns of the
same role in a row. Tool results travel as `tool_result` blocks in a user turn, so a run of TOOL
messages collapses into one user turn.

Streaming model: the raw event stream is read block by block. Text and thinking deltas are passed
on as they arrive; a `tool_use` block's JSON input arrives in fragments and is emitted as one
`ToolCallRequested` when the block stops. A stream ends with exactly one `ResponseCompleted`
after `message_stop`; anything else, including a stream cut short, raises `ModelProviderError`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import anthropic
import httpx2
from anthropic import AsyncAnthropic, AsyncStream, omit
from anthropic.types import (
    ContentBlockParam,
    InputJSONDelta,
    MessageParam,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RawMessageStreamEvent,
    ThinkingDelta,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlock,
)
from anthropic.types import TextDelta as WireTextDelta
from anthropic.types import Usage as WireUsage

from threadline.llm.types import (
    ChatMessage,
    JSONObject,
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

ANTHROPIC_BASE_URL = "https://api.anthropic.com"

# Stop reasons in the vocabulary `ResponseCompleted` uses everywhere (OpenAI's), so the run
# engine need not know which vendor answered. Unknown reasons pass through unchanged.
_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}
# Error types that an `error` event inside a started stream carries when trying again may work.
_RETRYABLE_STREAM_ERRORS = frozenset(
    {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}
)

_TurnRole = Literal["user", "assistant"]


class AnthropicProvider:
    """Streams responses from Anthropic's Messages API.

    Args:
        api_key: The `x-api-key` credential.
        base_url: The API root without `/v1`; defaults to Anthropic's own.
        timeout_seconds: Deadline for connecting and for each wait on the stream (the time to
            the first event and between events), not for the whole response.
        http_client: An `httpx2.AsyncClient` to share; the caller keeps ownership of it.
        name: The provider name reported in errors.
        max_tokens_default: Sent when the request sets no `max_tokens`; the API requires one.
    """

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str | None = None,
        timeout_seconds: float = 60,
        http_client: httpx2.AsyncClient | None = None,
        name: str = "anthropic",
        max_tokens_default: int = 4096,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        if max_tokens_default < 1:
            raise ValueError("max_tokens_default must be at least 1")
        self.name = name
        self._timeout_seconds = timeout_seconds
        self._max_tokens_default = max_tokens_default
        self._owns_http_client = http_client is None
        # max_retries=0: the run engine decides about retries. It knows whether text already
        # reached the user (a blind retry would repeat it) and applies one policy to every
        # provider; SDK retries would also hide extra attempts behind our own deadline.
        # base_url is always passed so the SDK does not fall back to ANTHROPIC_BASE_URL itself.
        self._client = AsyncAnthropic(
            api_key=api_key,
            base_url=base_url or ANTHROPIC_BASE_URL,
            timeout=timeout_seconds,
            max_retries=0,
            http_client=http_client,
        )

    async def aclose(self) -> None:
        """Close the HTTP connections, unless the caller supplied (and so owns) the client."""
        if self._owns_http_client:
            await self._client.close()

    async def stream(
        self, request: ModelRequest, *, model: str
    ) -> AsyncGenerator[ModelEvent, None]:
        sdk_stream = await self._open(request, model)
        reader = _EventReader(provider=self.name)
        try:
            while (wire_event := await self._next_event(sdk_stream)) is not None:
                for event in reader.consume(wire_event):
                    yield event
        finally:
            await sdk_stream.close()
        for event in reader.finish():
            yield event

    async def _open(self, request: ModelRequest, model: str) -> AsyncStream[RawMessageStreamEvent]:
        system = _system_prompt(request)
        # This SDK version has no `temperature` argument; the API still takes the field.
        extra_body = (
            {"temperature": request.temperature} if request.temperature is not None else None
        )
        try:
            async with asyncio.timeout(self._timeout_seconds):
                return await self._client.messages.create(
                    model=model,
                    max_tokens=request.max_tokens or self._max_tokens_default,
                    system=system if system else omit,
                    messages=_wire_messages(request.messages),
                    tools=_wire_tools(request.tools) if request.tools else omit,
                    extra_body=extra_body,
                    stream=True,
                )
        except (anthropic.AnthropicError, TimeoutError) as exc:
            raise self._error(exc) from exc

    async def _next_event(
        self, sdk_stream: AsyncStream[RawMessageStreamEvent]
    ) -> RawMessageStreamEvent | None:
        """The next event, or None once the server has closed the stream."""
        try:
            async with asyncio.timeout(self._timeout_seconds):
                return await anext(sdk_stream)
        except StopAsyncIteration:
            return None
        # While iterating, the SDK lets transport errors through unwrapped, and ValueError is
        # what undecodable JSON in an event raises.
        except (anthropic.AnthropicError, httpx2.TransportError, TimeoutError, ValueError) as exc:
            raise self._error(exc) from exc

    def _error(self, exc: Exception) -> ModelProviderError:
        return _provider_error(exc, provider=self.name, timeout_seconds=self._timeout_seconds)


def _provider_error(exc: Exception, *, provider: str, timeout_seconds: float) -> ModelProviderError:
    """Translate an SDK or transport failure into the run-ending error the engine understands."""
    if isinstance(exc, anthropic.APIStatusError):
        return _status_error(exc, provider=provider)
    if isinstance(exc, anthropic.APITimeoutError | TimeoutError | httpx2.TimeoutException):
        message = f"{provider} did not respond within {timeout_seconds:g}s"
        return ModelProviderError(message, provider=provider, retryable=True)
    if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
        message = f"Could not reach {provider}: {exc}"
        return ModelProviderError(message, provider=provider, retryable=True)
    return ModelProviderError(f"{provider} sent a malformed response: {exc}", provider=provider)


def _status_error(exc: anthropic.APIStatusError, *, provider: str) -> ModelProviderError:
    detail = exc.api_message or exc.message
    if exc.status_code < 400:
        # An `error` event inside a stream that had started with 200 OK.
        retryable = exc.type in _RETRYABLE_STREAM_ERRORS
        message = f"{provider} reported {exc.type or 'an error'} mid-stream: {detail}"
        return ModelProviderError(message, provider=provider, retryable=retryable)
    return ModelProviderError(
        f"{provider} returned HTTP {exc.status_code}: {detail}",
        provider=provider,
        retryable=_is_retryable_status(exc.status_code),
    )


def _is_retryable_status(status: int) -> bool:
    # 408 and 409 are transient on Anthropic's side (529 "overloaded" is covered by >= 500);
    # other 4xx mean the request or the key is wrong and will fail again.
    return status in (408, 409, 429) or status >= 500


# --- request: vendor-neutral types to the Messages API wire format ---


def _system_prompt(request: ModelRequest) -> str:
    # The Messages API has no system role inside `messages`; fold such messages into `system`.
    parts = [request.instructions]
    parts.extend(m.content for m in request.messages if m.role is Role.SYSTEM)
    return "\n\n".join(part for part in parts if part)


def _wire_messages(messages: Sequence[ChatMessage]) -> list[MessageParam]:
    turns: list[tuple[_TurnRole, list[ContentBlockParam]]] = []
    for message in messages:
        if message.role is Role.SYSTEM:
            continue
        role, blocks = _wire_turn(message)
        if not blocks:
            continue  # the API rejects empty turns and empty text blocks
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    return [_message_param(role, blocks) for role, blocks in turns]


def _wire_turn(message: ChatMessage) -> tuple[_TurnRole, list[ContentBlockParam]]:
    if message.role is Role.TOOL:
        if not message.tool_call_id:
            raise ValueError("a TOOL message needs the tool_call_id of the call it answers")
        result: ToolResultBlockParam = {
            "type": "tool_result",
            "tool_use_id": message.tool_call_id,
            "content": message.content,
        }
        if message.is_error:
            result["is_error"] = True
        return "user", [result]
    blocks: list[ContentBlockParam] = []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    if message.role is Role.USER:
        return "user", blocks
    blocks.extend(
        {"type": "tool_use", "id": call.call_id, "name": call.name, "input": call.arguments}
        for call in message.tool_calls
    )
    return "assistant", blocks


def _message_param(role: _TurnRole, blocks: list[ContentBlockParam]) -> MessageParam:
    if role == "user":
        return {"role": "user", "content": blocks}
    return {"role": "assistant", "content": blocks}


def _wire_tools(tools: Sequence[ToolSpec]) -> list[ToolParam]:
    return [
        {"name": tool.name, "description": tool.description, "input_schema": tool.parameters}
        for tool in tools
    ]


# --- response: raw stream events to vendor-neutral events ---


def _parse_tool_arguments(text: str) -> JSONObject:
    """Decode a model's tool input without trusting it.

    Rather than failing the run on broken JSON, the raw text is passed on under `_raw` so tool
    validation rejects it and the model sees why and can try again.
    """
    if not text.strip():
        return {}  # a tool without parameters streams no input fragments
    try:
        value = json.loads(text)
    except ValueError:
        return {"_raw": text}
    return value if isinstance(value, dict) else {"_raw": text}


@dataclass(slots=True)
class _PartialToolUse:
    call_id: str
    name: str
    initial_input: JSONObject
    input_fragments: list[str] = field(default_factory=list)

    def complete(self) -> ToolCall:
        # The input normally streams in as fragments; the block's own `input` is only a
        # fallback for servers that send it whole.
        if self.input_fragments:
            arguments = _parse_tool_arguments("".join(self.input_fragments))
        else:
            arguments = self.initial_input
        return ToolCall(call_id=self.call_id, name=self.name, arguments=arguments)


class _EventReader:
    """Turns the raw events of one streamed message into events, in order."""

    def __init__(self, *, provider: str) -> None:
        self._provider = provider
        self._tool_uses: dict[int, _PartialToolUse] = {}
        self._usage = Usage()
        self._stop_reason: str | None = None
        self._stopped = False

    def consume(self, event: RawMessageStreamEvent) -> list[ModelEvent]:
        if isinstance(event, RawContentBlockDeltaEvent):
            return self._delta(event)
        if isinstance(event, RawContentBlockStopEvent):
            return self._block_stopped(event.index)
        if isinstance(event, RawContentBlockStartEvent):
            self._block_started(event)
        elif isinstance(event, RawMessageStartEvent):
            self._usage = _input_usage(event.message.usage)
        elif isinstance(event, RawMessageDeltaEvent):
            self._message_delta(event)
        elif isinstance(event, RawMessageStopEvent):
            self._stopped = True
        return []

    def finish(self) -> list[ModelEvent]:
        if not self._stopped:
            raise ModelProviderError(
                f"{self._provider} ended the stream before the response finished",
                provider=self._provider,
                retryable=True,
            )
        events: list[ModelEvent] = [
            ToolCallRequested(partial.complete()) for partial in self._tool_uses.values()
        ]
        stop_reason = self._stop_reason or "end_turn"
        events.append(ResponseCompleted(self._usage, _STOP_REASONS.get(stop_reason, stop_reason)))
        return events

    def _block_started(self, event: RawContentBlockStartEvent) -> None:
        block = event.content_block
        if isinstance(block, ToolUseBlock):
            self._tool_uses[event.index] = _PartialToolUse(
                call_id=block.id, name=block.name, initial_input=dict(block.input)
            )

    def _delta(self, event: RawContentBlockDeltaEvent) -> list[ModelEvent]:
        delta = event.delta
        if isinstance(delta, WireTextDelta) and delta.text:
            return [TextDelta(delta.text)]
        if isinstance(delta, ThinkingDelta) and delta.thinking:
            return [ReasoningDelta(delta.thinking)]
        if isinstance(delta, InputJSONDelta) and event.index in self._tool_uses:
            self._tool_uses[event.index].input_fragments.append(delta.partial_json)
        return []  # citations and signatures carry nothing the loop uses

    def _block_stopped(self, index: int) -> list[ModelEvent]:
        partial = self._tool_uses.pop(index, None)
        return [] if partial is None else [ToolCallRequested(partial.complete())]

    def _message_delta(self, event: RawMessageDeltaEvent) -> None:
        if event.delta.stop_reason is not None:
            self._stop_reason = event.delta.stop_reason
        # `output_tokens` here is the running total for the message, not an increment.
        input_tokens = self._usage.input_tokens
        if event.usage.input_tokens is not None:
            input_tokens = _total_input(
                event.usage.input_tokens,
                event.usage.cache_creation_input_tokens,
                event.usage.cache_read_input_tokens,
            )
        self._usage = Usage(input_tokens=input_tokens, output_tokens=event.usage.output_tokens)


def _input_usage(usage: WireUsage) -> Usage:
    input_tokens = _total_input(
        usage.input_tokens, usage.cache_creation_input_tokens, usage.cache_read_input_tokens
    )
    return Usage(input_tokens=input_tokens, output_tokens=usage.output_tokens)


def _total_input(uncached: int, cache_written: int | None, cache_read: int | None) -> int:
    # Anthropic counts prompt tokens served from or written to the cache separately.
    return uncached + (cache_written or 0) + (cache_read or 0)
