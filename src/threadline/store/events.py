"""Event numbering and the durable event log, scoped by user like every store.

Numbering hands out a block of consecutive numbers with one row update (`reserve`): a batch of
n events costs one statement, not n. The hot-path statements are built once, at import, with
bind parameters, so SQLAlchemy neither rebuilds them nor recomputes their cache key per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.context import UserContext
from threadline.errors import NotFoundError
from threadline.events.types import Event, EventType
from threadline.ids import IdPrefix, new_id
from threadline.store.tables import events, threads


@dataclass(frozen=True, slots=True)
class StoredEvents:
    events: list[Event]
    last_seq: int


def _event(row: sa.Row[tuple[object, ...]]) -> Event:
    m = row._mapping
    return Event(
        type=EventType(m["type"]),
        thread_id=m["thread_id"],
        user_id=m["user_id"],
        seq=m["seq"],
        data=dict(m["data"]),
        run_id=m["run_id"],
        ts=m["created_at"],
    )


_RESERVE = (
    threads.update()
    .where(
        threads.c.id == sa.bindparam("b_thread_id"),
        threads.c.user_id == sa.bindparam("b_user_id"),
    )
    .values(event_seq=threads.c.event_seq + sa.bindparam("b_count", type_=sa.Integer()))
    .returning(threads.c.event_seq)
)
# Every column given per row: one compiled statement for a batch of any size (an executemany).
_INSERT = events.insert()


class EventStore:
    async def reserve(
        self, conn: AsyncConnection, ctx: UserContext, thread_id: str, count: int = 1
    ) -> int:
        """Hand out the thread's next `count` sequence numbers, consecutive; returns the last
        (the first is `last - count + 1`). The row lock this takes is held until the
        transaction ends, which is what keeps publication in sequence order."""
        if count < 1:
            raise ValueError(f"count must be positive, not {count}")
        seq = await conn.scalar(
            _RESERVE, {"b_thread_id": thread_id, "b_user_id": ctx.user_id, "b_count": count}
        )
        if seq is None:
            raise NotFoundError("thread", thread_id)
        return int(seq)

    async def next_seq(self, conn: AsyncConnection, ctx: UserContext, thread_id: str) -> int:
        """Hand out the thread's next sequence number (`reserve` of one)."""
        return await self.reserve(conn, ctx, thread_id)

    async def insert_many(self, conn: AsyncConnection, batch: Sequence[Event]) -> None:
        """Store `batch` with one statement (one row: an execute; more: an executemany)."""
        rows = [
            {
                "id": new_id(IdPrefix.EVENT),
                "thread_id": event.thread_id,
                "user_id": event.user_id,
                "run_id": event.run_id,
                "seq": event.seq,
                "type": event.type.value,
                "data": event.data,
                "created_at": event.ts,
            }
            for event in batch
        ]
        if rows:
            await conn.execute(_INSERT, rows)

    async def after(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        *,
        after_seq: int | None,
        limit: int = 1000,
        settled: bool = False,
    ) -> StoredEvents:
        """Durable events with `seq > after_seq`, oldest first, at most `limit` of them (a
        page: fewer than `limit` means the log ends there), and the thread's last seq.
        With `after_seq=None`, only the last seq (a subscriber that wants live events only).

        `settled=True` first waits for a transaction that has numbered (and so published) an
        event of the thread but not committed it yet, so that every event published so far is
        at or below the last seq returned and readable. On PostgreSQL that is a share lock on
        the thread's row, held until the caller's transaction ends; on SQLite the caller's
        transaction must hold the write lock (`engine.begin()`/`connect()`, not
        `read_transaction`)."""
        if limit < 1:
            raise ValueError(f"limit must be positive, not {limit}")
        query = sa.select(threads.c.event_seq).where(
            threads.c.id == thread_id, threads.c.user_id == ctx.user_id
        )
        last_seq = await conn.scalar(query.with_for_update(read=True) if settled else query)
        if last_seq is None:
            raise NotFoundError("thread", thread_id)
        if after_seq is None:
            return StoredEvents(events=[], last_seq=int(last_seq))
        rows = (
            await conn.execute(
                sa.select(events)
                .where(
                    events.c.thread_id == thread_id,
                    events.c.user_id == ctx.user_id,
                    events.c.seq > after_seq,
                )
                .order_by(events.c.seq)
                .limit(limit)
            )
        ).all()
        return StoredEvents(events=[_event(row) for row in rows], last_seq=int(last_seq))

    async def first_seq_of_run(
        self, conn: AsyncConnection, ctx: UserContext, thread_id: str, run_id: str
    ) -> int | None:
        """The seq of the run's first stored event (its `run_queued`), None if it has none."""
        first = await conn.scalar(
            sa.select(sa.func.min(events.c.seq)).where(
                events.c.thread_id == thread_id,
                events.c.user_id == ctx.user_id,
                events.c.run_id == run_id,
            )
        )
        return int(first) if first is not None else None
