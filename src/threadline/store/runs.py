"""Runs, which double as the work queue.

A queued run is claimed by a worker that sets a lease (`lease_owner`, `lease_expires_at`) and
heartbeats it. The claim is fair and safe:
- fair across users: the user with the fewest running runs goes first, then the one served
  least recently (never served first), so one user's backlog of a hundred runs does not delay
  another user's first run: users take turns;
- one active run per thread: only the oldest queued-or-running run of a thread is claimable;
- a user at the concurrent-run limit is skipped;
- on PostgreSQL, `FOR UPDATE SKIP LOCKED` lets many workers claim at once without waiting;
  SQLite serializes writers (BEGIN IMMEDIATE), which gives the same guarantees.
Status changes that end a run are conditional on the lease (`lease_owner = me`), so a worker
that lost its lease cannot overwrite the outcome of the worker that took over.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.context import UserContext
from threadline.errors import NotFoundError
from threadline.ids import IdPrefix, is_valid_id, new_id
from threadline.store.pagination import Page, check_limit, parse_id_cursor
from threadline.store.tables import runs, threads

JSONObject = dict[str, object]


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


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


def _run(row: sa.Row[tuple[object, ...]]) -> Run:
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


_CLAIM_SQL = """
WITH queued AS (
    SELECT id, user_id, created_at,
           row_number() OVER (PARTITION BY user_id ORDER BY created_at, id) AS user_rank
    FROM runs WHERE status = 'queued'
),
served AS (
    SELECT user_id,
           max(started_at) AS last_started,
           sum(CASE WHEN status = 'running' THEN 1 ELSE 0 END) AS busy
    FROM runs
    WHERE started_at IS NOT NULL AND user_id IN (SELECT user_id FROM queued)
    GROUP BY user_id
)
SELECT runs.id FROM runs
JOIN queued ON queued.id = runs.id
LEFT JOIN served ON served.user_id = runs.user_id
WHERE runs.status = 'queued'
  AND NOT EXISTS (
    SELECT 1 FROM runs AS earlier
    WHERE earlier.thread_id = runs.thread_id
      AND earlier.status IN ('queued', 'running')
      AND (earlier.created_at < runs.created_at
           OR (earlier.created_at = runs.created_at AND earlier.id < runs.id)))
  AND coalesce(served.busy, 0) < :per_user_limit
ORDER BY coalesce(served.busy, 0), served.last_started NULLS FIRST,
         queued.user_rank, queued.created_at, runs.id
LIMIT 1
"""


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
    ) -> Run:
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
        await conn.execute(runs.insert().values(**values))
        await conn.execute(
            threads.update()
            .where(threads.c.id == thread_id, threads.c.user_id == ctx.user_id)
            .values(last_activity_at=now)
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
        return _run(row)

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
        items = [_run(row) for row in rows[:limit]]
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
        return [_run(row) for row in rows]

    async def count_active_for_user(self, conn: AsyncConnection, ctx: UserContext) -> int:
        count = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(runs)
            .where(runs.c.user_id == ctx.user_id, runs.c.status.in_(ACTIVE_STATUSES))
        )
        return int(count or 0)

    async def mark_cancel_requested(
        self, conn: AsyncConnection, ctx: UserContext, run_id: str
    ) -> None:
        await conn.execute(
            runs.update()
            .where(runs.c.id == run_id, runs.c.user_id == ctx.user_id)
            .values(cancel_requested=True)
        )

    async def claim_next(
        self,
        conn: AsyncConnection,
        *,
        worker_id: str,
        lease_seconds: float,
        per_user_limit: int,
    ) -> Run | None:
        """Claim the next fair, eligible queued run, or return None when there is none."""
        query = _CLAIM_SQL
        if conn.dialect.name == "postgresql":
            query += " FOR UPDATE OF runs SKIP LOCKED"
        run_id = await conn.scalar(sa.text(query), {"per_user_limit": per_user_limit})
        if run_id is None:
            return None
        now = datetime.now(UTC)
        row = (
            await conn.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.status == RunStatus.QUEUED.value)
                .values(
                    status=RunStatus.RUNNING.value,
                    attempt=runs.c.attempt + 1,
                    lease_owner=worker_id,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    started_at=sa.func.coalesce(runs.c.started_at, now),
                )
                .returning(*runs.c)
            )
        ).first()
        return _run(row) if row is not None else None

    async def heartbeat(
        self, conn: AsyncConnection, run_id: str, *, worker_id: str, lease_seconds: float
    ) -> bool | None:
        """Extend the lease. Returns whether a cancel was requested; None if the lease is lost."""
        row = (
            await conn.execute(
                runs.update()
                .where(
                    runs.c.id == run_id,
                    runs.c.lease_owner == worker_id,
                    runs.c.status == RunStatus.RUNNING.value,
                )
                .values(lease_expires_at=datetime.now(UTC) + timedelta(seconds=lease_seconds))
                .returning(runs.c.cancel_requested)
            )
        ).first()
        return None if row is None else bool(row.cancel_requested)

    async def finish(
        self,
        conn: AsyncConnection,
        run_id: str,
        *,
        status: RunStatus,
        worker_id: str | None,
        result: JSONObject | None = None,
        error: JSONObject | None = None,
    ) -> bool:
        """Set a terminal status, once. With `worker_id`, only while that worker holds the lease
        (or, for a queued run, only while it is still queued). Returns whether it applied."""
        condition = (
            sa.and_(runs.c.status == RunStatus.RUNNING.value, runs.c.lease_owner == worker_id)
            if worker_id is not None
            else runs.c.status == RunStatus.QUEUED.value
        )
        result_proxy = await conn.execute(
            runs.update()
            .where(runs.c.id == run_id, condition)
            .values(
                status=status.value,
                result=result,
                error=error,
                lease_owner=None,
                lease_expires_at=None,
                finished_at=datetime.now(UTC),
            )
        )
        return result_proxy.rowcount == 1

    async def release(self, conn: AsyncConnection, run_id: str, *, worker_id: str) -> bool:
        """Hand a running run back to the queue (graceful shutdown)."""
        result = await conn.execute(
            runs.update()
            .where(
                runs.c.id == run_id,
                runs.c.lease_owner == worker_id,
                runs.c.status == RunStatus.RUNNING.value,
            )
            .values(
                status=RunStatus.QUEUED.value,
                lease_owner=None,
                lease_expires_at=None,
                attempt=runs.c.attempt - 1,
            )
        )
        return result.rowcount == 1

    async def expired(self, conn: AsyncConnection, *, limit: int = 100) -> list[Run]:
        """Running runs whose lease ran out: their worker is gone."""
        query = (
            sa.select(runs)
            .where(
                runs.c.status == RunStatus.RUNNING.value,
                runs.c.lease_expires_at < datetime.now(UTC),
            )
            .limit(limit)
        )
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        return [_run(row) for row in (await conn.execute(query)).all()]

    async def requeue_expired(self, conn: AsyncConnection, run: Run) -> bool:
        result = await conn.execute(
            runs.update()
            .where(
                runs.c.id == run.id,
                runs.c.status == RunStatus.RUNNING.value,
                runs.c.lease_owner == run.lease_owner,
            )
            .values(status=RunStatus.QUEUED.value, lease_owner=None, lease_expires_at=None)
        )
        return result.rowcount == 1

    async def count_by_status(self, conn: AsyncConnection) -> dict[str, int]:
        rows = (
            await conn.execute(sa.select(runs.c.status, sa.func.count()).group_by(runs.c.status))
        ).all()
        return {str(status): int(count) for status, count in rows}
