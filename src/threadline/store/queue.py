"""The run queue: the system-scoped side of the `runs` table (claim, heartbeat, release,
expire, and the one conditional write that ends a run). User-scoped reads and writes of runs
are in `store/runs.py`.

A queued run is claimed by a worker that sets a lease (`lease_owner`, `lease_expires_at`) and
heartbeats it. The claim is fair and safe:
- fair across users: the user with the fewest running runs goes first, then the one served
  least recently (never served first), so one user's backlog of a hundred runs does not delay
  another user's first run: users take turns;
- one active run per thread: only the oldest queued-or-running run of a thread is claimable;
- a user at the concurrent-run limit is skipped, exactly, however many workers claim at once:
  on PostgreSQL `FOR UPDATE SKIP LOCKED` lets workers pick candidates without waiting for each
  other, then a transaction-scoped advisory lock on the candidate's user serializes the claims
  of one user, and the user's running runs are counted again under it (READ COMMITTED: the
  count sees every claim committed before the lock was granted). A claim waits for that lock
  only while it holds no other: after skipping a full user it only tries the next one's.
  SQLite serializes writers (BEGIN IMMEDIATE), which gives the same guarantees.
Every write that ends or requeues a run is conditional on the run being exactly as the caller
saw it (status, lease owner and attempt), so a worker that lost its lease, or an old attempt of
a run its own worker claimed again, cannot overwrite the outcome of the one that took over.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.store.runs import JSONObject, Run, RunStatus, run_from_row
from threadline.store.tables import runs, users

# First key of the two-key advisory lock that serializes one user's claims (the second is the
# hash of the user id); an arbitrary constant, so other advisory-lock users cannot collide.
_CLAIM_LOCK_NAMESPACE = 0x7E1D
# A claim skips at most this many users found at their limit under the lock before it gives up
# until the next wake-up; each skip is one user that another worker just served.
_MAX_CLAIM_TRIES = 8

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
SELECT runs.id, runs.user_id FROM runs
JOIN queued ON queued.id = runs.id
LEFT JOIN served ON served.user_id = runs.user_id
WHERE runs.status = 'queued'
  AND NOT EXISTS (
    SELECT 1 FROM runs AS earlier
    WHERE earlier.thread_id = runs.thread_id
      AND earlier.status IN ('queued', 'running')
      AND (earlier.created_at < runs.created_at
           OR (earlier.created_at = runs.created_at AND earlier.id < runs.id)))
  AND coalesce(served.busy, 0) < {user_limit}
  AND runs.user_id NOT IN :skipped
ORDER BY coalesce(served.busy, 0), served.last_started NULLS FIRST,
         queued.user_rank, queued.created_at, runs.id
LIMIT 1
"""


def _as_seen(run: Run) -> sa.ColumnElement[bool]:
    """The run row is still exactly as `run` shows it: same status, lease owner and attempt."""
    held = (
        runs.c.lease_owner.is_(None)
        if run.lease_owner is None
        else runs.c.lease_owner == run.lease_owner
    )
    return sa.and_(
        runs.c.id == run.id,
        runs.c.status == run.status.value,
        runs.c.attempt == run.attempt,
        held,
    )


