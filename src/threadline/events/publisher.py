"""Numbering, storing and publishing events so that every thread's events arrive in order.

Invariants, for one event or a batch (`emit_many`: the consecutive events of one step of a run,
written by one transaction):
- A thread's sequence numbers come from its row (`threads.event_seq`): a batch of n events
  takes n consecutive numbers with one row update (`event_seq = event_seq + n`), in the
  transaction that records them, so numbers are unique across every process and a batch's
  events are numbered in the order given, with nothing of another writer between them.
- The events are published *inside* that transaction, in sequence order, just before it
  commits, while the row lock is held: no other process can number (and so publish) the
  thread's next event until this batch is on the bus. Publication order is sequence order,
  across processes, without reordering buffers in the gateway. (The Redis bus queues the events
  for its sender instead of waiting for Redis; its stream ids keep the order, and listeners
  fill any hole from the store: see `events/redis_bus.py`.) The price: if the commit then
  fails, a listener has seen events whose effects were rolled back (a database failure between
  two statements); clients that reload state on reconnect recover, and the gap in durable
  sequence numbers shows it.
- Durable events are stored in the same transaction as the change they announce, a batch with
  one statement: the whole batch commits or none of it, so a reader of the log (a resuming
  subscriber, `after_seq` anywhere inside a batch) finds either all of it or nothing, never a
  hole in its middle.
- Ephemeral events (text deltas) touch no database: `publish_ephemeral` hands them to the bus,
  which places each after the last durable event of its thread (`events/bus.py`). Durable
  numbers stay gapless; a delta's order relative to its run's durable events holds because a
  run's sink (`runs/sink.py`) emits its events one write at a time, under its lock: the
  durable events before a delta (a whole batch) are published before it, the ones after it
  later. A batch may carry deltas too (text a model streamed while its reasoning was held):
  they are neither numbered nor stored, and are published in their place among the batch's
  durable events, each placed after the durable event before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from threadline.context import UserContext
from threadline.events import payloads
from threadline.events.bus import EventBus
from threadline.events.types import EPHEMERAL, Event, EventType, JSONObject
from threadline.store.events import EventStore

EventSpec = tuple[EventType, JSONObject]
"""An event to emit: its type and its data (`events/payloads.py`)."""


def durable_count(specs: Sequence[EventSpec]) -> int:
    """How many numbers a batch of `specs` takes (its ephemeral events take none)."""
    return sum(1 for event_type, _ in specs if event_type not in EPHEMERAL)


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
        (event,) = await self.emit_many(conn, ctx, thread_id, [(event_type, data)], run_id=run_id)
        return event

    async def emit_many(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        specs: Sequence[EventSpec],
        *,
        run_id: str | None = None,
        reserved: int | None = None,
    ) -> list[Event]:
        """Record and publish `specs`, in order, as one batch within the caller's transaction
        (one numbering statement, one insert); call it last before commit. `reserved`: the
        last of the batch's numbers (`durable_count(specs)` of them), when this transaction
        reserved them already with the update that placed the message they announce
        (`MessageStore.append_announced`). Ephemeral events among `specs` are published in
        their place, not numbered, not stored."""
        return await self.emit_groups(conn, ctx, thread_id, [(run_id, specs)], reserved=reserved)

    async def emit_groups(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        groups: Sequence[tuple[str | None, Sequence[EventSpec]]],
        *,
        reserved: int | None = None,
    ) -> list[Event]:
        """`emit_many` for events of different runs (or of none) in one batch: each group is
        its run id and its specs, in order (a post's `message_created`, of no run, and the
        `run_queued` of the run it queues)."""
        durable = sum(durable_count(specs) for _, specs in groups)
        if not durable:
            raise ValueError("a batch numbers durable events: use publish_ephemeral")
        if reserved is None:
            reserved = await self._store.reserve(conn, ctx, thread_id, durable)
        seq, now = reserved - durable, datetime.now(UTC)
        batch: list[Event] = []
        for run_id, specs in groups:
            for event_type, data in specs:
                ephemeral = event_type in EPHEMERAL
                seq += 0 if ephemeral else 1
                batch.append(
                    Event(
                        type=event_type,
                        thread_id=thread_id,
                        user_id=ctx.user_id,
                        seq=0 if ephemeral else seq,  # a delta is placed by the bus
                        data=data,
                        run_id=run_id,
                        ts=now,
                    )
                )
        await self._store.insert_many(conn, [event for event in batch if event.durable])
        await self._bus.publish_many(batch)
        return batch

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
