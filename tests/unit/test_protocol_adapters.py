"""The protocol adapters on their own: Threadline wire events in, AG-UI events / AI SDK parts
out, with no server. The AG-UI output is checked by the `ag-ui-validate` rules too."""

from __future__ import annotations

from typing import Any

import pytest
from ag_ui_validate.pytest_plugin import assert_valid_agui

from threadline.api.protocols.agui import PROTOCOL_VERSION, AguiTranslator
from threadline.api.protocols.aisdk import UIMessageTranslator

pytestmark = pytest.mark.unit
JSON = dict[str, Any]
THREAD = "thr_01J0000000000000000000000T"


class Log:
    """Builds a thread's wire events with increasing seq, as the server numbers them."""

    def __init__(self) -> None:
        self.seq = 0

    def event(self, type_: str, data: JSON, *, run: str | None) -> JSON:
        self.seq += 1
        return {
            "type": type_,
            "seq": self.seq,
            "thread_id": THREAD,
            "run_id": run,
            "ts": "2026-01-01T00:00:00.000Z",
            "data": data,
        }

    def user(self, text: str, message_id: str = "msg_user") -> JSON:
        data = {"message_id": message_id, "role": "user", "content": text, "position": 0}
        return self.event("message_created", {**data, "tool_calls": []}, run=None)

    def tool_run(self, run: str, *, deltas: bool = True, outcome: str = "completed") -> list[JSON]:
        """A demo-model run: thinking, a calculator call, then the answer."""
        call = {"id": f"call-{run}", "name": "calculator", "arguments": {"expression": "12*7"}}
        answer = f"msg-{run}-answer"
        events = [
            self.event("run_queued", {"run_id": run, "agent": "demo", "status": "queued"}, run=run),
            self.event("agent_started", {"agent": "demo", "attempt": 1}, run=run),
            self.event("agent_thinking", {"text": "This is arithmetic."}, run=run),
            self.event(
                "message_created",
                {
                    "message_id": f"msg-{run}-call",
                    "role": "assistant",
                    "content": "",
                    "position": 1,
                    "tool_calls": [call],
                },
                run=run,
            ),
            self.event(
                "tool_executing",
                {"tool": "calculator", "call_id": call["id"], "arguments": call["arguments"]},
                run=run,
            ),
            self.event(
                "tool_completed",
                {
                    "tool": "calculator",
                    "call_id": call["id"],
                    "message_id": f"msg-{run}-tool",
                    "result": "84",
                    "is_error": False,
                    "duration_ms": 0.2,
                },
                run=run,
            ),
        ]
        if deltas:
            for text in ("12*7 ", "= 84."):
                events.append(
                    self.event("message_delta", {"message_id": answer, "text": text}, run=run)
                )
        if outcome == "failed":
            events.append(
                self.event("agent_failed", {"code": "agent_error", "message": "boom"}, run=run)
            )
            return events
        if outcome == "cancelled":
            events.append(self.event("run_cancelled", {"reason": "user"}, run=run))
            return events
        events.append(
            self.event(
                "message_created",
                {
                    "message_id": answer,
                    "role": "assistant",
                    "content": "12*7 = 84.",
                    "position": 3,
                    "tool_calls": [],
                },
                run=run,
            )
        )
        usage = {"input_tokens": 5, "output_tokens": 3}
        events.append(
            self.event(
                "agent_completed",
                {"message_id": answer, "text": "12*7 = 84.", "usage": usage},
                run=run,
            )
        )
        return events


def agui(translator: AguiTranslator, events: list[JSON]) -> list[JSON]:
    out: list[JSON] = []
    for event in events:
        out += [e.model_dump(mode="json", by_alias=True) for e in translator.translate(event)]
    return out


def aisdk(translator: UIMessageTranslator, events: list[JSON]) -> list[JSON]:
    return [part for event in events for part in translator.translate(event)]


# ------------------------------------------------------------------------------ AG-UI


