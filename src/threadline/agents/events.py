"""The seam between the agent loop and whoever records and broadcasts what a run does."""

from __future__ import annotations

from typing import Protocol

from threadline.agents.tools import ToolResult
from threadline.llm.types import ChatMessage, ToolCall


class AgentEventSink(Protocol):
    """Receives a run's steps as they happen, in order.

    The engine implements it: it persists messages and publishes live events. The loop awaits
    each call before going on, so a message is stored before anything that depends on it
    (a tool result is never recorded before the assistant message that asked for it).
    """

    async def thinking(self, text: str) -> None:
        """Status or reasoning text (`agent_thinking`)."""

    async def text_delta(self, text: str) -> None:
        """A chunk of the answer as it streams (`message_delta`)."""

    async def assistant_message(self, message: ChatMessage) -> None:
        """A model step finished: its full text and tool calls, before any tool runs."""

    async def tool_executing(self, call: ToolCall) -> None:
        """A tool call is about to run (`tool_executing`)."""

    async def tool_completed(self, call: ToolCall, result: ToolResult) -> None:
        """A tool call ended, well or not (`tool_completed`); persist `tool_message(...)`."""
