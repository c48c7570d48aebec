"""Threadline events -> the AI SDK UI message stream (protocol v1 of the `ai` npm package).

`UIMessageTranslator` is a pure fold over one run's wire events: `translate(event)` returns
the stream's parts (JSON objects) that the event stands for. A run is one assistant
`UIMessage` (its id is the run id); each model call is a step:

- `run_queued` / `agent_started` -> `start` (once), `start-step`;
- `agent_thinking` -> `reasoning-start`, `reasoning-delta`, `reasoning-end`;
- `message_delta` -> `text-start` (once per message, under its stored id), `text-delta`;
  `message_created` ends the text (`text-end`, or the whole text at once on replay) and
  turns its tool calls into `tool-input-start` + `tool-input-available`;
- `tool_completed` -> `tool-output-available` or `tool-output-error`; once every call of
  the step has its result the step ends (`finish-step`), and the next text opens a new one;
- `agent_completed` -> `finish`; `agent_failed` -> `error` then `finish`; `run_cancelled` ->
  `abort`. The route then sends `[DONE]`.

Events of other runs, and thread events, produce nothing.
"""

from __future__ import annotations

from threadline.api.protocols._wire import WireEvent, WireMessage

Part = dict[str, object]
HEADERS = {
    "x-vercel-ai-ui-message-stream": "v1",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_TERMINAL = frozenset({"agent_completed", "agent_failed", "run_cancelled"})


class UIMessageTranslator:
    def __init__(self, *, run_id: str) -> None:
        """
        Args:
            run_id: The run this stream shows; its id is the assistant message's id.
        """
        self._run_id = run_id
        self._started = False
        self._step = False
        self._text: str | None = None
        self._sent_text: set[str] = set()
        self._open_calls: set[str] = set()
        self._seen_calls: set[str] = set()
        self.finished = False

    def translate(self, message: WireMessage) -> list[Part]:
        event = WireEvent.of(message)
        if event.run_id != self._run_id or self.finished:
            return []
        out = self._start()
        if event.type in _TERMINAL:
            return out + self._finish(event)
        if event.type == "run_queued":
            return out
        if event.type == "agent_started":
            return out + self._close_text() + self._end_step()
        out += self._begin_step()
        if event.type == "agent_thinking" and event.text("text"):
            block = f"rsn-{event.seq}"
            return [
                *out,
                *self._close_text(),
                {"type": "reasoning-start", "id": block},
                {"type": "reasoning-delta", "id": block, "delta": event.text("text")},
                {"type": "reasoning-end", "id": block},
            ]
        if event.type == "message_delta":
            return out + self._delta(event)
        if event.type == "message_created":
            return out + self._message(event)
        if event.type == "tool_executing":
            return out + self._tool_input(
                event.text("call_id"), event.text("tool"), event.data.get("arguments")
            )
        if event.type == "tool_completed":
            return out + self._tool_output(event)
        return out

    def _start(self) -> list[Part]:
        if self._started:
            return []
        self._started = True
        return [{"type": "start", "messageId": self._run_id}]

    def _begin_step(self) -> list[Part]:
        if self._step:
            return []
        self._step = True
        return [{"type": "start-step"}]

    def _end_step(self) -> list[Part]:
        if not self._step:
            return []
        self._step = False
        self._open_calls.clear()
        return [{"type": "finish-step"}]

    def _close_text(self) -> list[Part]:
        if self._text is None:
            return []
        text_id, self._text = self._text, None
        return [{"type": "text-end", "id": text_id}]

    def _delta(self, event: WireEvent) -> list[Part]:
        text_id, text = event.text("message_id"), event.text("text")
        if not text or not text_id:
            return []
        out: list[Part] = []
        if self._text != text_id:
            out += self._close_text()
            self._text = text_id
            self._sent_text.add(text_id)
            out.append({"type": "text-start", "id": text_id})
        out.append({"type": "text-delta", "id": text_id, "delta": text})
        return out

    def _message(self, event: WireEvent) -> list[Part]:
        text_id, content = event.text("message_id"), event.text("content")
        out: list[Part] = []
        if self._text == text_id:
            out += self._close_text()
        elif content and text_id not in self._sent_text:
            self._sent_text.add(text_id)
            out += [
                *self._close_text(),
                {"type": "text-start", "id": text_id},
                {"type": "text-delta", "id": text_id, "delta": content},
                {"type": "text-end", "id": text_id},
            ]
        for call_id, name, arguments in event.tool_calls():
            out += self._tool_input(call_id, name, arguments)
        return out

    def _tool_input(self, call_id: str, name: str, arguments: object) -> list[Part]:
        if call_id in self._seen_calls:
            return []
        self._seen_calls.add(call_id)
        self._open_calls.add(call_id)
        return [
            *self._close_text(),
            {"type": "tool-input-start", "toolCallId": call_id, "toolName": name},
            {
                "type": "tool-input-available",
                "toolCallId": call_id,
                "toolName": name,
                "input": arguments if arguments is not None else {},
            },
        ]

    def _tool_output(self, event: WireEvent) -> list[Part]:
        call_id = event.text("call_id")
        out = self._tool_input(call_id, event.text("tool"), event.data.get("arguments"))
        if event.data.get("is_error"):
            out.append(
                {
                    "type": "tool-output-error",
                    "toolCallId": call_id,
                    "errorText": event.text("error"),
                }
            )
        else:
            out.append(
                {
                    "type": "tool-output-available",
                    "toolCallId": call_id,
                    "output": event.text("result"),
                }
            )
        self._open_calls.discard(call_id)
        if not self._open_calls:
            out += self._end_step()
        return out

    def _finish(self, event: WireEvent) -> list[Part]:
        self.finished = True
        out = self._close_text() + self._end_step()
        if event.type == "agent_failed":
            message = event.text("message") or "The run failed"
            code = event.text("code")
            return [
                *out,
                {"type": "error", "errorText": f"{code}: {message}" if code else message},
                {"type": "finish", "finishReason": "error"},
            ]
        if event.type == "run_cancelled":
            return [*out, {"type": "abort", "reason": event.text("reason") or "cancelled"}]
        return [*out, {"type": "finish", "finishReason": "stop"}]


def error_parts(message: str) -> list[Part]:
    """What a stream that fails after it started ends with (the route adds `[DONE]`)."""
    return [{"type": "error", "errorText": message}]