def test_a_tool_run_maps_to_valid_ag_ui() -> None:
    log = Log()
    events = [log.user("What is 12*7?"), *log.tool_run("run_a")]
    translator = AguiTranslator(thread_id="client-thread", only_run="run_a", run_alias="r-1")
    out = agui(translator, events)

    assert [e["type"] for e in out] == [
        "RUN_STARTED",
        "REASONING_START",
        "REASONING_MESSAGE_START",
        "REASONING_MESSAGE_CONTENT",
        "REASONING_MESSAGE_END",
        "REASONING_END",
        "TOOL_CALL_START",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "TOOL_CALL_RESULT",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_CONTENT",
        "TEXT_MESSAGE_END",
        "RUN_FINISHED",
    ]
    started, finished = out[0], out[-1]
    assert started["threadId"] == "client-thread" and started["runId"] == "r-1"
    assert started["protocolVersion"] == PROTOCOL_VERSION
    assert finished["runId"] == "r-1" and finished["outcome"] == {"type": "success"}
    tool_start = out[6]
    assert tool_start["toolCallId"] == "call-run_a" and tool_start["parentMessageId"]
    assert out[7]["delta"] == '{"expression": "12*7"}'
    assert out[9] == {**out[9], "messageId": "msg-run_a-tool", "content": "84"}
    assert {e["messageId"] for e in out[10:14]} == {"msg-run_a-answer"}
    assert translator.finished
    assert_valid_agui(out, max_warnings=0)


def test_replay_without_deltas_sends_each_message_whole_once() -> None:
    log = Log()
    stored = [e for e in [log.user("What is 12*7?"), *log.tool_run("run_a")]]
    durable = [e for e in stored if e["type"] != "message_delta"]
    out = agui(AguiTranslator(thread_id=THREAD, include_user_messages=True), durable)

    texts = [(e["messageId"], e["delta"]) for e in out if e["type"] == "TEXT_MESSAGE_CONTENT"]
    assert texts == [("msg_user", "What is 12*7?"), ("msg-run_a-answer", "12*7 = 84.")]
    user_start = next(e for e in out if e["type"] == "TEXT_MESSAGE_START")
    assert user_start["role"] == "user"
    assert out[0]["type"] == "RUN_STARTED" and out[0]["runId"] == "run_a"
    assert_valid_agui(out, max_warnings=0)


def test_runs_queued_behind_each_other_follow_in_turn() -> None:
    """Run b is queued while run a streams (enqueue): b opens when it starts, never inside a."""
    log = Log()
    a = log.tool_run("run_a")
    queued_b = log.event("run_queued", {"run_id": "run_b"}, run="run_b")
    events = [*a[:5], log.user("And 5*5?", "msg_user_b"), queued_b, *a[5:]]
    b = log.tool_run("run_b")
    events += b[1:]  # b's run_queued was already sent above
    out = agui(AguiTranslator(thread_id=THREAD, include_user_messages=True), events)

    lifecycle = [(e["type"], e.get("runId")) for e in out if e["type"].startswith("RUN_")]
    assert lifecycle == [
        ("RUN_STARTED", "run_a"),
        ("RUN_FINISHED", "run_a"),
        ("RUN_STARTED", "run_b"),
        ("RUN_FINISHED", "run_b"),
    ]
    b_start = out.index(next(e for e in out if e.get("runId") == "run_b"))
    assert out[b_start + 2]["delta"] == "And 5*5?"  # b's user message opens b
    assert_valid_agui(out, max_warnings=0)


def test_failures_and_cancellations_end_the_run_as_the_protocol_says() -> None:
    log = Log()
    failed = agui(AguiTranslator(thread_id=THREAD), log.tool_run("run_f", outcome="failed"))
    assert failed[-2]["type"] == "TEXT_MESSAGE_END"  # the streamed text is closed first
    assert failed[-1] == {**failed[-1], "type": "RUN_ERROR", "code": "agent_error"}
    assert_valid_agui(failed, max_warnings=0)

    cancelled = agui(AguiTranslator(thread_id=THREAD), log.tool_run("run_c", outcome="cancelled"))
    assert cancelled[-1]["type"] == "RUN_FINISHED"
    assert cancelled[-1]["outcome"] == {"type": "cancelled"}
    assert_valid_agui(cancelled, max_warnings=0)


