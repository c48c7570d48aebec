"""Stored messages <-> the model's conversation shapes."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.agents.history import INCOMPLETE_TOOL_CALL
from threadline.context import UserContext
from threadline.llm.types import ChatMessage, Role, ToolCall
from threadline.store.messages import Message, MessageRole, MessageStore, NewMessage
from threadline.store.runs import Run

JSONObject = dict[str, object]
_ROLES = {
    MessageRole.USER: Role.USER,
    MessageRole.ASSISTANT: Role.ASSISTANT,
    MessageRole.TOOL: Role.TOOL,
    MessageRole.SYSTEM: Role.SYSTEM,
}


def to_chat(message: Message) -> ChatMessage:
    calls = tuple(
        ToolCall(
            call_id=str(call["id"]),
            name=str(call["name"]),
            arguments=dict(call.get("arguments") or {}),  # type: ignore[call-overload]
        )
        for call in message.tool_calls or ()
    )
    return ChatMessage(
        role=_ROLES[message.role],
        content=message.content,
        tool_calls=calls,
        tool_call_id=message.tool_call_id,
        tool_name=_str_or_none(message.metadata.get("tool_name")),
        is_error=bool(message.metadata.get("is_error", False)),
    )


def to_chat_history(messages: Sequence[Message]) -> list[ChatMessage]:
    return [to_chat(message) for message in messages]


def calls_to_json(calls: Sequence[ToolCall]) -> list[JSONObject]:
    return [{"id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls]


def assistant_message(message: ChatMessage, *, run_id: str) -> NewMessage:
    return NewMessage(
        role=MessageRole.ASSISTANT,
        content=message.content,
        run_id=run_id,
        tool_calls=calls_to_json(message.tool_calls) or None,
    )


def tool_result_message(
    call: ToolCall, *, content: str, is_error: bool, duration_ms: float, run_id: str
) -> NewMessage:
    return NewMessage(
        role=MessageRole.TOOL,
        content=content,
        run_id=run_id,
        tool_call_id=call.call_id,
        metadata={
            "tool_name": call.name,
            "is_error": is_error,
            "duration_ms": round(duration_ms, 3),
        },
    )


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


async def close_unanswered_tool_calls(
    conn: AsyncConnection, messages: MessageStore, ctx: UserContext, *, run: Run
) -> int:
    """Give every tool call of `run` that has no result a synthetic error result, so the
    thread stays valid for every provider however the run ended. Returns how many."""
    stored = await messages.recent(conn, ctx, run.thread_id, window=500)
    mine = [m for m in stored if m.run_id == run.id]
    answered = {m.tool_call_id for m in mine if m.role is MessageRole.TOOL}
    closed = 0
    for message in mine:
        if message.role is not MessageRole.ASSISTANT:
            continue
        for call in to_chat(message).tool_calls:
            if call.call_id in answered:
                continue
            result = tool_result_message(
                call, content=INCOMPLETE_TOOL_CALL, is_error=True, duration_ms=0.0, run_id=run.id
            )
            await messages.append(conn, ctx, run.thread_id, result)
            closed += 1
    return closed