class RunQueue:
    def __init__(
        self, *, plan_limits: Mapping[str, int] | None = None, default_limit: int | None = None
    ) -> None:
        """`plan_limits`: concurrent runs per plan name (`users.plan`); a user on no plan (or
        an unknown one) gets `default_limit`, else the `per_user_limit` of each claim. Every
        limit is capped by that `per_user_limit`."""
        self._plan_limits = dict(plan_limits or {})
        self._default_limit = default_limit

    def _limit_sql(self, per_user_limit: int) -> tuple[str, dict[str, object]]:
        """The SQL for the candidate user's concurrent-run limit, and its parameters."""
        params: dict[str, object] = {"per_user_limit": per_user_limit}
        if not self._plan_limits and self._default_limit is None:
            return ":per_user_limit", params
        cases = []
        for n, (plan, limit) in enumerate(sorted(self._plan_limits.items())):
            params[f"plan_{n}"], params[f"plan_limit_{n}"] = plan, min(limit, per_user_limit)
            cases.append(f"WHEN users.plan = :plan_{n} THEN CAST(:plan_limit_{n} AS INTEGER)")
        params["default_limit"] = min(self._default_limit or per_user_limit, per_user_limit)
        return (
            f"(SELECT CASE {' '.join(cases)} ELSE CAST(:default_limit AS INTEGER) END "
            "FROM users WHERE users.id = runs.user_id)",
            params,
        )

    async def _limit_of(self, conn: AsyncConnection, user_id: str, per_user_limit: int) -> int:
        if not self._plan_limits and self._default_limit is None:
            return per_user_limit
        plan = await conn.scalar(sa.select(users.c.plan).where(users.c.id == user_id))
        limit = self._plan_limits.get(str(plan)) if plan is not None else None
        return min(limit or self._default_limit or per_user_limit, per_user_limit)

    async def claim_next(
        self,
        conn: AsyncConnection,
        *,
        worker_id: str,
        lease_seconds: float,
        per_user_limit: int,
    ) -> Run | None:
        """Claim the next fair, eligible queued run, or return None when there is none."""
        skipped: list[str] = []
        for _ in range(_MAX_CLAIM_TRIES):
            candidate = await self._candidate(conn, per_user_limit, skipped)
            if candidate is None:
                return None
            run_id, user_id = candidate
            # Wait for another claim of this user only while holding no other user's lock,
            # so two claimers can never wait for each other (no deadlock).
            if conn.dialect.name == "postgresql":
                limit = await self._limit_of(conn, user_id, per_user_limit)
                if not await self._user_has_room(conn, user_id, limit, wait=not skipped):
                    skipped.append(user_id)
                    continue
            return await self._take(conn, run_id, worker_id=worker_id, lease_seconds=lease_seconds)
        return None

    async def _candidate(
        self, conn: AsyncConnection, per_user_limit: int, skipped: list[str]
    ) -> tuple[str, str] | None:
        user_limit, params = self._limit_sql(per_user_limit)
        query = _CLAIM_SQL.format(user_limit=user_limit)
        if conn.dialect.name == "postgresql":
            query += " FOR UPDATE OF runs SKIP LOCKED"
        statement = sa.text(query).bindparams(
            sa.bindparam("skipped", expanding=True, type_=sa.String())
        )
        row = (await conn.execute(statement, {**params, "skipped": skipped})).first()
        return None if row is None else (str(row[0]), str(row[1]))

    async def _user_has_room(
        self, conn: AsyncConnection, user_id: str, limit: int, *, wait: bool
    ) -> bool:
        """Under the user's claim lock (held to the end of this transaction), whether the user
        still has fewer than `limit` running runs. Without `wait`, a user whose lock another
        claimer holds counts as full for now."""
        key = (_CLAIM_LOCK_NAMESPACE, sa.func.hashtext(user_id))
        if wait:
            await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(*key)))
        elif not await conn.scalar(sa.select(sa.func.pg_try_advisory_xact_lock(*key))):
            return False
        running = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(runs)
            .where(runs.c.user_id == user_id, runs.c.status == RunStatus.RUNNING.value)
        )
        return int(running or 0) < limit

    async def _take(
        self, conn: AsyncConnection, run_id: str, *, worker_id: str, lease_seconds: float
    ) -> Run | None:
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
        return run_from_row(row) if row is not None else None

    async def heartbeat(
        self, conn: AsyncConnection, run: Run, *, lease_seconds: float
    ) -> bool | None:
        """Extend the lease. Returns whether a cancel was requested; None if the lease is lost."""
        row = (
            await conn.execute(
                runs.update()
                .where(_as_seen(run))
                .values(lease_expires_at=datetime.now(UTC) + timedelta(seconds=lease_seconds))
                .returning(runs.c.cancel_requested)
            )
        ).first()
        return None if row is None else bool(row.cancel_requested)

    async def status_of(self, conn: AsyncConnection, run_id: str) -> RunStatus | None:
        """The run's status now; None when it no longer exists (its thread was deleted)."""
        status = await conn.scalar(sa.select(runs.c.status).where(runs.c.id == run_id))
        return None if status is None else RunStatus(status)

    async def finish(
        self,
        conn: AsyncConnection,
        run: Run,
        *,
        status: RunStatus,
        result: JSONObject | None = None,
        error: JSONObject | None = None,
    ) -> bool:
        """Set a terminal status, once, only if the run is still as `run` shows it (the lease
        of the attempt that ends it, or still queued). Returns whether it applied. Only
        `runs/outcomes.RunFinisher` calls this: ending a run is more than this write."""
        result_proxy = await conn.execute(
            runs.update()
            .where(_as_seen(run))
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

    async def release(
        self, conn: AsyncConnection, run: Run, *, count_attempt: bool = False
    ) -> bool:
        """Hand a running run back to the queue. A graceful shutdown's hand-back does not count
        as an attempt; one after a failure (a lost database connection) does."""
        result = await conn.execute(
            runs.update()
            .where(_as_seen(run))
            .values(
                status=RunStatus.QUEUED.value,
                lease_owner=None,
                lease_expires_at=None,
                attempt=runs.c.attempt if count_attempt else runs.c.attempt - 1,
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
        return [run_from_row(row) for row in (await conn.execute(query)).all()]

    async def requeue_expired(self, conn: AsyncConnection, run: Run) -> bool:
        result = await conn.execute(
            runs.update()
            .where(_as_seen(run))
            .values(status=RunStatus.QUEUED.value, lease_owner=None, lease_expires_at=None)
        )
        return result.rowcount == 1

    async def count_by_status(self, conn: AsyncConnection) -> dict[str, int]:
        rows = (
            await conn.execute(sa.select(runs.c.status, sa.func.count()).group_by(runs.c.status))
        ).all()
        return {str(status): int(count) for status, count in rows}
