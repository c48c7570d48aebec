"""Pure functions that keep a conversation valid for a model provider.

Providers reject a history in which an assistant's tool call has no tool result before the
next turn, or a tool result answers no call. A run cancelled mid-tool, a crashed worker or
an interrupted run can leave exactly that in the store, so the engine repairs the history
it loads before every run. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from threadline.agents.tools import ToolResult
from threadline.llm.types import ChatMessage, Role, ToolCall

INCOMPLETE_TOOL_CALL = "Tool call did not complete (run cancelled or failed)"


def tool_message(call: ToolCall, result: ToolResult) -> ChatMessage:
    """The TOOL message that records `result` as the answer to `call`."""
    return ChatMessage(
        role=Role.TOOL,
        content=result.content,
        tool_call_id=call.call_id,
        tool_name=call.name,
        is_error=result.is_error,
    )


def pending_tool_calls(messages: Sequence[ChatMessage]) -> tuple[ToolCall, ...]:
    """Calls of a trailing assistant message that no later TOOL message answers yet.

    Empty unless the last message other than tool results is an assistant message with tool
    calls: that is the state a retried run resumes from.
    """
    tail = _pending_tail_index(messages)
    if tail is None:
        return ()
    answered = {m.tool_call_id for m in messages[tail + 1 :]}
    return tuple(call for call in messages[tail].tool_calls if call.call_id not in answered)


def repair_history(
    messages: Sequence[ChatMessage], *, keep_pending_tail: bool = False
) -> list[ChatMessage]:
    """Make every tool call answered exactly once, right after the message that made it.

    - A call with no result gets a synthetic error result, placed after the call's real
      results (with `keep_pending_tail`, the calls of a trailing assistant message are left
      unanswered, for the run that resumes them).
    - A TOOL message that answers no earlier call, or answers one already answered, is dropped.
    - A result stored after later messages moves up next to its call.
    - Everything else keeps its order.
    """
    results = _collect_results(messages)
    tail = _pending_tail_index(messages) if keep_pending_tail else None
    repaired: list[ChatMessage] = []
    for index, message in enumerate(messages):
        if message.role is Role.TOOL:
            continue  # re-emitted next to the call it answers
        repaired.append(message)
        if message.role is not Role.ASSISTANT or not message.tool_calls:
            continue
        answers = results.get(index, {})
        repaired.extend(answers.values())
        if index == tail:
            continue
        for call in _unique_calls(message.tool_calls):
            if call.call_id not in answers:
                repaired.append(_incomplete(call))
    return repaired


def window_history(messages: Sequence[ChatMessage], limit: int) -> list[ChatMessage]:
    """The last `limit` messages, or fewer: the window never opens on a TOOL message, so a
    tool result is never sent without the assistant message that called it."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    start = max(0, len(messages) - limit)
    while start < len(messages) and messages[start].role is Role.TOOL:
        start += 1
    return list(messages[start:])


def _collect_results(messages: Sequence[ChatMessage]) -> dict[int, dict[str, ChatMessage]]:
    """First result of each call, keyed by the index of the assistant message that made it.

    A call id answers the latest earlier assistant message that used it, since some servers
    reuse ids like `call_0` in every turn.
    """
    owner: dict[str, int] = {}
    results: dict[int, dict[str, ChatMessage]] = {}
    for index, message in enumerate(messages):
        if message.role is Role.ASSISTANT:
            owner.update((call.call_id, index) for call in message.tool_calls)
        elif message.role is Role.TOOL and message.tool_call_id in owner:
            answers = results.setdefault(owner[message.tool_call_id], {})
            answers.setdefault(message.tool_call_id, message)
    return results


def _pending_tail_index(messages: Sequence[ChatMessage]) -> int | None:
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.role is Role.TOOL:
            continue
        if message.role is Role.ASSISTANT and message.tool_calls:
            return index
        return None
    return None


def _unique_calls(calls: Sequence[ToolCall]) -> list[ToolCall]:
    seen: set[str] = set()
    unique = []
    for call in calls:
        if call.call_id not in seen:
            seen.add(call.call_id)
            unique.append(call)
    return unique


def _incomplete(call: ToolCall) -> ChatMessage:
    return ChatMessage(
        role=Role.TOOL,
        content=INCOMPLETE_TOOL_CALL,
        tool_call_id=call.call_id,
        tool_name=call.name,
        is_error=True,
    )
