"""Guarantee (b): runs survive a worker crash (C5), on both backends.

A crash is simulated in-process: the worker's task executing the run is cancelled while the
worker is kept from handing the run back to the queue (a dead process cannot release anything),
so the run stays `running` under the dead worker's lease. The lease is then made to expire, as
time would do, and the reaper requeues the run (or fails it after `max_attempts`). A retried run
must not repeat a tool call that already completed, and no run may stay `running` forever.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.test_runs_support import (
    TERMINAL_EVENTS,
    Harness,
    hold_the_model_after_tools,
    run_settings,
    running_app,
    unanswered_in_thread,
    wait_until,
)
from threadline.store.runs import Run

pytestmark = pytest.mark.integration


async def _crash(h: Harness, monkeypatch: pytest.MonkeyPatch, run_id: str) -> None:
    """Stop the run's execution the way a dying process does: no release, no terminal state."""
    worker = h.services.worker
    assert worker is not None
    task = h.services.execution.task_for(run_id)
    assert task is not None

    async def release_nothing(run: Run) -> None:
        return None

    with monkeypatch.context() as patch:
        patch.setattr(worker, "_release", release_nothing)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=30)
        assert done, "the run's task did not stop"
    row = await h.run_row(run_id)
    assert row["status"] == "running" and row["lease_owner"] == worker.worker_id, row


async def _expire_and_reap(h: Harness, run_id: str) -> None:
    worker = h.services.worker
    assert worker is not None
    attempt = (await h.run_row(run_id))["attempt"]
    await h.expire_lease(run_id)
    # The worker's own reaper loop may get there first; either way the run is handled once,
    # and then it is queued, claimed again (a new attempt), or failed: never the dead attempt.
    await worker.reap_expired()
    row = await h.run_row(run_id)
    assert row["status"] != "running" or row["attempt"] > attempt, row


async def test_retry_after_a_crash_does_not_repeat_a_completed_tool_call(
    settings_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_app(run_settings(settings_factory)) as h:
        hold_the_model_after_tools(h)
        user = await h.user()
        thread = await h.thread(user)
        run = await h.start(user, thread, "what is 12*7?", agent="counter")
        # The tool completed and the model's next step is under way when the worker dies.
        await wait_until(lambda: h.controls.model_held, what="the model step after the tool")
        assert h.controls.invocations[run["id"]] == 1
        await _crash(h, monkeypatch, run["id"])

        h.controls.model_gate.set()
        await _expire_and_reap(h, run["id"])
        done = await h.wait_run(user, thread, run["id"])
        assert done["status"] == "completed", done
        assert done["attempt"] == 2
        # The answer is built from the result stored by the first attempt's invocation.
        assert done["result"]["text"] == "12*7 = 84 (invocation 1)."
        assert h.controls.invocations[run["id"]] == 1

        messages = await h.messages(user, thread)
        (calling,) = [m for m in messages if m["tool_calls"]]
        (call,) = calling["tool_calls"]
        tool_messages = [m for m in messages if m["role"] == "tool"]
        assert [m["tool_call_id"] for m in tool_messages] == [call["id"]]
        assert tool_messages[0]["content"] == "84 (invocation 1)"
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]

        events = await h.run_events(user, thread, run["id"])
        types = [e.type.value for e in events]
        assert [e.data["attempt"] for e in events if e.type.value == "agent_started"] == [1, 2]
        assert types.count("tool_executing") == 1 and types.count("tool_completed") == 1
        assert [t for t in types if t in TERMINAL_EVENTS] == ["agent_completed"]
        await h.wait_idle(user)


async def test_a_run_that_keeps_losing_its_worker_fails_with_worker_lost(
    settings_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_app(run_settings(settings_factory, run_max_attempts=2)) as h:
        user = await h.user()
        thread = await h.thread(user)
        run = await h.start(user, thread, "what is 12*7?", agent="blocker")
        for attempt in (1, 2):
            await h.wait_tool_started(run["id"], count=attempt)
            row = await h.run_row(run["id"])
            assert (row["status"], row["attempt"]) == ("running", attempt)
            await _crash(h, monkeypatch, run["id"])
            await _expire_and_reap(h, run["id"])

        done = await h.wait_run(user, thread, run["id"])
        assert done["status"] == "failed", done
        assert done["attempt"] == 2
        assert done["error"]["code"] == "worker_lost"
        row = await h.run_row(run["id"])
        assert row["lease_owner"] is None and row["lease_expires_at"] is None

        events = await h.run_events(user, thread, run["id"])
        terminal = [(e.type.value, e.data["code"]) for e in events if e.type in TERMINAL_EVENTS]
        assert terminal == [("agent_failed", "worker_lost")]
        assert [e.data["attempt"] for e in events if e.type.value == "agent_started"] == [1, 2]
        # The unfinished call was retried (it never completed), and each attempt's tool saw
        # its worker die.
        assert h.controls.cancelled == [run["id"], run["id"]]

        # Not picked up again: the thread takes new runs, and the failed one stays failed.
        again = await h.start(user, thread, "what is 2*2?", agent="demo")
        assert (await h.wait_run(user, thread, again["id"]))["status"] == "completed"
        assert (await h.get_run(user, thread, run["id"]))["status"] == "failed"


async def test_a_run_failed_for_a_lost_worker_leaves_every_tool_call_answered(
    settings_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However a run ends, each of its tool calls has a result in the thread (the engine's
    invariant), also when the reaper ends it because its worker died."""
    async with running_app(run_settings(settings_factory, run_max_attempts=1)) as h:
        user = await h.user()
        thread = await h.thread(user)
        run = await h.start(user, thread, "what is 12*7?", agent="blocker")
        await h.wait_tool_started(run["id"])
        await _crash(h, monkeypatch, run["id"])
        await _expire_and_reap(h, run["id"])
        done = await h.wait_run(user, thread, run["id"])
        assert (done["status"], done["error"]["code"]) == ("failed", "worker_lost")
        assert unanswered_in_thread(await h.messages(user, thread)) == []
