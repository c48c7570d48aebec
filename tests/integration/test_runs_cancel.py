"""Cancelling runs (C5 "cancellation that stops the agent promptly"), on both backends: while a
tool runs, while the model streams, while queued, after the end, and someone else's run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import TestUser
from tests.integration._support import assert_error
from tests.integration.test_runs_support import (
    TERMINAL_EVENTS,
    Harness,
    run_settings,
    running_app,
    unanswered_in_thread,
)

pytestmark = pytest.mark.integration

LONG_MESSAGE = " ".join(f"word{i}" for i in range(40))


@pytest.fixture
async def h(settings_factory) -> AsyncIterator[Harness]:
    async with running_app(run_settings(settings_factory)) as h:
        yield h


async def _terminal_events(
    h: Harness, user: TestUser, thread: str, run_id: str
) -> list[tuple[str, Any]]:
    return [
        (e.type.value, e.data)
        for e in await h.run_events(user, thread, run_id)
        if e.type.value in TERMINAL_EVENTS
    ]


async def test_cancel_while_a_tool_runs_stops_the_tool(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    run = await h.start(user, thread, "what is 12*7?", agent="blocker")
    await h.wait_tool_started(run["id"])

    response = await h.cancel(user, thread, run["id"])
    assert response.status_code == 200, response.text
    assert response.json()["id"] == run["id"]
    assert response.json()["status"] in ("running", "cancelled")
    assert response.json()["cancel_requested"] is True

    done = await h.wait_run(user, thread, run["id"])
    assert done["status"] == "cancelled", done
    assert done["error"] == {"reason": "user"} and done["result"] is None
    assert done["finished_at"] is not None
    assert h.controls.cancelled == [run["id"]]  # the tool saw CancelledError
    assert h.controls.completed == []
    assert await _terminal_events(h, user, thread, run["id"]) == [
        ("run_cancelled", {"reason": "user"})
    ]
    messages = await h.messages(user, thread)
    assert unanswered_in_thread(messages) == []
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    await h.wait_idle(user)


async def test_cancel_while_the_model_streams(settings_factory) -> None:
    async with running_app(run_settings(settings_factory, demo_delay_seconds=0.1)) as h:
        user = await h.user()
        thread = await h.thread(user)
        async with h.watch(user, thread, after_seq=0) as watcher:
            run = await h.start(user, thread, LONG_MESSAGE, agent="echo")
            await watcher.until(lambda m: m["type"] == "message_delta" and m["run_id"] == run["id"])
            assert (await h.cancel(user, thread, run["id"])).status_code == 200
            live = await watcher.until_terminal(run["id"])

        assert live[-1]["type"] == "run_cancelled"
        assert live[-1]["data"] == {"reason": "user"}
        done = await h.wait_run(user, thread, run["id"])
        assert done["status"] == "cancelled", done
        assert await _terminal_events(h, user, thread, run["id"]) == [
            ("run_cancelled", {"reason": "user"})
        ]
        # The half-streamed answer was never stored as a message.
        assert [m["role"] for m in await h.messages(user, thread)] == ["user"]
        await h.wait_idle(user)


async def test_cancel_of_a_queued_run_is_immediate(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    first = await h.start(user, thread, "what is 1+1?", agent="blocker")
    await h.wait_tool_started(first["id"])
    queued = await h.start(user, thread, "what is 2+2?", agent="blocker")

    response = await h.cancel(user, thread, queued["id"])
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"  # in the response itself, not eventually
    assert cancelled["error"] == {"reason": "user"}
    assert cancelled["started_at"] is None and cancelled["finished_at"] is not None
    assert await _terminal_events(h, user, thread, queued["id"]) == [
        ("run_cancelled", {"reason": "user"})
    ]

    h.controls.gate.set()
    assert (await h.wait_run(user, thread, first["id"]))["status"] == "completed"
    assert (await h.get_run(user, thread, queued["id"])) == cancelled
    assert queued["id"] not in h.controls.started
    assert not [
        e for e in await h.run_events(user, thread, queued["id"]) if e.type == "agent_started"
    ]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # SQLite: writers take turns
async def test_cancel_of_a_run_claimed_while_it_is_cancelled_stops_it(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cancel reads the run queued; a worker claims and starts it before the cancel's write.
    service = h.services.run_service
    cancel_queued = service._cancel_queued

    async def claimed_meanwhile(conn: Any, ctx: Any, run: Any, reason: Any) -> bool:
        await h.wait_tool_started(run.id)
        return await cancel_queued(conn, ctx, run, reason)

    user = await h.user()
    thread = await h.thread(user)
    with monkeypatch.context() as patched:
        patched.setattr(service, "_cancel_queued", claimed_meanwhile)
        run = await h.start(user, thread, "what is 1+1?", agent="blocker")
        response = await h.cancel(user, thread, run["id"])
    assert response.status_code == 200, response.text
    done = await h.wait_run(user, thread, run["id"])
    assert done["status"] == "cancelled" and done["error"] == {"reason": "user"}, done
    assert await _terminal_events(h, user, thread, run["id"]) == [
        ("run_cancelled", {"reason": "user"})
    ]


async def test_cancel_of_a_finished_run_returns_it_unchanged(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    run = await h.start(user, thread, "what is 12*7?", agent="demo")
    done = await h.wait_run(user, thread, run["id"])
    assert done["status"] == "completed"
    events_before = await h.events(user, thread)

    for _ in range(2):
        response = await h.cancel(user, thread, run["id"])
        assert response.status_code == 200, response.text
        assert response.json() == done
    assert await h.get_run(user, thread, run["id"]) == done
    assert await h.events(user, thread) == events_before

    # A cancelled run stays cancelled, with its one run_cancelled event.
    blocked = await h.start(user, thread, "what is 1+1?", agent="blocker")
    await h.wait_tool_started(blocked["id"])
    await h.cancel(user, thread, blocked["id"])
    cancelled = await h.wait_run(user, thread, blocked["id"])
    assert cancelled["status"] == "cancelled"
    assert (await h.cancel(user, thread, blocked["id"])).json() == cancelled
    assert len(await _terminal_events(h, user, thread, blocked["id"])) == 1


async def test_cancel_of_another_users_run_is_404(h: Harness) -> None:
    alice, bob = await h.user(), await h.user()
    alice_thread, bob_thread = await h.thread(alice), await h.thread(bob)
    run = await h.start(alice, alice_thread, "what is 12*7?", agent="blocker")
    await h.wait_tool_started(run["id"])

    for thread in (alice_thread, bob_thread):
        assert_error(await h.cancel(bob, thread, run["id"]), 404, "run_not_found")
        response = await h.client.get(f"/v1/threads/{thread}/runs/{run['id']}", headers=bob.headers)
        assert_error(response, 404, "run_not_found")
    # Alice's own run on the wrong thread, and ids that are not run ids, are 404 too.
    assert_error(await h.cancel(alice, bob_thread, run["id"]), 404, "run_not_found")
    assert_error(await h.cancel(alice, alice_thread, "run_nonsense"), 404, "run_not_found")

    untouched = await h.get_run(alice, alice_thread, run["id"])
    assert untouched["status"] == "running" and untouched["cancel_requested"] is False
    assert h.controls.cancelled == []
    h.controls.gate.set()
    assert (await h.wait_run(alice, alice_thread, run["id"]))["status"] == "completed"
