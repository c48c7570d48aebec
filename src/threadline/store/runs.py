"""Run records, as their user sees them: create, read, list, ask to cancel.

Every query here is scoped by the user. The queue side of the same table (claim, heartbeat,
release, expire, the terminal write) is system-scoped and lives in `store/queue.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.context import UserContext
from threadline.errors import NotFoundError
from threadline.ids import IdPrefix, is_valid_id, new_id
from threadline.statuses import RunStatus as RunStatus  # re-exported
from threadline.store.pagination import Page, check_limit, parse_id_cursor
from threadline.store.tables import runs, threads

JSONObject = dict[str, object]
RUN_QUEUED_CHANNEL = "threadline_run_queued"
"""The PostgreSQL NOTIFY channel a run insert signals, so idle workers wake at once."""


ACTIVE_STATUSES = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)


@dataclass(frozen=True, slots=True)
class Run:
    id: str
    thread_id: str
    user_id: str
    agent: str
    status: RunStatus
    input: JSONObject
    result: JSONObject | None
    error: JSONObject | None
    attempt: int
    max_attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_owner: str | None = None

    @property
    def active(self) -> bool:
        return self.status.value in ACTIVE_STATUSES


def run_from_row(row: sa.Row[tuple[object, ...]]) -> Run:
    m = row._mapping
    return Run(
        id=m["id"],
        thread_id=m["thread_id"],
        user_id=m["user_id"],
        agent=m["agent"],
        status=RunStatus(m["status"]),
        input=dict(m["input"]),
        result=m["result"],
        error=m["error"],
        attempt=m["attempt"],
        max_attempts=m["max_attempts"],
        cancel_requested=bool(m["cancel_requested"]),
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        lease_owner=m["lease_owner"],
    )


# Built once: a statement object costs more to build than to send (bind values per call).
_INSERT = runs.insert()
# The notification carries the run's id, so a worker that was told in-process already can
# ignore its echo (`runs/worker.py`).
_INSERT_AND_NOTIFY = runs.insert().returning(sa.func.pg_notify(RUN_QUEUED_CHANNEL, runs.c.id))
_TOUCH_THREAD = (
    threads.update()
    .where(threads.c.id == sa.bindparam("w_id"), threads.c.user_id == sa.bindparam("w_user_id"))
    .values(last_activity_at=sa.bindparam("w_now"))
)
_COUNT_ACTIVE_FOR_USER = (
    sa.select(sa.func.count())
    .select_from(runs)
    .where(runs.c.user_id == sa.bindparam("user_id"), runs.c.status.in_(ACTIVE_STATUSES))
)


class RunStore:
    async def create(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        *,
        agent: str,
        input: JSONObject,
        max_attempts: int,
        touch_thread: bool = True,
        notify_workers: bool = True,
    ) -> Run:
        """Queue a run. `touch_thread=False`: the caller already moved the thread's activity
        in this transaction (it appended the message the run answers). `notify_workers=False`:
        no NOTIFY for the listening workers (the caller's own worker takes the run)."""
        now = datetime.now(UTC)
        values: dict[str, object] = {
            "id": new_id(IdPrefix.RUN),
            "thread_id": thread_id,
            "user_id": ctx.user_id,
            "agent": agent,
            "status": RunStatus.QUEUED.value,
            "input": input,
            "result": None,
            "error": None,
            "attempt": 0,
            "max_attempts": max_attempts,
            "cancel_requested": False,
            "lease_owner": None,
            "lease_expires_at": None,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
        }
        if notify_workers and conn.dialect.name == "postgresql":
            # The NOTIFY rides on the insert (no round trip of its own); it is delivered to
            # listening workers when (and only if) this transaction commits. Not free: each
            # listening backend reads it in a transaction of its own.
            await conn.execute(_INSERT_AND_NOTIFY, values)
        else:
            await conn.execute(_INSERT, values)
        if touch_thread:
            await conn.execute(
                _TOUCH_THREAD, {"w_id": thread_id, "w_user_id": ctx.user_id, "w_now": now}
            )
        return Run(
            id=str(values["id"]),
            thread_id=thread_id,
            user_id=ctx.user_id,
            agent=agent,
            status=RunStatus.QUEUED,
            input=input,
            result=None,
            error=None,
            attempt=0,
            max_attempts=max_attempts,
            cancel_requested=False,
            created_at=now,
            started_at=None,
            finished_at=None,
        )

    async def get(self, conn: AsyncConnection, ctx: UserContext, run_id: str) -> Run:
        if not is_valid_id(run_id, IdPrefix.RUN):
            raise NotFoundError("run", run_id)
        row = (
            await conn.execute(
                sa.select(runs).where(runs.c.id == run_id, runs.c.user_id == ctx.user_id)
            )
        ).first()
        if row is None:
            raise NotFoundError("run", run_id)
        return run_from_row(row)

    async def page(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        thread_id: str,
        *,
        limit: int = 20,
        cursor: str | None = None,
    ) -> Page[Run]:
        """Newest first."""
        query = (
            sa.select(runs)
            .where(runs.c.thread_id == thread_id, runs.c.user_id == ctx.user_id)
            .order_by(runs.c.id.desc())
            .limit(check_limit(limit) + 1)
        )
        if cursor is not None:
            before = parse_id_cursor(cursor, IdPrefix.RUN)
            query = query.where(runs.c.id < before)
        rows = (await conn.execute(query)).all()
        items = [run_from_row(row) for row in rows[:limit]]
        return Page(items, items[-1].id if len(rows) > limit else None)

    async def active_for_thread(
        self, conn: AsyncConnection, ctx: UserContext, thread_id: str
    ) -> list[Run]:
        rows = (
            await conn.execute(
                sa.select(runs)
                .where(
                    runs.c.thread_id == thread_id,
                    runs.c.user_id == ctx.user_id,
                    runs.c.status.in_(ACTIVE_STATUSES),
                )
                .order_by(runs.c.created_at, runs.c.id)
            )
        ).all()
        return [run_from_row(row) for row in rows]

    async def count_active_for_user(self, conn: AsyncConnection, ctx: UserContext) -> int:
        count = await conn.scalar(_COUNT_ACTIVE_FOR_USER, {"user_id": ctx.user_id})
        return int(count or 0)

    async def mark_cancel_requested(
        self, conn: AsyncConnection, ctx: UserContext, run_id: str
    ) -> None:
        await conn.execute(
            runs.update()
            .where(runs.c.id == run_id, runs.c.user_id == ctx.user_id)
            .values(cancel_requested=True)
        )
