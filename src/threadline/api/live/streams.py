"""Subscribing a connection to a thread: ownership check, snapshot, replay, then live.

Two steps, so that nothing is sent before the request is known to be good:
1. `open_subscription` attaches the live listener (buffering), waits until the bus carries the
   thread's events to it from now on (`Gateway.ready`: the Redis bus first learns where the
   thread's stream ends), checks ownership, reads the thread's last seq (once no publisher's
   transaction is in flight), the first page of stored events and the active runs, and builds
   the `snapshot`. A thread the user does not own
   raises `NotFoundError` here (SSE answers 404).
2. `replay` yields pages of messages for the connection's writer: the snapshot with the first
   page, further pages of stored events (`PAGE_SIZE` each) until a short page, then what the
   live listener buffered meanwhile; once the buffer is empty it switches the subscription to
   live. The caller hands each page to the client before asking for the next (the WebSocket
   awaits `Connection.put`, which waits for queue space while the writer drains; SSE yields the
   frames itself), so a replay of any length reaches a slow client at the pace it reads.

Invariants (`cursor` is the highest seq handed to the caller):
- No durable event twice: every page starts after the cursor, the buffer is flushed after it,
  and once live the subscription drops any seq at or below the last one it sent.
- No durable event skipped: what was published before the attach is committed by the time
  the snapshot is read (the read waits for it); later events are buffered. The store is read
  until a short page, and then again, for as long as the buffer threw away a durable event
  past the cursor (`missed_to`). Such an event may be published but not yet committed (the
  publisher publishes just before commit): the replay polls for it up to
  `_COMMIT_WAIT_SECONDS`, then gives up on the connection (the client is told to resume)
  rather than go live over a hole.
- Ephemeral events (text deltas) are never in the store: those that arrive while replaying
  are held in the buffer and sent after the stored pages, only in place (after exactly the
  durable event they follow, `gateway.in_place`); the others are dropped, their text being
  in the `message_created` the replay sends. The cursor stays on durable events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from threadline.api.live.gateway import Connection, Gateway, ThreadSubscription, WireMessage
from threadline.context import UserContext
from threadline.events.types import Event
from threadline.runtime import Runtime
from threadline.store.db import read_transaction
from threadline.store.runs import Run

logger = logging.getLogger(__name__)
# Sequence numbers are 32-bit integers in the database.
MAX_SEQ = 2**31 - 1
# Stored events per read while replaying; a page of large messages is still a bounded read.
PAGE_SIZE = 500
_COMMIT_WAIT_SECONDS = 5.0
_COMMIT_POLL_SECONDS = 0.02


def run_wire(run: Run) -> dict[str, object]:
    return {
        "id": run.id,
        "thread_id": run.thread_id,
        "agent": run.agent,
        "status": run.status.value,
        "attempt": run.attempt,
        "cancel_requested": run.cancel_requested,
        "created_at": run.created_at.isoformat(),
    }


@dataclass(frozen=True, slots=True)
class Opened:
    """A subscription attached and checked, with what its replay starts from."""

    subscription: ThreadSubscription
    snapshot: WireMessage
    first_page: list[Event]
    after_seq: int | None
    last_seq: int


@dataclass(frozen=True, slots=True)
class Subscribed:
    subscription: ThreadSubscription
    last_seq: int


async def open_subscription(
    services: Runtime,
    gateway: Gateway,
    connection: Connection,
    ctx: UserContext,
    thread_id: str,
    *,
    after_seq: int | None,
) -> Opened:
    """Attach, check ownership and read the snapshot; send nothing. Raises `NotFoundError`
    for a thread the user does not own. The caller detaches the subscription when done."""
    subscription = gateway.attach(connection, thread_id)
    try:
        await gateway.ready(thread_id)
        # Not `read_transaction`: the snapshot must wait for a publisher's transaction still
        # in flight (an event published before the attach, committed after a plain read,
        # would be neither buffered nor replayed). `settled` takes the thread's row lock on
        # PostgreSQL; on SQLite this connection's transaction takes the write lock.
        async with services.engine.connect() as conn:
            await services.threads.get(conn, ctx, thread_id)
            stored = await services.events.after(
                conn, ctx, thread_id, after_seq=after_seq, limit=PAGE_SIZE, settled=True
            )
            active = await services.runs.active_for_thread(conn, ctx, thread_id)
    except BaseException:
        gateway.detach(subscription)
        raise
    return Opened(
        subscription=subscription,
        snapshot=_snapshot(thread_id, stored.last_seq, active),
        first_page=stored.events,
        after_seq=after_seq,
        last_seq=stored.last_seq,
    )


def _snapshot(thread_id: str, last_seq: int, active: list[Run]) -> WireMessage:
    running = next((run for run in active if run.status.value == "running"), None)
    current = running or (active[0] if active else None)
    return {
        "type": "snapshot",
        "thread_id": thread_id,
        "last_seq": last_seq,
        "active_run": run_wire(current) if current else None,
        "queued_runs": [run.id for run in active if run is not current],
    }


async def replay(
    services: Runtime, ctx: UserContext, opened: Opened
) -> AsyncGenerator[list[WireMessage], None]:
    """The snapshot and the stored events after `after_seq`, then the buffered live events,
    in pages; then the subscription goes live. Stops early if the connection is dropped."""
    subscription = opened.subscription
    first = opened.first_page
    start = opened.after_seq if opened.after_seq is not None else opened.last_seq
    cursor = first[-1].seq if first else start
    # The snapshot's read was settled: a later jump up to its last seq is no gap.
    subscription.synced_to = max(subscription.synced_to, opened.last_seq)
    yield [opened.snapshot, *_wire(first)]
    more = opened.after_seq is not None and len(first) == PAGE_SIZE
    while not subscription.connection.overflowed:
        if more or subscription.missed_to > cursor:
            async with aclosing(_stored_pages(services, ctx, subscription, cursor)) as pages:
                async for page in pages:
                    yield _wire(page)
                    cursor = page[-1].seq
            more = False
            continue
        pending = subscription.take_buffered(after_seq=cursor)
        if not pending:
            subscription.go_live(after_seq=cursor)
            return
        yield _wire(pending)
        cursor = pending[-1].seq


async def _stored_pages(
    services: Runtime, ctx: UserContext, subscription: ThreadSubscription, after_seq: int
) -> AsyncGenerator[list[Event], None]:
    """Pages of stored events after `after_seq`, until a short page that reaches the
    subscription's `missed_to`. Drops the connection if that never happens; stops early once
    the connection is dropped."""
    cursor, waited = after_seq, 0.0
    while not subscription.connection.overflowed:
        page = await _read_page(services, ctx, subscription.thread_id, after_seq=cursor)
        if page:
            yield page
            cursor, waited = page[-1].seq, 0.0
        if len(page) == PAGE_SIZE:
            continue
        if subscription.missed_to <= cursor:
            return
        if waited >= _COMMIT_WAIT_SECONDS:
            _give_up(subscription, cursor)
            return
        await asyncio.sleep(_COMMIT_POLL_SECONDS)
        waited += _COMMIT_POLL_SECONDS


def _give_up(subscription: ThreadSubscription, cursor: int) -> None:
    logger.warning(
        "Thread %s: event %d, published while replaying, is not in the store after %.0f s; "
        "dropping connection %s (its client resumes from %d)",
        subscription.thread_id,
        subscription.missed_to,
        _COMMIT_WAIT_SECONDS,
        subscription.connection.connection_id,
        cursor,
    )
    subscription.connection.drop()


async def _read_page(
    services: Runtime, ctx: UserContext, thread_id: str, *, after_seq: int
) -> list[Event]:
    # A connection per page: none is held while the client takes its time with a page.
    async with read_transaction(services.engine) as conn:
        stored = await services.events.after(
            conn, ctx, thread_id, after_seq=after_seq, limit=PAGE_SIZE
        )
    return stored.events


def _wire(events: list[Event]) -> list[WireMessage]:
    return [event.to_wire() for event in events]


async def subscribe(
    services: Runtime,
    gateway: Gateway,
    connection: Connection,
    ctx: UserContext,
    thread_id: str,
    *,
    after_seq: int | None,
) -> Subscribed:
    """Open, then `put` the snapshot and the replay on `connection` (whose writer must be
    draining it concurrently once the replay is over half its queue), then live events.
    Raises `NotFoundError` for a thread the user does not own."""
    opened = await open_subscription(
        services, gateway, connection, ctx, thread_id, after_seq=after_seq
    )
    try:
        async with aclosing(replay(services, ctx, opened)) as pages:
            async for page in pages:
                for message in page:
                    await connection.put(message)
    except BaseException:
        gateway.detach(opened.subscription)
        raise
    return Subscribed(subscription=opened.subscription, last_seq=opened.last_seq)
