"""Threadline events -> AG-UI 1.0 events (the `ag-ui-protocol` package's types).

`AguiTranslator` is a pure fold over one stream's wire events: `translate(event)` returns the
AG-UI events that the Threadline event stands for, in order. It does no I/O; the routes encode
what it returns with the package's `EventEncoder`.

Mapping (docs/protocols.md has the table):
- a run opens with RUN_STARTED at its `run_queued` or `agent_started`, whichever comes first,
  and only while no other run is open (a thread runs one run at a time; a run queued behind
  another opens when it starts). It closes with RUN_FINISHED (outcome `success` or
  `cancelled`) or RUN_ERROR (with the failure's code).
- `message_delta` streams TEXT_MESSAGE_START/CONTENT, under the message's stored id, and
  `message_created` ends it (or sends the whole text at once on replay, where deltas are
  gone). Its tool calls become TOOL_CALL_START/ARGS/END with the message as parent;
  `tool_completed` becomes TOOL_CALL_RESULT under the tool message's id.
- `agent_thinking` becomes one REASONING_START ... REASONING_END block.
- user messages (with `include_user_messages`, for the thread replay) are sent as
  TEXT_MESSAGE_* with role `user` at the start of the next run, since AG-UI has no events
  outside a run.
Events of other runs than `only_run` (when given) and events that AG-UI has no word for
(thread changes, `message_moved`) produce nothing.
"""

from __future__ import annotations

import json

from ag_ui.core import (
    BaseEvent,
    ReasoningEndEvent,
    ReasoningMessageContentEvent,
    ReasoningMessageEndEvent,
    ReasoningMessageStartEvent,
    ReasoningStartEvent,
    RunErrorEvent,
    RunFinishedCancelledOutcome,
    RunFinishedEvent,
    RunFinishedSuccessOutcome,
    RunStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
)
from ag_ui.core.version import PROTOCOL_VERSION

from threadline.api.protocols._wire import WireEvent, WireMessage

__all__ = ["PROTOCOL_VERSION", "AguiTranslator"]

_TERMINAL = frozenset({"agent_completed", "agent_failed", "run_cancelled"})


