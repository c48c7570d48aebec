"""The vendor-neutral shapes that pass between the agent loop and a model provider.

A provider turns a `ModelRequest` into a stream of `ModelEvent`s. The loop never sees a
vendor's wire format, and a provider never sees threads, runs or users.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from threadline.errors import ThreadlineError

JSONObject = dict[str, object]


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call the model asked for. `call_id` is the provider's id for it."""

    call_id: str
    name: str
    arguments: JSONObject


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One entry of the conversation sent to the model.

    An assistant message may carry `tool_calls`; each must be answered by a `TOOL` message
    whose `tool_call_id` names it, before the next assistant or user message.
    """

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    tool_name: str | None = None
    is_error: bool = False


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """What the model is told about a tool: its name, description and JSON schema."""

    name: str
    description: str
    parameters: JSONObject


@dataclass(frozen=True, slots=True)
class ModelRequest:
    instructions: str
    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...] = ()
    max_tokens: int | None = None
    temperature: float | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
        )


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A chunk of the answer's text, in order."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Reasoning or status text the model exposes while it works (shown as `agent_thinking`)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallRequested:
    """A complete tool call: emitted once its arguments have fully streamed in."""

    call: ToolCall


@dataclass(frozen=True, slots=True)
class ResponseCompleted:
    """The last event of every successful stream."""

    usage: Usage = field(default_factory=Usage)
    stop_reason: str = "stop"


ModelEvent = TextDelta | ReasoningDelta | ToolCallRequested | ResponseCompleted


@runtime_checkable
class ModelProvider(Protocol):
    """Streams one model response. Implementations must be safe to share between runs."""

    name: str

    def stream(self, request: ModelRequest, *, model: str) -> AsyncIterator[ModelEvent]:
        """Yield the response as it arrives; raise `ModelProviderError` on failure."""
        ...


class ModelProviderError(ThreadlineError):
    """The provider could not produce a response (network, HTTP status, malformed stream).

    Ends the run as failed; `retryable` says whether trying again might succeed.
    """

    code = "model_provider_error"

    def __init__(self, message: str, *, provider: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.provider = provider
        self.retryable = retryable
