"""The terminal chat's rendering of a run (`threadline.chat._view`), from events as the API
sends them: block order, deltas replaced by the stored text, tool cards paired with their
results, and server text that cannot drive the terminal."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from rich.console import Console

from threadline.chat._view import RunView, ToolCard, history
from threadline.client import Event, MessageOut

pytestmark = pytest.mark.unit
NOW = datetime.now(UTC)


def _event(seq: int, kind: str, **data: object) -> Event:
    return Event.model_validate(
        {"type": kind, "seq": seq, "thread_id": "thr_1", "run_id": "run_1", "ts": NOW, "data": data}
    )


def _screen(renderable: object) -> str:
    console = Console(file=io.StringIO(), force_terminal=True, width=100, color_system=None)
    console.print(renderable)
    output = console.file.getvalue()
    assert isinstance(output, str)
    return output


def _run_view(*events: Event) -> RunView:
    view = RunView("demo")
    for event in events:
        view.apply(event)
    return view


def test_a_run_renders_thinking_tool_card_and_answer_in_order() -> None:
    view = _run_view(
        _event(1, "agent_thinking", text="Thinking…"),
        _event(2, "agent_thinking", text="this is arithmetic."),
        _event(
            3, "tool_executing", tool="calculator", call_id="c1", arguments={"expression": "12*7"}
        ),
        _event(
            4,
            "tool_completed",
            tool="calculator",
            call_id="c1",
            result="84",
            is_error=False,
            duration_ms=1.5,
        ),
        _event(5, "message_delta", text="12*7 "),
        _event(7, "message_created", role="assistant", content="12*7 = 84."),  # 6 was missed
        _event(8, "agent_completed", text="12*7 = 84."),
    )
    screen = _screen(view)
    assert view.finished
    for earlier, later in [
        ("this is arithmetic.", "tool calculator"),
        ("tool calculator", "expression: 12*7"),
        ("→ 84", "12*7 = 84."),
    ]:
        assert screen.index(earlier) < screen.index(later), screen
    assert "2 ms" in screen and "Thinking…" not in screen
    assert screen.count("12*7 = 84.") == 1  # the stored text replaced the partial stream


def test_failed_and_cancelled_runs_say_so() -> None:
    failed = _run_view(_event(1, "agent_failed", code="model_error", message="boom"))
    assert "Run failed (model_error: boom)" in _screen(failed)
    errored = _run_view(
        _event(
            1, "tool_executing", tool="calculator", call_id="c1", arguments={"expression": "1/0"}
        ),
        _event(
            2,
            "tool_completed",
            tool="calculator",
            call_id="c1",
            error="division by zero",
            is_error=True,
            duration_ms=0.2,
        ),
    )
    assert "✗ division by zero" in _screen(errored)
    cancelled = _run_view(
        _event(1, "message_delta", text="Hel"), _event(2, "run_cancelled", reason="user")
    )
    assert "Run cancelled (user)" in _screen(cancelled)


def test_server_text_cannot_drive_the_terminal() -> None:
    hostile = "\x1b[2J\x1b]52;c;aGk=\x07\x9b31m[bold]x[/bold]"
    view = _run_view(
        _event(1, "agent_thinking", text=hostile),
        _event(2, "tool_executing", tool=hostile, call_id="c1", arguments={"a": hostile}),
        _event(3, "tool_completed", tool="t", call_id="c1", result=hostile, is_error=False),
        _event(4, "agent_completed", text=hostile),
    )
    screen = _screen(view)
    assert not any(ch in screen for ch in "\x1b\x07\x9b"), repr(screen)
    assert "[bold]x[/bold]" in screen  # shown as text, not taken as markup


def test_history_pairs_tool_calls_with_their_results() -> None:
    def message(position: int, role: str, content: str, **extra: object) -> MessageOut:
        return MessageOut.model_validate(
            {
                "id": f"msg_{position}",
                "thread_id": "thr_1",
                "position": position,
                "role": role,
                "content": content,
                "metadata": extra.pop("metadata", {}),
                "run_id": "run_1",
                "tool_calls": extra.pop("tool_calls", None),
                "tool_call_id": extra.pop("call", None),
                "created_at": NOW,
            }
        )

    rendered = history(
        [
            message(1, "user", "what is 12*7?"),
            message(
                2,
                "assistant",
                "",
                tool_calls=[
                    {"id": "c1", "name": "calculator", "arguments": {"expression": "12*7"}}
                ],
            ),
            message(3, "tool", "84", call="c1", metadata={"duration_ms": 3.0}),
            message(4, "assistant", "12*7 = 84."),
        ],
        agent="demo",
    )
    [card] = [r for r in rendered if isinstance(r, ToolCard)]
    assert (card.tool, card.result, card.duration_ms) == ("calculator", "84", 3.0)
    screen = "".join(_screen(r) for r in rendered)
    assert screen.index("you › what is 12*7?") < screen.index("demo ›") < screen.index("→ 84")
    assert screen.index("→ 84") < screen.index("12*7 = 84.")
