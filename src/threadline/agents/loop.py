"""The agent loop: call the model, stream its answer, run the tools it asks for, repeat.

Model and invariants:
- One step is one model call. Its text and reasoning stream to the sink as they arrive; when
  the response completes, the sink gets the whole assistant message (text and tool calls)
  BEFORE any tool runs, so the store never holds a tool result whose call it lacks.
- The loop tells the sink what follows each write (`final`, `last`; see `AgentEventSink`), so
  the sink can write a step's events together: tool results always lead to another model
  call, and tools run only when a step is left to read their results.
- The tool calls of one step run concurrently in a TaskGroup. Tool failures are results for
  the model, not exceptions, so the group only fails on cancellation or a sink error, and
  then it cancels the sibling calls too.
- The run ends with a final answer (a step with no tool calls) or `MaxStepsExceededError`.
- Resume: if the history ends with an assistant message whose tool calls are not all
  answered, the loop first runs only the unanswered calls. The answered ones were completed
  by an earlier attempt of this run and must not run twice.
- Cancellation is never caught here: cancelling the task running `run_agent` cancels the
  model stream and every async tool at their next await.

This module imports neither FastAPI nor SQLAlchemy; the engine adapts it to both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from threadline.agents.agent import Agent
from threadline.agents.context import RunContext
from threadline.agents.errors import MaxStepsExceededError
from threadline.agents.events import THINKING, AgentEventSink
from threadline.agents.history import pending_tool_calls, repair_history, tool_message
from threadline.agents.tools import ToolResult
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
    Usage,
)

__all__ = [
    "DEFAULT_MODEL_IDLE_TIMEOUT_SECONDS",
    "THINKING",
    "AgentOutcome",
    "resumed_calls",
    "run_agent",
]

# A model can think for a long time before its first token, but a stream silent for two
# minutes is stuck; a deadline per event (not per response) allows long answers.
DEFAULT_MODEL_IDLE_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class AgentOutcome:
    """How a finished run ended."""

    final_text: str
    usage: Usage
    steps: int
    """Model calls made by this attempt (a resumed run does not count earlier attempts)."""


@dataclass(slots=True)
class _Step:
    text: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)

    def message(self) -> ChatMessage:
        return ChatMessage(Role.ASSISTANT, "".join(self.text), tuple(self.tool_calls))


async def run_agent(
    agent: Agent,
    *,
    history: Sequence[ChatMessage],
    context: RunContext[object],
    provider: ModelProvider,
    model: str,
    sink: AgentEventSink,
    model_idle_timeout_seconds: float = DEFAULT_MODEL_IDLE_TIMEOUT_SECONDS,
) -> AgentOutcome:
    """Run `agent` on `history` until it answers; report every step to `sink`.

    Args:
        agent: The agent, fresh from the registry for this run.
        history: The thread's conversation so far, ending with the user's message, or with
            a partly answered assistant message when resuming a run.
        context: Passed to tools that ask for it.
        provider: Streams the model's responses.
        model: The model name as the provider knows it (`gpt-4o-mini`, not `openai:...`).
        sink: Persists and publishes the run's steps.
        model_idle_timeout_seconds: Longest wait for the model's next event.

    Raises:
        MaxStepsExceededError: The model still asked for tools after `agent.max_steps` steps.
        ModelProviderError: The model failed, or sent nothing for too long.
    """
    conversation = repair_history(history, keep_pending_tail=True)
    pending = pending_tool_calls(conversation)
    if pending:
        conversation.extend(await _run_tools(agent, pending, context, sink))
    usage = Usage()
    for step_number in range(1, agent.max_steps + 1):
        await sink.step_started()
        request = ModelRequest(agent.instructions, tuple(conversation), agent.tool_specs)
        stream = provider.stream(request, model=model)
        step = await _consume(stream, provider.name, sink, model_idle_timeout_seconds)
        usage += step.usage
        message = step.message()
        # Running tools after the last step would be wasted: no step is left to read them.
        final = not message.tool_calls or step_number == agent.max_steps
        await sink.assistant_message(message, final=final)
        conversation.append(message)
        if not message.tool_calls:
            return AgentOutcome(final_text=message.content, usage=usage, steps=step_number)
        if final:
            break
        conversation.extend(await _run_tools(agent, message.tool_calls, context, sink))
    raise MaxStepsExceededError(agent=agent.name, max_steps=agent.max_steps)


def resumed_calls(history: Sequence[ChatMessage]) -> tuple[ToolCall, ...]:
    """The tool calls `run_agent` runs before its first model call: those an earlier attempt of
    the run left unanswered at the end of `history` (none for a fresh run)."""
    return pending_tool_calls(repair_history(history, keep_pending_tail=True))


async def _consume(
    stream: AsyncIterator[ModelEvent], provider: str, sink: AgentEventSink, idle_timeout: float
) -> _Step:
    """Read one response to its `ResponseCompleted`, forwarding text and reasoning."""
    step = _Step()
    try:
        while True:
            event = await _next_event(stream, provider, idle_timeout)
            if isinstance(event, TextDelta):
                step.text.append(event.text)
                await sink.text_delta(event.text)
            elif isinstance(event, ReasoningDelta):
                await sink.thinking(event.text)
            elif isinstance(event, ToolCallRequested):
                step.tool_calls.append(event.call)
            elif isinstance(event, ResponseCompleted):
                step.usage = event.usage
                return step
    finally:
        # Release the provider's HTTP response now, including when we are cancelled.
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def _next_event(
    stream: AsyncIterator[ModelEvent], provider: str, idle_timeout: float
) -> ModelEvent:
    try:
        async with asyncio.timeout(idle_timeout):
            return await anext(stream)
    except StopAsyncIteration:
        raise ModelProviderError(
            "the model's response ended before it completed", provider=provider, retryable=True
        ) from None
    except TimeoutError as exc:
        raise ModelProviderError(
            f"the model sent nothing for {idle_timeout:g} seconds",
            provider=provider,
            retryable=True,
        ) from exc


async def _run_tools(
    agent: Agent, calls: Sequence[ToolCall], context: RunContext[object], sink: AgentEventSink
) -> list[ChatMessage]:
    """Run `calls` concurrently; return their TOOL messages in call order."""
    running = _Running(len(calls))
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(_run_tool(agent, call, context, sink, running)) for call in calls
        ]
    return [tool_message(call, task.result()) for call, task in zip(calls, tasks, strict=True)]


@dataclass(slots=True)
class _Running:
    """How many calls of a step have not finished: the last one to finish says so."""

    count: int


async def _run_tool(
    agent: Agent,
    call: ToolCall,
    context: RunContext[object],
    sink: AgentEventSink,
    running: _Running,
) -> ToolResult:
    await sink.tool_executing(call)
    tool = agent.get_tool(call.name)
    if tool is None:
        available = ", ".join(t.name for t in agent.tools) or "none"
        result = ToolResult(
            f"Unknown tool {call.name!r}. Available tools: {available}.", is_error=True
        )
    else:
        result = await tool.invoke(
            call.arguments, context, default_timeout_seconds=agent.tool_timeout_seconds
        )
    running.count -= 1
    await sink.tool_completed(call, result, last=running.count == 0)
    return result
