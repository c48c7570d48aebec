"""Numbering, storing and publishing events so that every thread's events arrive in order.

Invariants:
- A thread's sequence numbers come from its row (`threads.event_seq`), incremented in the
  transaction that records the event, so numbers are unique across every process.
- The event is published *inside* that transaction, just before it commits, while the row lock
  is held: no other process can number (and so publish) the thread's next event until this one
  is on the bus. Publication order is sequence order, across processes, without reordering
  buffers in the gateway. (The Redis bus queues the event for its sender instead of waiting
  for Redis; its stream ids keep the order, and listeners fill any hole from the store: see
  `events/redis_bus.py`.) The price: if the commit then fails, a listener has seen an event whose
  effects were rolled back (a database failure between two statements); clients that reload
  state on reconnect recover, and the gap in durable sequence numbers shows it.
- Durable events are stored in the same transaction as the change they announce.
- Ephemeral events (text deltas) touch no database: `publish_ephemeral` hands them to the bus,
  which places each after the last durable event of its thread (`events/bus.py`). Durable
  numbers stay gapless; a delta's order relative to its run's durable events holds because a
  run's events are emitted one at a time by its sink (`runs/sink.py`): the durable events
  before a delta are published before it, the ones after it later.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from threadline.context import UserContext
from threadline.events import payloads
from threadline.events.bus import EventBus
from threadline.events.types import EPHEMERAL, Event, EventType, JSONObject
from threadline.store.events import EventStore


class EventPublisher:
    def __init__(self, *, bus: EventBus, store: EventStore, engine: AsyncEngine) -> None:
        self._bus = bus
        self._store = store
        self._engine = engine

    async def emit(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        event_type: EventType,
        data: JSONObject,
        *,
        run_id: str | None = None,
    ) -> Event:
        """Record and publish within the caller's transaction; call it last before commit."""
        seq = await self._store.next_seq(conn, ctx, thread_id)
        event = Event(
            type=event_type,
            thread_id=thread_id,
            user_id=ctx.user_id,
            seq=seq,
            data=data,
            run_id=run_id,
            ts=datetime.now(UTC),
        )
        if event.durable:
            await self._store.insert(conn, event)
        await self._bus.publish(event)
        return event

    async def emit_now(
        self,
        ctx: UserContext,
        thread_id: str,
        event_type: EventType,
        data: JSONObject,
        *,
        run_id: str | None = None,
    ) -> Event:
        """Emit in a transaction of its own (for events that announce no other write)."""
        async with self._engine.begin() as conn:
            return await self.emit(conn, ctx, thread_id, event_type, data, run_id=run_id)

    async def publish_ephemeral(
        self,
        ctx: UserContext,
        thread_id: str,
        event_type: EventType,
        data: JSONObject,
        *,
        run_id: str | None = None,
    ) -> None:
        """Publish an ephemeral event: no transaction, no number, not stored. Call it only
        after the durable events that precede it were emitted."""
        if event_type not in EPHEMERAL:
            raise ValueError(f"{event_type} is durable: emit it in a transaction")
        await self._bus.publish_ephemeral(
            Event(
                type=event_type,
                thread_id=thread_id,
                user_id=ctx.user_id,
                seq=0,  # placed by the bus (`EventBus.publish_ephemeral`)
                data=data,
                run_id=run_id,
                ts=datetime.now(UTC),
            )
        )

    async def publish_deleted(self, ctx: UserContext, thread_id: str, seq: int) -> None:
        """`thread_deleted` cannot be stored: the thread and its log are gone."""
        await self._bus.publish(
            Event(
                type=EventType.THREAD_DELETED,
                thread_id=thread_id,
                user_id=ctx.user_id,
                seq=seq,
                data=payloads.thread_deleted(thread_id),
            )
        )
