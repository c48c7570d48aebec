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
  of one user, and the take (the UPDATE that leases the run) counts the user's running runs
  again in its own WHERE, a statement that starts once the lock is granted (READ COMMITTED: the
  count sees every claim committed before). Three round trips: candidate, lock, take; the
  statements are built once per queue. A claim waits for that lock
  only while it holds no other: after skipping a full user it only tries the next one's.
  SQLite serializes writers (BEGIN IMMEDIATE), which gives the same guarantees.
The claim's transaction goes on to start the run (`ExecutionEngine.begin`), which writes the
run's thread; so the candidate query locks the thread's row with the run's (PostgreSQL, SKIP
LOCKED on both). Writers that lock a thread and then its runs (archiving or deleting it, an
interrupting post) then never hold one of the two while a claim holds the other, and a claim
still waits for no row, only for a user's lock (no deadlock).
The candidate query also tells the claimer what it saw beside the run it takes (`Claimed`):
whether another run stays claimable (claim again at once), and whether queued runs are held
back (behind their thread's active run, or their user's limit) that a run ending may free.
Every write that ends or requeues a run is conditional on the run being exactly as the caller
saw it (status, lease owner and attempt), so a worker that lost its lease, or an old attempt of
a run its own worker claimed again, cannot overwrite the outcome of the one that took over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

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

# `served` costs each waiting user two index probes (`ix_runs_user_started` backwards for the
# last start, `ix_runs_user_status` for the running count), whatever the user's history: an
# aggregate over every run the user ever started grew with it (46 ms of PostgreSQL per claim
# with 32 waiting users of 5,000 runs each, 1.6 ms this way). MATERIALIZED: once per user,
# not once per candidate it is joined to (the planner guesses one row and loops).
_CLAIM_SQL = """
WITH queued AS (
    SELECT id, user_id, created_at,
           row_number() OVER (PARTITION BY user_id ORDER BY created_at, id) AS user_rank
    FROM runs WHERE status = 'queued'
),
served AS MATERIALIZED (
    SELECT waiting.user_id,
           (SELECT max(started_at) FROM runs AS mine
            WHERE mine.user_id = waiting.user_id) AS last_started,
           (SELECT count(*) FROM runs AS mine
            WHERE mine.user_id = waiting.user_id AND mine.status = 'running') AS busy
    FROM (SELECT DISTINCT user_id FROM queued) AS waiting
)
SELECT runs.id, runs.user_id, coalesce(served.busy, 0) AS busy, {user_limit} AS user_limit,
       (SELECT count(*) FROM queued) AS waiting
FROM runs
JOIN threads ON threads.id = runs.thread_id
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
LIMIT :candidates
"""
# PostgreSQL: the candidate's run row, and its thread's row too, since the run's start (in the
# claim's transaction) writes the thread: a writer that locks the thread and then the run
# (archiving or deleting the thread, an interrupting post) must never hold one while this
# claim holds the other. SKIP LOCKED on both: a claim waits for no row, only for a user's lock.
_CLAIM_LOCKS = " FOR UPDATE OF runs SKIP LOCKED FOR NO KEY UPDATE OF threads SKIP LOCKED"


_USER_KEY = (_CLAIM_LOCK_NAMESPACE, sa.func.hashtext(sa.bindparam("user_id", type_=sa.String())))
_WAIT_FOR_USER = sa.select(sa.func.pg_advisory_xact_lock(*_USER_KEY))
_TRY_USER = sa.select(sa.func.pg_try_advisory_xact_lock(*_USER_KEY))
# The user's running runs, counted in the take's own WHERE (PostgreSQL: see `claim_next`).
_USER_HAS_ROOM = """(SELECT count(*) FROM runs AS mine
     WHERE mine.user_id = runs.user_id AND mine.status = 'running') < {user_limit}"""


# The run's user's plan, read by the take for the run's start (its token budget), rather than
# by a statement of its own: the same unlocked read, one round trip fewer per run.
_USER_PLAN = (
    sa.select(users.c.plan).where(users.c.id == runs.c.user_id).scalar_subquery().label("user_plan")
)


