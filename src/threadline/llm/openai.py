"""OpenAI chat completions behind `ModelProvider`.

Speaks to api.openai.com or to any server with the same wire format (vLLM, Ollama, llama.cpp)
through `base_url`.

Streaming model: text and reasoning deltas are passed on as they arrive. Tool calls arrive as
fragments keyed by `index` (the id and name first, then the JSON arguments in pieces), so they
are held back and emitted as whole `ToolCallRequested` events when the choice finishes. Every
successful stream ends with exactly one `ResponseCompleted`; every failure, including a stream
cut short, raises `ModelProviderError`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

import httpx2
import openai
from openai import AsyncOpenAI, AsyncStream, omit
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
)
from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaToolCall

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

OPENAI_BASE_URL = "https://api.openai.com/v1"

# Servers that expose a model's reasoning put it in a non-standard delta field: vLLM, DeepSeek
# and llama.cpp use `reasoning_content`, Ollama and OpenRouter use `reasoning`.
_REASONING_FIELDS = ("reasoning_content", "reasoning")


class OpenAIProvider:
    """Streams chat completions from OpenAI or an OpenAI-compatible server.

    Args:
        api_key: Sent as the bearer token. Local servers usually accept any non-empty value.
        base_url: The API root including `/v1`; defaults to OpenAI's own.
        timeout_seconds: Deadline for connecting and for each wait on the stream (the time to
            the first chunk and between chunks), not for the whole response.
        http_client: An `httpx2.AsyncClient` to share; the caller keeps ownership of it.
        name: The provider name reported in errors.
    """

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str | None = None,
        timeout_seconds: float = 60,
        http_client: httpx2.AsyncClient | None = None,
        name: str = "openai",
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        self.name = name
        self._timeout_seconds = timeout_seconds
        self._owns_http_client = http_client is None
        resolved_base_url = base_url or OPENAI_BASE_URL
        # OpenAI's reasoning models reject `max_tokens` and want `max_completion_tokens`, while
        # the compatible servers have long accepted `max_tokens` and not all know the new name.
        self._limit_is_completion_tokens = resolved_base_url.rstrip("/") == OPENAI_BASE_URL
        # max_retries=0: the run engine decides about retries. It knows whether text already
        # reached the user (a blind retry would repeat it) and applies one policy to every
        # provider; SDK retries would also hide extra attempts behind our own deadline.
        self._client = AsyncOpenAI(
            api_key=api_key,
            base_url=resolved_base_url,
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
        reader = _ChunkReader(provider=self.name)
        try:
            while (chunk := await self._next_chunk(sdk_stream)) is not None:
                for event in reader.consume(chunk):
                    yield event
        finally:
            await sdk_stream.close()
        for event in reader.finish():
            yield event

    async def _open(self, request: ModelRequest, model: str) -> AsyncStream[ChatCompletionChunk]:
        limit = request.max_tokens if request.max_tokens is not None else omit
        try:
            async with asyncio.timeout(self._timeout_seconds):
                return await self._client.chat.completions.create(
                    model=model,
                    messages=_wire_messages(request),
                    tools=_wire_tools(request.tools) if request.tools else omit,
                    temperature=request.temperature if request.temperature is not None else omit,
                    max_tokens=omit if self._limit_is_completion_tokens else limit,
                    max_completion_tokens=limit if self._limit_is_completion_tokens else omit,
                    stream=True,
                    stream_options={"include_usage": True},
                )
        except (openai.OpenAIError, TimeoutError) as exc:
            raise self._error(exc) from exc

    async def _next_chunk(
        self, sdk_stream: AsyncStream[ChatCompletionChunk]
    ) -> ChatCompletionChunk | None:
        """The next chunk, or None once the server has sent `[DONE]` or closed the stream."""
        try:
            async with asyncio.timeout(self._timeout_seconds):
                return await anext(sdk_stream)
        except StopAsyncIteration:
            return None
        # ValueError covers undecodable JSON in an event; TransportError a connection that
        # breaks mid-body, in case the SDK lets one through unwrapped.
        except (openai.OpenAIError, httpx2.TransportError, TimeoutError, ValueError) as exc:
            raise self._error(exc) from exc

    def _error(self, exc: Exception) -> ModelProviderError:
        return _provider_error(exc, provider=self.name, timeout_seconds=self._timeout_seconds)


def _provider_error(exc: Exception, *, provider: str, timeout_seconds: float) -> ModelProviderError:
    """Translate an SDK or transport failure into the run-ending error the engine understands."""
    if isinstance(exc, openai.APIStatusError):
        return ModelProviderError(
            f"{provider} returned HTTP {exc.status_code}: {exc.message}",
            provider=provider,
            retryable=_is_retryable_status(exc.status_code),
        )
    if isinstance(exc, openai.APITimeoutError | TimeoutError | httpx2.TimeoutException):
        message = f"{provider} did not respond within {timeout_seconds:g}s"
        return ModelProviderError(message, provider=provider, retryable=True)
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        message = f"Could not reach {provider}: {exc}"
        return ModelProviderError(message, provider=provider, retryable=True)
    if isinstance(exc, openai.APIError):
        # An error event inside a stream that had started well: the server failed mid-way.
        retryable = exc.type != "invalid_request_error"
        message = f"{provider} reported an error mid-stream: {exc.message}"
        return ModelProviderError(message, provider=provider, retryable=retryable)
    return ModelProviderError(f"{provider} sent a malformed response: {exc}", provider=provider)


def _is_retryable_status(status: int) -> bool:
    # 408 and 409 are transient on OpenAI's side; other 4xx mean the request or key is wrong.
    return status in (408, 409, 429) or status >= 500


# --- request: vendor-neutral types to the chat completions wire format ---


def _wire_messages(request: ModelRequest) -> list[ChatCompletionMessageParam]:
    messages: list[ChatCompletionMessageParam] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    messages.extend(_wire_message(message) for message in request.messages)
    return messages


def _wire_message(message: ChatMessage) -> ChatCompletionMessageParam:
    if message.role is Role.SYSTEM:
        return {"role": "system", "content": message.content}
    if message.role is Role.USER:
        return {"role": "user", "content": message.content}
    if message.role is Role.TOOL:
        if not message.tool_call_id:
            raise ValueError("a TOOL message needs the tool_call_id of the call it answers")
        # Chat completions has no error flag on tool results; the tool layer's text says so.
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if not message.tool_calls:
        return {"role": "assistant", "content": message.content}
    return {
        "role": "assistant",
        # The API wants null rather than "" when the turn was only tool calls.
        "content": message.content or None,
        "tool_calls": [_wire_tool_call(call) for call in message.tool_calls],
    }


def _wire_tool_call(call: ToolCall) -> ChatCompletionMessageFunctionToolCallParam:
    return {
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
    }


def _wire_tools(tools: Sequence[ToolSpec]) -> list[ChatCompletionFunctionToolParam]:
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            },
        }
        for tool in tools
    ]


# --- response: stream chunks to vendor-neutral events ---


def _parse_tool_arguments(text: str) -> JSONObject:
    """Decode a model's tool arguments without trusting them.

    Models do emit broken JSON. Rather than failing the run, the raw text is passed on under
    `_raw` so tool validation rejects it and the model sees why and can try again.
    """
    if not text.strip():
        return {}  # some servers send "" for a tool without parameters
    try:
        value = json.loads(text)
    except ValueError:
        return {"_raw": text}
    return value if isinstance(value, dict) else {"_raw": text}


@dataclass(slots=True)
class _PartialToolCall:
    call_id: str = ""
    name: str = ""
    argument_fragments: list[str] = field(default_factory=list)

    def complete(self) -> ToolCall:
        # A few compatible servers omit the id; the loop still needs one to pair the result.
        call_id = self.call_id or f"call_{uuid.uuid4().hex[:24]}"
        arguments = _parse_tool_arguments("".join(self.argument_fragments))
        return ToolCall(call_id=call_id, name=self.name, arguments=arguments)


class _ToolCallAccumulator:
    def __init__(self) -> None:
        self._partials: dict[int, _PartialToolCall] = {}

    def add(self, delta: ChoiceDeltaToolCall) -> None:
        partial = self._partials.setdefault(delta.index, _PartialToolCall())
        if delta.id:
            partial.call_id = delta.id
        if delta.function is None:
            return
        if delta.function.name:
            partial.name = delta.function.name
        if delta.function.arguments:
            partial.argument_fragments.append(delta.function.arguments)

    def drain(self) -> list[ToolCall]:
        calls = [partial.complete() for _, partial in sorted(self._partials.items())]
        self._partials.clear()
        return calls


class _ChunkReader:
    """Turns the chunks of one streamed completion into events, in order."""

    def __init__(self, *, provider: str) -> None:
        self._provider = provider
        self._tool_calls = _ToolCallAccumulator()
        self._usage = Usage()
        self._finish_reason: str | None = None

    def consume(self, chunk: ChatCompletionChunk) -> list[ModelEvent]:
        events: list[ModelEvent] = []
        if chunk.usage is not None:
            self._usage = Usage(
                input_tokens=chunk.usage.prompt_tokens,
                output_tokens=chunk.usage.completion_tokens,
            )
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # we never ask for n > 1
            events.extend(self._delta_events(choice.delta))
            if choice.finish_reason is not None:
                self._finish_reason = choice.finish_reason
                events.extend(ToolCallRequested(call) for call in self._tool_calls.drain())
        return events

    def finish(self) -> list[ModelEvent]:
        if self._finish_reason is None:
            raise ModelProviderError(
                f"{self._provider} ended the stream before the response finished",
                provider=self._provider,
                retryable=True,
            )
        return [ResponseCompleted(usage=self._usage, stop_reason=self._finish_reason)]

    def _delta_events(self, delta: ChoiceDelta) -> list[ModelEvent]:
        events: list[ModelEvent] = []
        reasoning = _reasoning_text(delta)
        if reasoning:
            events.append(ReasoningDelta(reasoning))
        if delta.content:
            events.append(TextDelta(delta.content))
        for tool_call in delta.tool_calls or ():
            self._tool_calls.add(tool_call)
        return events


def _reasoning_text(delta: ChoiceDelta) -> str:
    extra = delta.model_extra or {}
    for field_name in _REASONING_FIELDS:
        value = extra.get(field_name)
        if isinstance(value, str) and value:
            return value
    return ""
