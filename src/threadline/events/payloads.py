"""One builder per event type: the only place an event's `data` is shaped.

docs/events.md documents every shape built here, when it is emitted and an example. Every
producer (the thread service, the run service, the engine and its sink, the reaper) calls these,
so an event type has exactly one shape whichever code path emits it, and the protocol adapters
(`threadline.api.protocols`) can rely on it.
"""

from __future__ import annotations

from threadline.events.types import JSONObject
from threadline.store.messages import Message
from threadline.store.runs import Run
from threadline.store.threads import Thread


def thread_changed(thread: Thread) -> JSONObject:
    """`thread_created` and `thread_updated`: the thread as it is after the change."""
    return {
        "thread_id": thread.id,
        "title": thread.title,
        "status": thread.status.value,
        "metadata": thread.metadata,
        "version": thread.version,
    }


def thread_deleted(thread_id: str) -> JSONObject:
    return {"thread_id": thread_id}


def message_created(message: Message) -> JSONObject:
    """A stored user or assistant message. Tool results are announced by `tool_completed`."""
    return {
        "message_id": message.id,
        "role": message.role.value,
        "content": message.content,
        "position": message.position,
        "tool_calls": list(message.tool_calls or ()),
    }


def message_moved(message_id: str, position: int) -> JSONObject:
    return {"message_id": message_id, "position": position}


def message_delta(message_id: str, text: str) -> JSONObject:
    """Streamed text of the assistant message `message_id`, stored later under that id."""
    return {"message_id": message_id, "text": text}


def run_queued(run: Run) -> JSONObject:
    return {"run_id": run.id, "agent": run.agent, "status": run.status.value}


def agent_started(agent: str, attempt: int) -> JSONObject:
    return {"agent": agent, "attempt": attempt}


def agent_thinking(text: str) -> JSONObject:
    return {"text": text}


def tool_executing(*, tool: str, call_id: str, arguments: JSONObject) -> JSONObject:
    return {"tool": tool, "call_id": call_id, "arguments": arguments}


def tool_completed(
    *,
    tool: str,
    call_id: str,
    message_id: str,
    content: str,
    is_error: bool,
    duration_ms: float,
) -> JSONObject:
    """The tool's result (or its error text under `error`) and the id of the tool message that
    stores it."""
    return {
        "tool": tool,
        "call_id": call_id,
        "message_id": message_id,
        "error" if is_error else "result": content,
        "is_error": is_error,
        "duration_ms": round(duration_ms, 3),
    }


def agent_completed(*, message_id: str | None, text: str, usage: JSONObject) -> JSONObject:
    """The final answer: its stored message, its text, and `usage` (`input_tokens`,
    `output_tokens`)."""
    return {"message_id": message_id, "text": text, "usage": usage}


def agent_failed(code: str, message: str) -> JSONObject:
    return {"code": code, "message": message}


def run_cancelled(reason: str) -> JSONObject:
    """`reason`: `user` (a cancel request), `interrupted` (a newer message interrupted it),
    `thread_archived` or `thread_deleted`."""
    return {"reason": reason}