@dataclass(frozen=True, slots=True)
class _ClaimStatements:
    candidate: sa.Executable
    take: sa.Executable
    take_if_room: sa.Executable | None
    """PostgreSQL's take, which also checks the user's limit; None on SQLite."""

    @classmethod
    def build(cls, user_limit: str, dialect: str) -> _ClaimStatements:
        query = _CLAIM_SQL.format(user_limit=user_limit)
        if dialect == "postgresql":
            query += _CLAIM_LOCKS
        candidate = sa.text(query).bindparams(
            sa.bindparam("skipped", expanding=True, type_=sa.String())
        )
        take = (
            runs.update()
            .where(runs.c.id == sa.bindparam("claim_run"), runs.c.status == RunStatus.QUEUED.value)
            .values(
                status=RunStatus.RUNNING.value,
                attempt=runs.c.attempt + 1,
                lease_owner=sa.bindparam("claim_worker"),
                lease_expires_at=sa.bindparam("claim_expires"),
                started_at=sa.func.coalesce(runs.c.started_at, sa.bindparam("claim_now")),
            )
            .returning(*runs.c, _USER_PLAN)
        )
        take_if_room = None
        if dialect == "postgresql":
            take_if_room = take.where(sa.text(_USER_HAS_ROOM.format(user_limit=user_limit)))
        return cls(candidate=candidate, take=take, take_if_room=take_if_room)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A claim's run, and what its candidate query saw beside it (`RunQueue.claim`)."""

    run: Run | None
    """The run taken, or None: no run is claimable now."""
    more: bool
    """Another run stays claimable after this one (another user's, or this user's with room
    left): worth claiming again at once. False when it was not looked for."""
    held_back: bool
    """Queued runs remain that no claim may take now (behind their thread's active run, their
    user at the limit, or being claimed by another worker): a run that ends may free one.
    True when the claim could not tell (it found no candidate at all)."""
    user_plan: str | None = None
    """The plan of the run's user (`users.plan`) when the run was taken; None: none."""


def _next_stays_claimable(rows: Sequence[sa.Row[Any]]) -> bool:
    """Whether the second candidate (if the query read one) may still be taken once the first
    was: it is another user's, or its user (the same) has room for one more."""
    if len(rows) < 2:
        return False
    first, second = rows
    return bool(second.user_id != first.user_id or int(first.busy) + 1 < int(second.user_limit))


def unclaimed(run: Run) -> Run:
    """`run`, as claimed, the way it was before its claim (`RunQueue.claim`'s take): for ending
    a run whose claim's transaction rolled back, conditional on it being still queued."""
    attempt = run.attempt - 1
    return replace(
        run,
        status=RunStatus.QUEUED,
        attempt=attempt,
        lease_owner=None,
        started_at=run.started_at if attempt else None,  # the first claim sets it
    )


# The run row is still exactly as the caller's `Run` shows it: same status, lease owner and
# attempt (`_as_seen`). Built once with the statements below, like the claim's: `IS NOT
# DISTINCT FROM` (SQLite: `IS`) compares a queued run's NULL lease owner like any other, so one
# statement serves both.
_AS_SEEN = sa.and_(
    runs.c.id == sa.bindparam("seen_id"),
    runs.c.status == sa.bindparam("seen_status"),
    runs.c.attempt == sa.bindparam("seen_attempt"),
    runs.c.lease_owner.is_not_distinct_from(sa.bindparam("seen_owner", type_=sa.String())),
)
_HEARTBEAT = (
    runs.update()
    .where(_AS_SEEN)
    .values(lease_expires_at=sa.bindparam("lease_expires_at"))
    .returning(runs.c.cancel_requested)
)
_FINISH = (
    runs.update()
    .where(_AS_SEEN)
    .values(
        status=sa.bindparam("status"),
        result=sa.bindparam("result"),
        error=sa.bindparam("error"),
        lease_owner=None,
        lease_expires_at=None,
        finished_at=sa.bindparam("finished_at"),
    )
)
_RELEASE = {
    count_attempt: runs.update()
    .where(_AS_SEEN)
    .values(
        status=RunStatus.QUEUED.value,
        lease_owner=None,
        lease_expires_at=None,
        attempt=runs.c.attempt if count_attempt else runs.c.attempt - 1,
    )
    for count_attempt in (False, True)
}
_REQUEUE = (
    runs.update()
    .where(_AS_SEEN)
    .values(status=RunStatus.QUEUED.value, lease_owner=None, lease_expires_at=None)
)
_STATUS_OF = sa.select(runs.c.status).where(runs.c.id == sa.bindparam("run_id"))


