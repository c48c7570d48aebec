"""How the terminal shows a run and a thread's history: thinking, tool cards, the answer.

`RunView` is rebuilt from a run's events as they arrive and rendered by `rich.live.Live`;
`history` renders stored messages the same way, so a thread reopened later looks like it did
live.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pydantic import JsonValue
from rich.console import Group, RenderableType
from rich.markdown import Markdown
from rich.padding import Padding
from rich.panel import Panel
from rich.spinner import Spinner
from rich.text import Text

from threadline.agents.events import THINKING
from threadline.client import Event, EventType, MessageOut, MessageRole

_MAX_RESULT_CHARS = 600
# C0 controls but tab and newline, DEL and C1: an escape sequence in a model's answer or a
# tool's result must not drive the terminal (rich prints them through as they are).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(text: str) -> str:
    """Text from the server, fit to print: without terminal control characters."""
    return _CONTROL.sub("", text)


@dataclass
class _Thinking:
    text: str = ""


@dataclass
class _Answer:
    text: str = ""
    closed: bool = False  # its message is stored: later text is a new block


@dataclass
class ToolCard:
    tool: str
    arguments: object
    result: str | None = None
    error: str | None = None
    duration_ms: float | None = None

    def __rich__(self) -> RenderableType:
        body: list[RenderableType] = [Text(safe(_arguments(self.arguments)), style="cyan")]
        if self.error is not None:
            body.append(Text(f"✗ {safe(_clip(self.error))}", style="red"))
            style = "red"
        elif self.result is not None:
            body.append(Text(f"→ {safe(_clip(self.result))}", style="bold"))
            style = "green"
        else:
            body.append(Spinner("dots", text=Text("running…", style="dim")))
            style = "yellow"
        subtitle = f"{self.duration_ms:.0f} ms" if self.duration_ms is not None else None
        return Panel(
            Group(*body),
            title=Text.assemble(("tool ", "bold"), safe(self.tool)),
            title_align="left",
            subtitle=subtitle,
            subtitle_align="right",
            border_style=style,
            expand=False,
        )


_Block = _Thinking | _Answer | ToolCard


@dataclass
class RunView:
    """The steps of one run, in the order they happened."""

    agent: str
    blocks: list[_Block] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)  # call id -> index of its card
    outcome: Text | None = None
    cancelling: bool = False
    reconnecting: Callable[[], bool] = lambda: False  # the event stream lost its connection

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def apply(self, event: Event) -> None:
        handlers: dict[str, Callable[[dict[str, JsonValue]], None]] = {
            EventType.AGENT_THINKING: self._thinking,
            EventType.MESSAGE_DELTA: self._delta,
            EventType.MESSAGE_CREATED: self._message,
            EventType.TOOL_EXECUTING: self._tool_started,
            EventType.TOOL_COMPLETED: self._tool_done,
            EventType.AGENT_COMPLETED: self._completed,
            EventType.AGENT_FAILED: self._failed,
            EventType.RUN_CANCELLED: self._cancelled,
        }
        handler = handlers.get(event.type)
        if handler is not None:
            handler(event.data)

    def _thinking(self, data: dict[str, JsonValue]) -> None:
        text = str(data.get("text", ""))
        last = self.blocks[-1] if self.blocks else None
        if text == THINKING or not isinstance(last, _Thinking):
            last = _Thinking()
            self.blocks.append(last)
        if text != THINKING:
            last.text += text

    def _delta(self, data: dict[str, JsonValue]) -> None:
        self._open_answer().text += str(data.get("text", ""))

    def _open_answer(self) -> _Answer:
        last = self.blocks[-1] if self.blocks else None
        if isinstance(last, _Answer) and not last.closed:
            return last
        answer = _Answer()
        self.blocks.append(answer)
        return answer

    def _message(self, data: dict[str, JsonValue]) -> None:
        if data.get("role") != MessageRole.ASSISTANT:
            return
        content = str(data.get("content") or "")
        last = self.blocks[-1] if self.blocks else None
        if isinstance(last, _Answer) and not last.closed:
            last.text = content or last.text  # the stored text also covers missed deltas
            last.closed = True
        elif content:
            self.blocks.append(_Answer(content, closed=True))

    def _tool_started(self, data: dict[str, JsonValue]) -> None:
        self.blocks.append(ToolCard(str(data.get("tool")), data.get("arguments")))
        self.calls[str(data.get("call_id"))] = len(self.blocks) - 1

    def _tool_done(self, data: dict[str, JsonValue]) -> None:
        index = self.calls.get(str(data.get("call_id")))
        found = self.blocks[index] if index is not None else None
        card = found if isinstance(found, ToolCard) else ToolCard(str(data.get("tool")), None)
        if found is None:  # it started before we subscribed
            self.blocks.append(card)
        if data.get("is_error"):
            card.error = str(data.get("error", "error"))
        else:
            card.result = str(data.get("result", ""))
        duration = data.get("duration_ms")
        card.duration_ms = float(duration) if isinstance(duration, int | float) else None

    def _completed(self, data: dict[str, JsonValue]) -> None:
        text = str(data.get("text") or "")
        if text and not any(isinstance(b, _Answer) and b.text for b in self.blocks):
            self.blocks.append(_Answer(text, closed=True))
        self.outcome = Text("")

    def _failed(self, data: dict[str, JsonValue]) -> None:
        reason = f"{data.get('code', 'error')}: {data.get('message', '')}".rstrip(": ")
        self.outcome = Text(f"✗ Run failed ({safe(reason)})", style="bold red")

    def _cancelled(self, data: dict[str, JsonValue]) -> None:
        reason = safe(str(data.get("reason", "user")))
        self.outcome = Text(f"■ Run cancelled ({reason})", style="bold yellow")

    def __rich__(self) -> RenderableType:
        parts: list[RenderableType] = [Text(f"{self.agent} ›", style="bold magenta")]
        for index, block in enumerate(self.blocks):
            live = not self.finished and index == len(self.blocks) - 1
            parts.append(_render(block, live=live))
        if not self.finished and (not self.blocks or isinstance(self.blocks[-1], ToolCard)):
            parts.append(Spinner("dots", text=Text("working…", style="dim")))
        if self.reconnecting() and not self.finished:
            parts.append(Spinner("dots", text=Text("Connection lost, reconnecting…", style="red")))
        if self.cancelling and not self.finished:
            parts.append(Text("Cancelling… (Ctrl-C again to quit)", style="yellow"))
        if self.outcome is not None and self.outcome.plain:
            parts.append(self.outcome)
        return Padding(Group(*parts), (0, 0, 1, 0))


def _render(block: _Block, *, live: bool) -> RenderableType:
    if isinstance(block, _Thinking):
        label = Text(safe(block.text.strip()) or THINKING, style="dim italic")
        return Spinner("dots", text=label) if live else Text("· ", style="dim") + label
    if isinstance(block, _Answer):
        return Markdown(safe(block.text) or " ")
    return block


def history(messages: Iterable[MessageOut], *, agent: str) -> list[RenderableType]:
    """Stored messages as the chat shows them: your turns, then each run's tool cards and
    answer."""
    rendered: list[RenderableType] = []
    cards: dict[str, ToolCard] = {}
    labelled: str | None = None  # the run whose answer is being shown
    for message in messages:
        if message.role == MessageRole.USER:
            rendered.append(Text.assemble(("you › ", "bold cyan"), safe(message.content)))
            labelled = None
        elif message.role == MessageRole.ASSISTANT:
            if labelled is None or labelled != message.run_id:
                rendered.append(Text(f"{agent} ›", style="bold magenta"))
                labelled = message.run_id or ""
            for call in message.tool_calls or []:
                card = ToolCard(str(call.get("name")), call.get("arguments"))
                cards[str(call.get("id"))] = card
                rendered.append(card)
            if message.content:
                rendered.append(Markdown(safe(message.content)))
        elif message.role == MessageRole.TOOL and message.tool_call_id in cards:
            card = cards[message.tool_call_id]
            if message.metadata.get("is_error"):
                card.error = message.content
            else:
                card.result = message.content
            duration = message.metadata.get("duration_ms")
            card.duration_ms = float(duration) if isinstance(duration, int | float) else None
    return rendered


def _arguments(arguments: object) -> str:
    if isinstance(arguments, dict) and all(
        isinstance(v, str | int | float) for v in arguments.values()
    ):
        return "\n".join(f"{key}: {value}" for key, value in arguments.items()) or "(no arguments)"
    return json.dumps(arguments, ensure_ascii=False, indent=2)


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_RESULT_CHARS else text[: _MAX_RESULT_CHARS - 1] + "…"
