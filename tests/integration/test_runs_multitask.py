"""Several runs on one thread (C5 "at most one active run per thread"), on both backends: the
`reject`, `enqueue` and `interrupt` strategies, and a burst of concurrent posts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.integration._support import assert_error
from tests.integration.test_runs_support import (
    TERMINAL_EVENTS,
    Harness,
    run_settings,
    running_app,
    unanswered_in_thread,
    wait_until,
)
from threadline.events.types import Event

pytestmark = pytest.mark.integration


@pytest.fixture
async def h(settings_factory) -> AsyncIterator[Harness]:
    async with running_app(run_settings(settings_factory)) as h:
        yield h


def _assert_one_after_another(runs: list[dict[str, Any]]) -> None:
    """In creation order, each run started only after the one before it had finished."""
    ordered = sorted(runs, key=lambda run: (run["created_at"], run["id"]))
    for before, after in zip(ordered, ordered[1:], strict=False):
        assert datetime.fromisoformat(after["started_at"]) >= datetime.fromisoformat(
            before["finished_at"]
        ), (before, after)


async def _terminal_events(h: Harness, user: Any, thread: str, run_id: str) -> list[Any]:
    return [
        (e.type.value, e.data)
        for e in await h.run_events(user, thread, run_id)
        if e.type.value in TERMINAL_EVENTS
    ]


async def test_reject_is_409_while_a_run_is_active_and_writes_nothing(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    first = await h.start(user, thread, "what is 1+1?", agent="blocker")
    # Rejected while the run is still queued or already running.
    early = await h.post(user, thread, "are you there?", agent="demo", strategy="reject")
    assert_error(early, 409, "run_in_progress")
    await h.wait_tool_started(first["id"])
    messages_before = await h.messages(user, thread)

    rejected = await h.post(user, thread, "and now?", agent="demo", strategy="reject")
    assert_error(rejected, 409, "run_in_progress")
    assert first["id"] in rejected.json()["error"]["message"]
    direct = await h.client.post(
        f"/v1/threads/{thread}/runs",
        json={"agent": "demo", "multitask_strategy": "reject"},
        headers=user.headers,
    )
    assert_error(direct, 409, "run_in_progress")
    # Nothing half-written: neither the message nor a run.
    assert await h.messages(user, thread) == messages_before
    assert [r["id"] for r in await h.list_runs(user, thread)] == [first["id"]]

    h.controls.gate.set()
    assert (await h.wait_run(user, thread, first["id"]))["status"] == "completed"
    # Once the thread is idle, `reject` starts a run as usual.
    accepted = await h.start(user, thread, "what is 12*7?", agent="demo", strategy="reject")
    assert (await h.wait_run(user, thread, accepted["id"]))["status"] == "completed"


async def test_enqueue_runs_one_after_another_in_order(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    first = await h.start(user, thread, "what is 1+1?", agent="blocker")
    await h.wait_tool_started(first["id"])
    queued = [
        await h.start(user, thread, f"what is {i}+{i}?", agent="blocker", strategy="enqueue")
        for i in range(2, 5)
    ]
    # The thread's first run blocks the others: they wait, queued, however often the worker
    # looks (another thread's run completing shows the worker has been through the queue).
    other_thread = await h.thread(user)
    other = await h.start(user, other_thread, "what is 12*7?", agent="demo")
    assert (await h.wait_run(user, other_thread, other["id"]))["status"] == "completed"
    for run in queued:
        assert (await h.get_run(user, thread, run["id"]))["status"] == "queued"

    h.controls.gate.set()
    ids = [first["id"], *(run["id"] for run in queued)]
    finished = [await h.wait_run(user, thread, run_id) for run_id in ids]
    assert [run["status"] for run in finished] == ["completed"] * 4
    assert [run["attempt"] for run in finished] == [1] * 4
    by_start = sorted(finished, key=lambda run: datetime.fromisoformat(run["started_at"]))
    assert [run["id"] for run in by_start] == ids  # executed in the order they were queued
    assert h.controls.max_active_by_thread[thread] == 1
    _assert_one_after_another(finished)


async def test_interrupt_cancels_the_active_run_and_runs_the_new_one(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    first = await h.start(user, thread, "what is 1+1?", agent="blocker")
    await h.wait_tool_started(first["id"])
    waiting = await h.start(user, thread, "what is 2+2?", agent="blocker", strategy="enqueue")

    newest = await h.start(user, thread, "what is 12*7?", agent="demo", strategy="interrupt")
    interrupted = await h.wait_run(user, thread, first["id"])
    assert interrupted["status"] == "cancelled", interrupted
    skipped = await h.get_run(user, thread, waiting["id"])
    assert skipped["status"] == "cancelled"
    done = await h.wait_run(user, thread, newest["id"])
    assert done["status"] == "completed", done
    assert done["result"]["text"] == "12*7 = 84."

    assert await _terminal_events(h, user, thread, first["id"]) == [
        ("run_cancelled", {"reason": "interrupted"})
    ]
    assert await _terminal_events(h, user, thread, waiting["id"]) == [
        ("run_cancelled", {"reason": "interrupted"})
    ]
    assert h.controls.cancelled == [first["id"]]  # the running tool was stopped
    assert waiting["id"] not in h.controls.started  # the queued run never ran
    assert datetime.fromisoformat(done["started_at"]) >= datetime.fromisoformat(
        interrupted["finished_at"]
    )
    assert unanswered_in_thread(await h.messages(user, thread)) == []


@contextlib.asynccontextmanager
async def _on_the_bus(h: Harness, thread: str) -> AsyncIterator[list[Event]]:
    """The thread's durable events as the bus carries them to a live listener, in order."""
    published: list[Event] = []
    unsubscribe = h.services.bus.subscribe(
        thread, lambda e: published.append(e) if e.durable else None
    )
    try:
        await h.services.bus.ready(thread)
        yield published
    finally:
        unsubscribe()


