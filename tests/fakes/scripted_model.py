"""A model provider that replays scripted responses, and a sink that records a run's steps.

Loop tests fake only the model: each `stream` call pops the next scripted response and
records the request it was given, so tests can assert on both sides of the conversation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from threadline.agents.context import RunContext
from threadline.agents.tools import ToolResult
from threadline.context import UserContext
from threadline.ids import IdPrefix, new_id
from threadline.llm.types import (
    ChatMessage,
    ModelEvent,
    ModelRequest,
    ResponseCompleted,
    TextDelta,
    ToolCall,
    ToolCallRequested,
    Usage,
)


@dataclass(frozen=True)
class WaitFor:
    """A script step that blocks the stream until `event` is set (forever, if never)."""

    event: asyncio.Event = field(default_factory=asyncio.Event)


ScriptItem = ModelEvent | WaitFor
Response = Sequence[ScriptItem] | Callable[[ModelRequest], Sequence[ScriptItem]]


class ScriptedModel:
    """Streams pre-written responses, one per model call, in order."""

    name = "scripted"

    def __init__(self, responses: Sequence[Response] = ()) -> None:
        self._responses = list(responses)
        self.requests: list[ModelRequest] = []
        self.models: list[str] = []
        self.closed_streams = 0

    def add(self, response: Response) -> None:
        self._responses.append(response)

    async def stream(self, request: ModelRequest, *, model: str) -> AsyncIterator[ModelEvent]:
        self.requests.append(request)
        self.models.append(model)
        if not self._responses:
            raise RuntimeError(f"ScriptedModel: no response scripted for call {len(self.requests)}")
        response = self._responses.pop(0)
        items = response(request) if callable(response) else response
        try:
            for item in items:
                if isinstance(item, WaitFor):
                    await item.event.wait()
                else:
                    yield item
        finally:
            self.closed_streams += 1


def text(answer: str, *, usage: Usage | None = None) -> list[ScriptItem]:
    """A final answer streamed word by word."""
    words = answer.split(" ")
    chunks = [word + " " for word in words[:-1]] + [words[-1]]
    return [*(TextDelta(c) for c in chunks), ResponseCompleted(usage or Usage(3, len(words)))]


def tool_calls(*calls: ToolCall, usage: Usage | None = None) -> list[ScriptItem]:
    """A response asking for `calls`."""
    return [*(ToolCallRequested(c) for c in calls), ResponseCompleted(usage or Usage(3, 2))]


def call(name: str, call_id: str | None = None, **arguments: object) -> ToolCall:
    return ToolCall(call_id or f"call_{name}", name, dict(arguments))


def run_context(deps: object = None, *, agent_name: str = "test") -> RunContext[object]:
    thread_id, run_id = new_id(IdPrefix.THREAD), new_id(IdPrefix.RUN)
    user = UserContext.create(new_id(IdPrefix.USER)).for_run(run_id, thread_id=thread_id)
    return RunContext(
        user=user, thread_id=thread_id, run_id=run_id, agent_name=agent_name, deps=deps
    )


@dataclass
class RecordingSink:
    """An `AgentEventSink` that keeps every call, in order, as `(kind, *payload)` tuples."""

    events: list[tuple[object, ...]] = field(default_factory=list)
    hints: list[tuple[str, bool]] = field(default_factory=list)
    """What the loop said follows each write: ("final", …) and ("last", …), in order."""

    async def step_started(self) -> None:
        self.events.append(("step_started",))

    async def thinking(self, text: str) -> None:
        self.events.append(("thinking", text))

    async def text_delta(self, text: str) -> None:
        self.events.append(("text_delta", text))

    async def assistant_message(self, message: ChatMessage, *, final: bool) -> None:
        self.events.append(("assistant_message", message))
        self.hints.append(("final", final))

    async def tool_executing(self, call: ToolCall) -> None:
        self.events.append(("tool_executing", call))

    async def tool_completed(self, call: ToolCall, result: ToolResult, *, last: bool) -> None:
        self.events.append(("tool_completed", call, result))
        self.hints.append(("last", last))

    def kinds(self) -> list[str]:
        return [str(event[0]) for event in self.events]

    def of_kind(self, kind: str) -> list[tuple[object, ...]]:
        return [event for event in self.events if event[0] == kind]
