"""Guarantee (d): joining a thread mid-run (C6), on both backends. A subscriber that arrives
while a run is under way first gets a `snapshot` (the active run, the last sequence number), then
every later event exactly once, in order, to the run's end; one that resumes from a sequence
number gets the stored events after it first.

Subscriptions go through `api.live.streams.subscribe` and the gateway, as the WebSocket and SSE
endpoints do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import TestUser
from tests.integration.test_runs_support import Harness, run_settings, running_app
from tests.live_order import assert_in_place
from threadline.api.live import streams
from threadline.api.live.gateway import OVERFLOW, Connection
from threadline.api.live.streams import PAGE_SIZE, open_subscription, replay
from threadline.errors import NotFoundError
from threadline.events.types import EventType

pytestmark = pytest.mark.integration


@pytest.fixture
async def h(settings_factory) -> AsyncIterator[Harness]:
    async with running_app(run_settings(settings_factory)) as h:
        yield h


def _durable(messages: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(m["seq"], m["type"]) for m in messages if m["type"] != "message_delta"]


async def test_subscribing_without_a_resume_point_starts_live(h: Harness) -> None:
    """What a client does when it opens a thread: no `after_seq`, so no replay."""
    user = await h.user()
    thread = await h.thread(user)
    for content in ("one", "two"):
        assert (await h.post(user, thread, content)).status_code == 201
    last_seq = (await h.events(user, thread))[-1].seq

    async with h.watch(user, thread) as watcher:
        snapshot = await watcher.next()
        assert snapshot == {
            "type": "snapshot",
            "thread_id": thread,
            "last_seq": last_seq,
            "active_run": None,
            "queued_runs": [],
        }
        assert (await h.post(user, thread, "three")).status_code == 201
        created = await watcher.next()
    assert (created["type"], created["seq"]) == ("message_created", last_seq + 1)


async def test_a_subscriber_joining_mid_run_gets_a_snapshot_then_every_event_once(
    h: Harness,
) -> None:
    user = await h.user()
    thread = await h.thread(user)
    async with h.watch(user, thread, after_seq=0) as early:
        run = await h.start(user, thread, "what is 12*7?", agent="blocker")
        await h.wait_tool_started(run["id"])
        # The tool is blocked mid-run: now a second client opens the thread.
        async with h.watch(user, thread) as late:
            snapshot = await late.next()
            assert snapshot["type"] == "snapshot"
            active = snapshot["active_run"]
            assert (active["id"], active["status"], active["agent"]) == (
                run["id"],
                "running",
                "blocker",
            )
            assert active["attempt"] == 1
            stored_so_far = await h.events(user, thread)
            assert snapshot["last_seq"] == stored_so_far[-1].seq
            assert stored_so_far[-1].type.value == "tool_executing"

            h.controls.gate.set()
            live = await late.until_terminal(run["id"])
        everything = await early.until_terminal(run["id"])

    assert live[-1]["type"] == "agent_completed"
    # Live from last_seq + 1: no gap and no duplicate, the message deltas live in their place.
    first = snapshot["last_seq"] + 1
    assert_in_place(live, after_seq=snapshot["last_seq"])
    assert "message_delta" in {m["type"] for m in live}
    # Exactly the durable events stored after the snapshot, and what the early subscriber saw.
    # (An event is published just before its transaction commits: wait for the commit.)
    await h.wait_run(user, thread, run["id"])
    stored_after = await h.events(user, thread, after=snapshot["last_seq"])
    assert _durable(live) == [(e.seq, e.type.value) for e in stored_after]
    assert [m for m in everything if m.get("seq", 0) >= first] == live
    # The early subscriber, from seq 0, saw the whole thread without a gap.
    assert_in_place(everything[1:], after_seq=0)


async def test_resuming_after_a_seq_replays_the_stored_events_after_it(h: Harness) -> None:
    user = await h.user()
    thread = await h.thread(user)
    run = await h.start(user, thread, "what is 12*7?", agent="demo")
    assert (await h.wait_run(user, thread, run["id"]))["status"] == "completed"
    stored = await h.events(user, thread)
    resume_from = next(e.seq for e in stored if e.type.value == "tool_executing")

    async with h.watch(user, thread, after_seq=resume_from) as watcher:
        snapshot = await watcher.next()
        assert snapshot["type"] == "snapshot"
        assert snapshot["active_run"] is None
        assert snapshot["last_seq"] >= stored[-1].seq
        expected = [e for e in stored if e.seq > resume_from]
        replayed = [await watcher.next() for _ in expected]
        # And then live, continuing after the replay.
        assert (await h.post(user, thread, "thanks")).status_code == 201
        after = await watcher.next()

    assert [(m["seq"], m["type"]) for m in replayed] == [(e.seq, e.type.value) for e in expected]
    assert replayed[-1]["type"] == "agent_completed"
    assert replayed[-1]["data"]["text"] == "12*7 = 84."
    assert all(m["run_id"] == run["id"] for m in replayed)
    assert after["type"] == "message_created"
    assert after["seq"] == snapshot["last_seq"] + 1


async def test_a_subscriber_sees_only_its_own_threads(h: Harness) -> None:
    alice, bob = await h.user(), await h.user()
    thread = await h.thread(alice)
    async with h.watch(alice, thread, after_seq=0) as watcher:
        await watcher.next()
        run = await h.start(alice, thread, "what is 12*7?", agent="demo")
        await watcher.until_terminal(run["id"])
    with pytest.raises(NotFoundError):
        async with h.watch(bob, thread, after_seq=0):
            pass
    assert h.gateway.watched_threads == 0


async def test_resuming_replays_every_stored_event_of_a_long_thread(h: Harness) -> None:
    """A thread with more stored events than one read of the log returns (a page: 500)."""
    user = await h.user()
    thread = await h.thread(user)
    publisher = h.services.publisher
    async with h.services.engine.begin() as conn:
        for i in range(1100):
            await publisher.emit(conn, h.ctx(user), thread, EventType.THREAD_UPDATED, {"note": i})
    last_seq = (await h.events(user, thread, after=1000))[-1].seq
    assert last_seq > 1100

    async with h.watch(user, thread, after_seq=0) as watcher:
        snapshot = await watcher.next()
        assert snapshot["last_seq"] == last_seq
        assert (await h.post(user, thread, "still there?")).status_code == 201
        received = await watcher.until(lambda m: m["type"] == "message_created")
    assert [m["seq"] for m in received] == list(range(1, last_seq + 2))


# --- a replay that outlasts its live buffer (the buffer holds a socket queue's worth) ---


def _small_connection(h: Harness, user: TestUser) -> Connection:
    return Connection(
        user_id=user.id, connection_id="test-small", queue_size=8, metrics=h.services.metrics
    )


async def _emit(h: Harness, user: TestUser, thread: str, count: int) -> None:
    """`count` durable events, each in a transaction of its own."""
    for i in range(count):
        await h.services.publisher.emit_now(
            h.ctx(user), thread, EventType.THREAD_UPDATED, {"live": i}
        )


async def _pages(pages: AsyncIterator[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [message async for page in pages for message in page]


async def test_live_events_that_overflow_the_replay_buffer_are_read_from_the_store(
    h: Harness,
) -> None:
    user = await h.user()
    thread = await h.thread(user)
    async with h.services.engine.begin() as conn:
        for i in range(PAGE_SIZE + 100):
            await h.services.publisher.emit(
                conn, h.ctx(user), thread, EventType.THREAD_UPDATED, {"note": i}
            )
    connection = _small_connection(h, user)
    opened = await open_subscription(
        h.services, h.gateway, connection, h.ctx(user), thread, after_seq=0
    )
    received: list[dict[str, Any]] = []
    try:
        async with aclosing(replay(h.services, h.ctx(user), opened)) as pages:
            async for page in pages:
                received += page
                if len(received) < PAGE_SIZE + 200:
                    # More live events than the buffer holds, while the client takes a page.
                    await _emit(h, user, thread, 12)
        assert opened.subscription.missed_to > 0, "the buffer never overflowed"
        assert not connection.overflowed
        await _emit(h, user, thread, 1)
        async with asyncio.timeout(10):
            received += await connection.next_batch()
    finally:
        h.gateway.detach(opened.subscription)
    last_seq = (await h.events(user, thread, after=PAGE_SIZE))[-1].seq
    assert received[0]["type"] == "snapshot"
    assert [m["seq"] for m in received[1:]] == list(range(1, last_seq + 1))


async def test_a_replay_waits_for_a_dropped_live_event_to_be_committed(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher publishes just before it commits: a live event thrown away from an
    overflowing buffer may not be in the store yet when the replay reaches the end of it."""
    reads = _count_store_reads(monkeypatch)
    user = await h.user()
    thread = await h.thread(user)
    connection = _small_connection(h, user)
    opened = await open_subscription(
        h.services, h.gateway, connection, h.ctx(user), thread, after_seq=0
    )
    try:
        async with aclosing(replay(h.services, h.ctx(user), opened)) as pages:
            received = await anext(pages)
            async with h.services.engine.begin() as conn:
                for i in range(12):  # one transaction, more events than the buffer holds
                    await h.services.publisher.emit(
                        conn, h.ctx(user), thread, EventType.THREAD_UPDATED, {"batch": i}
                    )
                rest = asyncio.create_task(_pages(pages))
                # The replay has looked in the store three times and not found the dropped
                # events (they are not committed): it must still be waiting, not live.
                await reads.at_least(reads.count + 3)
                assert not rest.done(), "went live before the dropped events were committed"
            async with asyncio.timeout(10):
                received += await rest
        assert opened.subscription.missed_to > 0
        assert not connection.overflowed
    finally:
        h.gateway.detach(opened.subscription)
    assert [m["seq"] for m in received[1:]] == list(range(1, 14))