def test_a_queued_run_cancelled_while_another_runs_produces_nothing() -> None:
    log = Log()
    a = log.tool_run("run_a")
    translator = AguiTranslator(thread_id=THREAD)
    agui(translator, a[:4])
    assert translator.translate(log.event("run_queued", {}, run="run_b")) == []
    assert translator.translate(log.event("run_cancelled", {"reason": "user"}, run="run_b")) == []
    assert agui(translator, a[4:])[-1]["type"] == "RUN_FINISHED"


def test_only_the_requested_run_and_no_thread_events() -> None:
    log = Log()
    translator = AguiTranslator(thread_id=THREAD, only_run="run_mine")
    noise = [
        log.event("thread_updated", {"thread_id": THREAD, "title": "x"}, run=None),
        log.user("hello"),
        *log.tool_run("run_other"),
        {"type": "snapshot", "thread_id": THREAD, "last_seq": 3, "active_run": None},
    ]
    assert agui(translator, noise) == []
    assert not translator.finished


def test_a_resumed_stream_does_not_start_the_run_again() -> None:
    log = Log()
    events = log.tool_run("run_a")
    out = agui(AguiTranslator(thread_id=THREAD, open_run="run_a"), events[4:])
    assert "RUN_STARTED" not in [e["type"] for e in out]
    assert out[-1]["type"] == "RUN_FINISHED"


# --------------------------------------------------------------------------- AI SDK


def test_a_tool_run_maps_to_ui_message_parts() -> None:
    log = Log()
    events = [log.user("What is 12*7?"), *log.tool_run("run_a")]
    translator = UIMessageTranslator(run_id="run_a")
    parts = aisdk(translator, events)

    assert [p["type"] for p in parts] == [
        "start",
        "start-step",
        "reasoning-start",
        "reasoning-delta",
        "reasoning-end",
        "tool-input-start",
        "tool-input-available",
        "tool-output-available",
        "finish-step",
        "start-step",
        "text-start",
        "text-delta",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    assert parts[0] == {"type": "start", "messageId": "run_a"}
    assert parts[6]["input"] == {"expression": "12*7"} and parts[6]["toolName"] == "calculator"
    assert parts[7] == {"type": "tool-output-available", "toolCallId": "call-run_a", "output": "84"}
    assert "".join(p["delta"] for p in parts if p["type"] == "text-delta") == "12*7 = 84."
    assert parts[-1] == {"type": "finish", "finishReason": "stop"}
    assert translator.finished


def test_ui_message_failure_error_and_cancel_abort() -> None:
    log = Log()
    failed = aisdk(UIMessageTranslator(run_id="run_f"), log.tool_run("run_f", outcome="failed"))
    assert failed[-2] == {"type": "error", "errorText": "agent_error: boom"}
    assert failed[-1] == {"type": "finish", "finishReason": "error"}
    cancelled = aisdk(
        UIMessageTranslator(run_id="run_c"), log.tool_run("run_c", outcome="cancelled")
    )
    assert cancelled[-1] == {"type": "abort", "reason": "user"}
    assert {"type": "text-end", "id": "msg-run_c-answer"} in cancelled


def test_tool_errors_and_other_runs() -> None:
    log = Log()
    translator = UIMessageTranslator(run_id="run_a")
    assert aisdk(translator, log.tool_run("run_b")) == []
    error = log.event(
        "tool_completed",
        {"tool": "calc", "call_id": "c1", "error": "bad", "is_error": True},
        run="run_a",
    )
    parts = translator.translate(error)
    assert parts[-2:] == [
        {"type": "tool-output-error", "toolCallId": "c1", "errorText": "bad"},
        {"type": "finish-step"},
    ]


def test_a_deleted_thread_ends_the_ag_ui_replay() -> None:
    log = Log()
    translator = AguiTranslator(thread_id=THREAD)
    agui(translator, log.tool_run("run_a")[:3])
    out = agui(translator, [log.event("thread_deleted", {"thread_id": THREAD}, run=None)])
    assert translator.finished and out == []  # nothing was streaming yet
