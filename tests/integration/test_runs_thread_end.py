"""Archiving or deleting a thread with a queued or running run (issue 6 item 7), on both
backends: the runs end as cancelled with one `run_cancelled` each (through the one end-of-run
function), the running tool is stopped, and a permanent delete during a run logs no misleading
"lost its lease" warning."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest

from tests.integration.test_runs_support import (
    TERMINAL_EVENTS,
    Harness,
    run_settings,
    running_app,
    unanswered_in_thread,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def h(settings_factory) -> AsyncIterator[Harness]:
    async with running_app(run_settings(settings_factory)) as h:
        yield h


@pytest.mark.parametrize("how", ["delete", "patch"])
async def test_archiving_cancels_the_running_and_the_queued_run(h: Harness, how: str) -> None:
    user = await h.user()
    thread = await h.thread(user)
    running = await h.start(user, thread, "what is 12*7?", agent="blocker")
    await h.wait_tool_started(running["id"])
    queued = await h.start(user, thread, "what is 1+1?", agent="blocker", strategy="enqueue")

    if how == "delete":
        response = await h.client.delete(f"/v1/threads/{thread}", headers=user.headers)
        assert response.status_code == 204, response.text
    else:
        response = await h.client.patch(
            f"/v1/threads/{thread}", json={"status": "archived"}, headers=user.headers
        )
        assert response.status_code == 200, response.text

    for run in (running, queued):
        done = await h.wait_run(user, thread, run["id"])
        assert done["status"] == "cancelled", done
        assert done["error"] == {"reason": "thread_archived"}
        terminal = [
            (e.type.value, e.data)
            for e in await h.run_events(user, thread, run["id"])
            if e.type.value in TERMINAL_EVENTS
        ]
        assert terminal == [("run_cancelled", {"reason": "thread_archived"})]
    assert h.controls.cancelled == [running["id"]]  # the running tool was stopped
    assert queued["id"] not in h.controls.started  # the queued run never ran
    assert unanswered_in_thread(await h.messages(user, thread)) == []
    await h.wait_idle(user)


async def test_deleting_during_a_run_cancels_it_without_a_lease_warning(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    user = await h.user()
    thread = await h.thread(user)
    running = await h.start(user, thread, "what is 12*7?", agent="blocker")
    await h.wait_tool_started(running["id"])
    queued = await h.start(user, thread, "what is 1+1?", agent="blocker", strategy="enqueue")

    async with h.watch(user, thread) as watcher:
        await watcher.until(lambda m: m.get("type") == "snapshot")
        with caplog.at_level(logging.INFO, logger="threadline"):
            response = await h.client.delete(
                f"/v1/threads/{thread}", params={"permanent": "true"}, headers=user.headers
            )
            assert response.status_code == 204, response.text
            seen = await watcher.until(lambda m: m.get("type") == "thread_deleted")
            await wait_until(lambda: h.controls.cancelled, what="the running tool to stop")
            await h.wait_idle(user)

    cancelled = [m for m in seen if m.get("type") == "run_cancelled"]
    assert sorted(m["run_id"] for m in cancelled) == sorted([running["id"], queued["id"]])
    assert all(m["data"] == {"reason": "thread_deleted"} for m in cancelled)
    assert [m["type"] for m in seen if m.get("type") in TERMINAL_EVENTS] == [
        "run_cancelled",
        "run_cancelled",
    ]
    assert h.controls.cancelled == [running["id"]]
    assert queued["id"] not in h.controls.started
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "lease" in w], warnings
    gone = await h.client.get(f"/v1/threads/{thread}/runs/{running['id']}", headers=user.headers)
    assert gone.status_code == 404