async def test_a_dropped_live_event_that_never_reaches_the_store_drops_the_connection(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rather than go live over a possible hole, the client is told to resume."""
    monkeypatch.setattr(streams, "_COMMIT_WAIT_SECONDS", 0.2)
    user = await h.user()
    thread = await h.thread(user)
    connection = _small_connection(h, user)
    opened = await open_subscription(
        h.services, h.gateway, connection, h.ctx(user), thread, after_seq=0
    )
    try:
        async with aclosing(replay(h.services, h.ctx(user), opened)) as pages:
            await anext(pages)
            async with h.services.engine.connect() as conn:
                transaction = await conn.begin()
                for i in range(12):
                    await h.services.publisher.emit(
                        conn, h.ctx(user), thread, EventType.THREAD_UPDATED, {"batch": i}
                    )
                await transaction.rollback()
            async with asyncio.timeout(10):
                await _pages(pages)
        assert connection.overflowed
        assert opened.subscription.buffering, "went live over the hole"
        async with asyncio.timeout(10):
            assert await connection.next_batch() == [OVERFLOW]
    finally:
        h.gateway.detach(opened.subscription)


@pytest.mark.parametrize("backend", ["postgres"])
async def test_subscribing_while_an_event_is_published_but_not_committed(h: Harness) -> None:
    """An event published just before a subscription attaches, whose transaction commits just
    after: the snapshot waits for that commit (the thread's row lock), so the replay covers the
    event. PostgreSQL only: on SQLite the publisher's transaction holds the one write lock,
    which every snapshot takes too, so the interleaving exercised here cannot happen."""
    user = await h.user()
    thread = await h.thread(user)
    async with h.services.engine.connect() as conn:
        transaction = await conn.begin()
        event = await h.services.publisher.emit(
            conn, h.ctx(user), thread, EventType.THREAD_UPDATED, {"title": "in flight"}
        )
        watching = asyncio.create_task(_watch_from_start(h, user, thread))
        # Commit only once the subscriber's snapshot is blocked on the uncommitted transaction
        # (a snapshot that did not wait would never show up as waiting on a lock).
        await _a_session_waits_on_a_lock(h)
        assert not watching.done()
        await transaction.commit()
    await _emit(h, user, thread, 1)
    async with asyncio.timeout(10):
        received = await watching
    assert [m["seq"] for m in received[1:]] == [1, event.seq, event.seq + 1]


async def _a_session_waits_on_a_lock(h: Harness) -> None:
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    async with asyncio.timeout(10):
        while True:
            async with h.services.engine.connect() as probe:
                if await probe.scalar(query):
                    return
            await asyncio.sleep(0.01)  # a poll of the condition, not a guess at timing


class _StoreReads:
    """Counts the replay's reads of the stored events (`streams._read_page`)."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Condition()

    async def record(self) -> None:
        async with self._changed:
            self.count += 1
            self._changed.notify_all()

    async def at_least(self, count: int) -> None:
        async with asyncio.timeout(10), self._changed:
            await self._changed.wait_for(lambda: self.count >= count)


def _count_store_reads(monkeypatch: pytest.MonkeyPatch) -> _StoreReads:
    reads = _StoreReads()
    read_page = streams._read_page

    async def counted(*args: Any, **kwargs: Any) -> Any:
        page = await read_page(*args, **kwargs)
        await reads.record()
        return page

    monkeypatch.setattr(streams, "_read_page", counted)
    return reads


async def _watch_from_start(h: Harness, user: TestUser, thread: str) -> list[dict[str, Any]]:
    async with h.watch(user, thread, after_seq=0) as watcher:
        return await watcher.until(lambda m: m.get("data") == {"live": 0})
