"""The seam between the agent loop and whoever records and broadcasts what a run does."""

from __future__ import annotations

from typing import Protocol

from threadline.agents.tools import ToolResult
from threadline.llm.types import ChatMessage, ToolCall

THINKING = "Thinking…"
"""The status text announcing a model call (`agent_thinking` at the start of each step)."""


class AgentEventSink(Protocol):
    """Receives a run's steps as they happen, in order.

    The engine implements it: it persists messages and publishes live events. The loop awaits
    each call before going on, so a message is stored before anything that depends on it
    (a tool result is never recorded before the assistant message that asked for it).

    Each write also says what the loop does right after it, with nothing to wait for in
    between (`final`, `last`): the sink may announce that next thing in the same write (one
    transaction instead of two) and then treats the loop's own call for it (`step_started`,
    `tool_executing`) as already done. Nothing is ever announced later than the loop's call.
    """

    async def step_started(self) -> None:
        """A model call begins (`agent_thinking` with `THINKING`)."""

    async def thinking(self, text: str) -> None:
        """Status or reasoning text from the model (`agent_thinking`)."""

    async def text_delta(self, text: str) -> None:
        """A chunk of the answer as it streams (`message_delta`)."""

    async def assistant_message(self, message: ChatMessage, *, final: bool) -> None:
        """A model step finished: its full text and tool calls, before any tool runs.

        `final`: the run ends with this message (an answer, or tool calls that no step is left
        to read the results of). Otherwise the loop runs its tool calls right after."""

    async def tool_executing(self, call: ToolCall) -> None:
        """A tool call is about to run (`tool_executing`)."""

    async def tool_completed(self, call: ToolCall, result: ToolResult, *, last: bool) -> None:
        """A tool call ended, well or not (`tool_completed`); persist `tool_message(...)`.

        `last`: no other call of the step is still running, so the next model call starts
        right after (the loop always reads tool results with another step)."""