async def _until_published(published: list[Event], kind: str) -> None:
    await wait_until(lambda: any(e.type.value == kind for e in published), what=kind)


async def test_a_rejected_post_publishes_nothing(h: Harness) -> None:
    """A post refused with 409 `run_in_progress` rolls back, so no live subscriber may hear of
    the message it did not store (on the Redis bus such an event would also hold the number
    the next real event takes, which would then be refused)."""
    user = await h.user()
    thread = await h.thread(user)
    first = await h.start(user, thread, "what is 1+1?", agent="blocker")
    await h.wait_tool_started(first["id"])
    async with _on_the_bus(h, thread) as published:
        rejected = await h.post(user, thread, "and now?", agent="demo", strategy="reject")
        assert_error(rejected, 409, "run_in_progress")
        h.controls.gate.set()
        assert (await h.wait_run(user, thread, first["id"]))["status"] == "completed"
        await _until_published(published, "agent_completed")
    users_messages = [
        e for e in published if e.type.value == "message_created" and e.data.get("role") == "user"
    ]
    assert users_messages == [], published


async def test_an_interrupting_post_publishes_its_events_in_number_order(h: Harness) -> None:
    """A thread's events reach the bus in `seq` order: the Redis bus refuses an append below
    its stream's last one, and a live subscriber takes a number it did not expect for a gap and
    reads the store. An interrupting post ends the queued run first (its `run_cancelled` takes
    a number), so its own `run_queued` must come after that, not in a number reserved before."""
    user = await h.user()
    thread = await h.thread(user)
    first = await h.start(user, thread, "what is 1+1?", agent="blocker")
    await h.wait_tool_started(first["id"])
    await h.start(user, thread, "what is 2+2?", agent="blocker", strategy="enqueue")
    async with _on_the_bus(h, thread) as published:
        newest = await h.start(user, thread, "what is 12*7?", agent="demo", strategy="interrupt")
        await h.wait_run(user, thread, newest["id"])
        await _until_published(published, "agent_completed")
    seqs = [e.seq for e in published]
    assert seqs == sorted(set(seqs)), [(e.seq, e.type.value) for e in published]
    assert "run_queued" in {e.type.value for e in published}


async def test_concurrent_posts_on_one_thread_run_one_at_a_time(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    count = 10

    async def post(i: int) -> httpx.Response:
        return await h.post(user, thread, f"what is {i}*3?", agent="tracker", strategy="enqueue")

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(post(i)) for i in range(count)]
    responses = [task.result() for task in tasks]
    assert [r.status_code for r in responses] == [201] * count, [r.text for r in responses]
    ids = [r.json()["run"]["id"] for r in responses]
    assert len(set(ids)) == count

    finished = [await h.wait_run(user, thread, run_id) for run_id in ids]
    assert [run["status"] for run in finished] == ["completed"] * count
    assert h.controls.max_active_by_thread[thread] <= 1
    _assert_one_after_another(finished)
    assert [run["attempt"] for run in finished] == [1] * count  # each executed exactly once
    started = [e.run_id for e in await h.events(user, thread) if e.type.value == "agent_started"]
    assert sorted(started) == sorted(ids)
    runs = await h.list_runs(user, thread)
    assert {run["id"] for run in runs} == set(ids)
    assert unanswered_in_thread(await h.messages(user, thread)) == []
    await wait_until(lambda: h.services.execution.active_run_ids == [], what="an idle engine")


async def test_each_enqueued_run_answers_its_own_message(h: Harness) -> None:
    """Messages posted while a run is active are queued with their own runs; each run should
    then answer its message, not whichever message happens to be the thread's newest."""
    user = await h.user()
    thread = await h.thread(user)
    first = await h.start(user, thread, "what is 1+1?", agent="blocker")
    await h.wait_tool_started(first["id"])
    later = [
        await h.start(user, thread, f"what is {i}*{i}?", agent="demo", strategy="enqueue")
        for i in (2, 3)
    ]
    h.controls.gate.set()
    answers = [
        (await h.wait_run(user, thread, run_id))["result"]["text"]
        for run_id in [first["id"], *(run["id"] for run in later)]
    ]
    assert answers == ["1+1 = 2.", "2*2 = 4.", "3*3 = 9."]