class AguiTranslator:
    """Translates one stream's Threadline events to AG-UI events, keeping only what the
    protocol's pairing rules need (the open run, text message and tool calls)."""

    def __init__(
        self,
        *,
        thread_id: str,
        only_run: str | None = None,
        run_alias: str | None = None,
        include_user_messages: bool = False,
        open_run: str | None = None,
    ) -> None:
        """
        Args:
            thread_id: The `threadId` the client knows the thread by.
            only_run: Translate this run's events only (the POST endpoint's own run).
            run_alias: The `runId` to report for `only_run` (the client's own run id).
            include_user_messages: Send the thread's user messages (the thread replay).
            open_run: A run the client already saw start (a resumed stream).
        """
        self._thread_id = thread_id
        self._only_run = only_run
        self._run_alias = run_alias
        self._include_user = include_user_messages
        self._open_run = open_run
        self._pending_user: list[WireEvent] = []
        self._text: str | None = None
        self._sent_messages: set[str] = set()
        self._started_calls: set[str] = set()
        self.finished = False
        """True once `only_run` has ended, or the thread was deleted."""

    @property
    def open_run(self) -> str | None:
        """The run whose RUN_STARTED went out and whose end has not."""
        return self._open_run

    def close(self) -> list[BaseEvent]:
        """End what is open before the stream stops early (the caller adds RUN_ERROR)."""
        self.finished = True
        return self._close_text(None)

    def translate(self, message: WireMessage) -> list[BaseEvent]:
        event = WireEvent.of(message)
        if event.type == "thread_deleted":
            self.finished = True
            return self._close_text(event)
        if event.type == "message_created" and event.run_id is None:
            if self._include_user and event.text("role") == "user":
                self._pending_user.append(event)
            return []
        if event.run_id is None or (self._only_run and event.run_id != self._only_run):
            return []
        if event.type in _TERMINAL:
            return self._finish(event)
        out = self._ensure_run(event)
        if self._open_run != event.run_id:
            return out  # a run queued behind the open one: it opens when it starts
        handler = _HANDLERS.get(event.type)
        if handler is not None:
            out += handler(self, event)
        return out

    # -- runs

    def _run_id(self, run_id: str) -> str:
        return self._run_alias if self._run_alias and run_id == self._only_run else run_id

    def _ensure_run(self, event: WireEvent) -> list[BaseEvent]:
        if self._open_run is not None or event.run_id is None:
            if event.type == "agent_started" and self._open_run == event.run_id:
                return self._close_text(event)  # a retry: what streamed before is over
            return []
        self._open_run = event.run_id
        self._sent_messages.clear()
        self._started_calls.clear()
        out: list[BaseEvent] = [
            RunStartedEvent(
                thread_id=self._thread_id,
                run_id=self._run_id(event.run_id),
                protocol_version=PROTOCOL_VERSION,
                timestamp=event.timestamp_ms,
            )
        ]
        for user in self._pending_user:
            out += self._whole_message(user, role="user")
        self._pending_user.clear()
        return out

    def _finish(self, event: WireEvent) -> list[BaseEvent]:
        run_id = event.run_id or ""
        if self._open_run not in (None, run_id):
            return []  # a queued run cancelled before it started, while another runs
        out = self._ensure_run(event) + self._close_text(event)
        self._open_run = None
        self.finished = self.finished or run_id == self._only_run
        thread, run, ts = self._thread_id, self._run_id(run_id), event.timestamp_ms
        if event.type == "agent_failed":
            out.append(
                RunErrorEvent(
                    message=event.text("message") or "The run failed",
                    code=event.optional_text("code"),
                    timestamp=event.timestamp_ms,
                )
            )
        elif event.type == "run_cancelled":
            cancelled = RunFinishedCancelledOutcome()
            out.append(
                RunFinishedEvent(thread_id=thread, run_id=run, outcome=cancelled, timestamp=ts)
            )
        else:
            result = {"text": event.text("text"), "message_id": event.optional_text("message_id")}
            success = RunFinishedSuccessOutcome()
            out.append(
                RunFinishedEvent(
                    thread_id=thread, run_id=run, outcome=success, result=result, timestamp=ts
                )
            )
        return out

    # -- messages

    def _close_text(self, event: WireEvent | None) -> list[BaseEvent]:
        if self._text is None:
            return []
        message_id, self._text = self._text, None
        ts = event.timestamp_ms if event else None
        return [TextMessageEndEvent(message_id=message_id, timestamp=ts)]

    def _delta(self, event: WireEvent) -> list[BaseEvent]:
        message_id, text = event.text("message_id"), event.text("text")
        if not text or not message_id:
            return []
        out: list[BaseEvent] = []
        if self._text != message_id:
            out += self._close_text(event)
            if message_id in self._sent_messages:
                return out  # resumed mid-message: its start went out on the earlier stream
            self._text = message_id
            self._sent_messages.add(message_id)
            out.append(
                TextMessageStartEvent(
                    message_id=message_id, role="assistant", timestamp=event.timestamp_ms
                )
            )
        out.append(
            TextMessageContentEvent(message_id=message_id, delta=text, timestamp=event.timestamp_ms)
        )
        return out

    def _message(self, event: WireEvent) -> list[BaseEvent]:
        message_id = event.text("message_id")
        out: list[BaseEvent] = []
        if self._text == message_id:
            out += self._close_text(event)
        elif message_id not in self._sent_messages and event.text("content"):
            out += self._close_text(event) + self._whole_message(event, role="assistant")
        for call_id, name, arguments in event.tool_calls():
            out += self._tool_call(
                event, call_id=call_id, name=name, arguments=arguments, parent=message_id
            )
        return out

    def _whole_message(self, event: WireEvent, *, role: str) -> list[BaseEvent]:
        message_id, content, ts = (
            event.text("message_id"),
            event.text("content"),
            event.timestamp_ms,
        )
        self._sent_messages.add(message_id)
        start = TextMessageStartEvent(message_id=message_id, role=role, timestamp=ts)
        end = TextMessageEndEvent(message_id=message_id, timestamp=ts)
        if not content:
            return [start, end]
        body = TextMessageContentEvent(message_id=message_id, delta=content, timestamp=ts)
        return [start, body, end]

    # -- tools and reasoning

    def _tool_call(
        self, event: WireEvent, *, call_id: str, name: str, arguments: object, parent: str | None
    ) -> list[BaseEvent]:
        if call_id in self._started_calls:
            return []
        self._started_calls.add(call_id)
        ts = event.timestamp_ms
        return [
            *self._close_text(event),
            ToolCallStartEvent(
                tool_call_id=call_id, tool_call_name=name, parent_message_id=parent, timestamp=ts
            ),
            ToolCallArgsEvent(tool_call_id=call_id, delta=json.dumps(arguments), timestamp=ts),
            ToolCallEndEvent(tool_call_id=call_id, timestamp=ts),
        ]

    def _executing(self, event: WireEvent) -> list[BaseEvent]:
        arguments = event.data.get("arguments")
        return self._tool_call(
            event,
            call_id=event.text("call_id"),
            name=event.text("tool"),
            arguments=arguments if arguments is not None else {},
            parent=None,
        )

    def _completed(self, event: WireEvent) -> list[BaseEvent]:
        call_id = event.text("call_id")
        out = self._executing(event) if call_id not in self._started_calls else []
        content = event.text("error") if event.data.get("is_error") else event.text("result")
        out.append(
            ToolCallResultEvent(
                message_id=event.text("message_id") or f"{call_id}-result",
                tool_call_id=call_id,
                content=content,
                role="tool",
                timestamp=event.timestamp_ms,
            )
        )
        return out

    def _thinking(self, event: WireEvent) -> list[BaseEvent]:
        text = event.text("text")
        if not text:
            return []
        block = f"rsn-{event.run_id}-{event.seq}"
        ts = event.timestamp_ms
        return [
            *self._close_text(event),
            ReasoningStartEvent(message_id=block, timestamp=ts),
            ReasoningMessageStartEvent(message_id=block, timestamp=ts),
            ReasoningMessageContentEvent(message_id=block, delta=text, timestamp=ts),
            ReasoningMessageEndEvent(message_id=block, timestamp=ts),
            ReasoningEndEvent(message_id=block, timestamp=ts),
        ]


_HANDLERS = {
    "message_delta": AguiTranslator._delta,
    "message_created": AguiTranslator._message,
    "tool_executing": AguiTranslator._executing,
    "tool_completed": AguiTranslator._completed,
    "agent_thinking": AguiTranslator._thinking,
}
