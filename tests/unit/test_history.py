"""History repair and windowing: what the model is sent must always be a valid conversation."""

from __future__ import annotations

import pytest

from threadline.agents.history import (
    INCOMPLETE_TOOL_CALL,
    pending_tool_calls,
    repair_history,
    tool_message,
    window_history,
)
from threadline.agents.tools import ToolResult
from threadline.llm.types import ChatMessage, Role, ToolCall

pytestmark = pytest.mark.unit


def user(text: str) -> ChatMessage:
    return ChatMessage(Role.USER, text)


def asks(*ids: str, text: str = "") -> ChatMessage:
    return ChatMessage(Role.ASSISTANT, text, tuple(ToolCall(i, "lookup", {}) for i in ids))


def answer(call_id: str, content: str = "ok") -> ChatMessage:
    return ChatMessage(Role.TOOL, content, tool_call_id=call_id, tool_name="lookup")


def incomplete(call_id: str) -> ChatMessage:
    return ChatMessage(
        Role.TOOL, INCOMPLETE_TOOL_CALL, tool_call_id=call_id, tool_name="lookup", is_error=True
    )


def test_a_valid_history_is_unchanged() -> None:
    history = [
        user("q"),
        asks("a", "b"),
        answer("b"),
        answer("a"),
        ChatMessage(Role.ASSISTANT, "x"),
    ]
    assert repair_history(history) == history


def test_missing_results_get_a_synthetic_error_after_the_real_ones() -> None:
    history = [user("q"), asks("a", "b", "c"), answer("b"), user("next")]
    assert repair_history(history) == [
        user("q"),
        asks("a", "b", "c"),
        answer("b"),
        incomplete("a"),
        incomplete("c"),
        user("next"),
    ]


def test_orphan_and_duplicate_results_are_dropped() -> None:
    history = [answer("ghost"), user("q"), asks("a"), answer("a", "1"), answer("a", "2")]
    assert repair_history(history) == [user("q"), asks("a"), answer("a", "1")]


def test_a_result_stored_late_moves_next_to_its_call() -> None:
    history = [user("q"), asks("a"), user("hurry"), answer("a")]
    assert repair_history(history) == [user("q"), asks("a"), answer("a"), user("hurry")]


def test_reused_call_ids_answer_the_latest_call() -> None:
    history = [user("1"), asks("call_0"), answer("call_0", "first"), user("2"), asks("call_0")]
    assert repair_history(history) == [*history, incomplete("call_0")]


def test_a_trailing_pending_call_is_repaired_unless_kept() -> None:
    history = [user("q"), asks("a", "b"), answer("a")]
    assert repair_history(history) == [*history, incomplete("b")]
    assert repair_history(history, keep_pending_tail=True) == history


def test_keep_pending_tail_still_repairs_earlier_calls() -> None:
    history = [user("q"), asks("old"), user("again"), asks("new")]
    assert repair_history(history, keep_pending_tail=True) == [
        user("q"),
        asks("old"),
        incomplete("old"),
        user("again"),
        asks("new"),
    ]


def test_pending_tool_calls() -> None:
    assert pending_tool_calls([user("q"), asks("a", "b"), answer("b")]) == (
        ToolCall("a", "lookup", {}),
    )
    assert pending_tool_calls([user("q"), asks("a"), answer("a")]) == ()
    assert pending_tool_calls([user("q"), asks("a"), user("more")]) == ()
    assert pending_tool_calls([]) == ()


def test_window_never_opens_on_a_tool_result() -> None:
    history = [
        user("q"),
        asks("a", "b"),
        answer("a"),
        answer("b"),
        ChatMessage(Role.ASSISTANT, "x"),
    ]
    assert window_history(history, 3) == [ChatMessage(Role.ASSISTANT, "x")]
    assert window_history(history, 4) == history[1:]
    assert window_history(history, 50) == history


def test_window_rejects_a_non_positive_limit() -> None:
    with pytest.raises(ValueError):
        window_history([user("q")], 0)


def test_tool_message_records_the_result() -> None:
    call = ToolCall("c9", "lookup", {"k": 1})
    assert tool_message(call, ToolResult("no", is_error=True, duration_ms=3)) == ChatMessage(
        Role.TOOL, "no", tool_call_id="c9", tool_name="lookup", is_error=True
    )