def _as_seen(run: Run) -> dict[str, object]:
    """The parameters of `_AS_SEEN` for `run`."""
    return {
        "seen_id": run.id,
        "seen_status": run.status.value,
        "seen_attempt": run.attempt,
        "seen_owner": run.lease_owner,
    }


class RunQueue:
    def __init__(
        self, *, plan_limits: Mapping[str, int] | None = None, default_limit: int | None = None
    ) -> None:
        """`plan_limits`: concurrent runs per plan name (`users.plan`); a user on no plan (or
        an unknown one) gets `default_limit`, else the `per_user_limit` of each claim. Every
        limit is capped by that `per_user_limit`."""
        self._plan_limits = dict(plan_limits or {})
        self._default_limit = default_limit
        self._built: dict[str, _ClaimStatements] = {}

    def _limit_sql(self) -> str:
        """The SQL of the candidate user's concurrent-run limit (`runs.user_id`'s), capped by
        the claim's `:per_user_limit`; its other parameters are `_limit_params`'."""
        if not self._plan_limits and self._default_limit is None:
            return "CAST(:per_user_limit AS INTEGER)"
        cases = [
            f"WHEN users.plan = :plan_{n} THEN CAST(:plan_limit_{n} AS INTEGER)"
            for n in range(len(self._plan_limits))
        ]
        return (
            f"(SELECT CASE {' '.join(cases)} ELSE CAST(:default_limit AS INTEGER) END "
            "FROM users WHERE users.id = runs.user_id)"
        )

    def _limit_params(self, per_user_limit: int) -> dict[str, object]:
        params: dict[str, object] = {"per_user_limit": per_user_limit}
        for n, (plan, limit) in enumerate(sorted(self._plan_limits.items())):
            params[f"plan_{n}"], params[f"plan_limit_{n}"] = plan, min(limit, per_user_limit)
        params["default_limit"] = min(self._default_limit or per_user_limit, per_user_limit)
        return params

    def _statements(self, dialect: str) -> _ClaimStatements:
        """Built once per dialect: the claim's statements are the same on every call."""
        built = self._built.get(dialect)
        if built is None:
            built = self._built[dialect] = _ClaimStatements.build(self._limit_sql(), dialect)
        return built

    async def claim_next(
        self,
        conn: AsyncConnection,
        *,
        worker_id: str,
        lease_seconds: float,
        per_user_limit: int,
    ) -> Run | None:
        """Claim the next fair, eligible queued run, or return None when there is none."""
        claimed = await self.claim(
            conn, worker_id=worker_id, lease_seconds=lease_seconds, per_user_limit=per_user_limit
        )
        return claimed.run

    async def claim(
        self,
        conn: AsyncConnection,
        *,
        worker_id: str,
        lease_seconds: float,
        per_user_limit: int,
        look_ahead: bool = False,
    ) -> Claimed:
        """Claim the next fair, eligible queued run, and say what the queue holds beside it.

        On PostgreSQL, three round trips: the candidate (its row locked), the user's claim
        lock, and the take, which counts the user's running runs in its own WHERE: it starts
        after the lock was granted, so its snapshot holds every claim committed before.
        `look_ahead`: the candidate query also reads (and locks) the next candidate, so that
        `Claimed.more` can say whether to claim again; a caller that could not take another run
        now (no free slot) passes False and leaves that row to other workers."""
        statements = self._statements(conn.dialect.name)
        params = {**self._limit_params(per_user_limit), "candidates": 2 if look_ahead else 1}
        now = datetime.now(UTC)
        lease = {
            "claim_worker": worker_id,
            "claim_expires": now + timedelta(seconds=lease_seconds),
            "claim_now": now,
        }
        skipped: list[str] = []
        for _ in range(_MAX_CLAIM_TRIES):
            rows = (await conn.execute(statements.candidate, {**params, "skipped": skipped})).all()
            if not rows:
                # Whether runs wait behind a thread or a user's limit, this claim cannot tell.
                return Claimed(None, more=False, held_back=True)
            run_id, user_id = str(rows[0].id), str(rows[0].user_id)
            if statements.take_if_room is None:
                # SQLite: writers are serialized, so the candidate query's count is exact.
                taken = await self._take(conn, statements.take, run_id, lease)
            # Wait for another claim of this user only while holding no other user's lock,
            # so two claimers can never wait for each other (no deadlock).
            elif await self._lock_user(conn, user_id, wait=not skipped):
                taken = await self._take(conn, statements.take_if_room, run_id, {**lease, **params})
            else:
                taken = None
            if taken is not None:
                more = _next_stays_claimable(rows)
                held_back = bool(skipped) or int(rows[0].waiting) > 1 + more
                run, user_plan = taken
                return Claimed(run, more=more, held_back=held_back, user_plan=user_plan)
            # The candidate's row is locked by this transaction, so it is still queued: the
            # user is at the limit (another worker's claim committed meanwhile), or another
            # claimer holds the user's lock.
            skipped.append(user_id)
        return Claimed(None, more=False, held_back=True)

    async def _lock_user(self, conn: AsyncConnection, user_id: str, *, wait: bool) -> bool:
        """Take the user's claim lock (held to the end of this transaction). Without `wait`,
        a user whose lock another claimer holds counts as full for now (False)."""
        if wait:
            await conn.execute(_WAIT_FOR_USER, {"user_id": user_id})
            return True
        return bool(await conn.scalar(_TRY_USER, {"user_id": user_id}))

    async def _take(
        self,
        conn: AsyncConnection,
        statement: sa.Executable,
        run_id: str,
        params: Mapping[str, object],
    ) -> tuple[Run, str | None] | None:
        """The run taken, with its user's plan; None: not taken."""
        row = (await conn.execute(statement, {**params, "claim_run": run_id})).first()
        return (run_from_row(row), row.user_plan) if row is not None else None

    async def heartbeat(
        self, conn: AsyncConnection, run: Run, *, lease_seconds: float
    ) -> bool | None:
        """Extend the lease. Returns whether a cancel was requested; None if the lease is lost."""
        expires = datetime.now(UTC) + timedelta(seconds=lease_seconds)
        row = (
            await conn.execute(_HEARTBEAT, {**_as_seen(run), "lease_expires_at": expires})
        ).first()
        return None if row is None else bool(row.cancel_requested)

    async def status_of(self, conn: AsyncConnection, run_id: str) -> RunStatus | None:
        """The run's status now; None when it no longer exists (its thread was deleted)."""
        status = await conn.scalar(_STATUS_OF, {"run_id": run_id})
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
            _FINISH,
            {
                **_as_seen(run),
                "status": status.value,
                "result": result,
                "error": error,
                "finished_at": datetime.now(UTC),
            },
        )
        return result_proxy.rowcount == 1

    async def release(
        self, conn: AsyncConnection, run: Run, *, count_attempt: bool = False
    ) -> bool:
        """Hand a running run back to the queue. A graceful shutdown's hand-back does not count
        as an attempt; one after a failure (a lost database connection) does."""
        result = await conn.execute(_RELEASE[count_attempt], _as_seen(run))
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
        result = await conn.execute(_REQUEUE, _as_seen(run))
        return result.rowcount == 1

    async def count_by_status(self, conn: AsyncConnection) -> dict[str, int]:
        rows = (
            await conn.execute(sa.select(runs.c.status, sa.func.count()).group_by(runs.c.status))
        ).all()
        return {str(status): int(count) for status, count in rows}
