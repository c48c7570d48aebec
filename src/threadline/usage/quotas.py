"""Plan quotas, checked before anything is written.

Run and thread quotas are checked inside the transaction that would write, under the user's row
lock (`SELECT … FOR NO KEY UPDATE` on PostgreSQL, taken by the statement that reads the plan, or
already by the request's account check: `Standing.locked`; SQLite serializes writers with BEGIN
IMMEDIATE), and counted there, in statements that start after the lock was granted (READ
COMMITTED: they see every run or thread committed before): concurrent requests of one user
cannot overshoot. Messages per minute are
counted by the rate limiter (Redis INCR or this process's counter), atomic by itself.

Users on no plan keep the deployment-wide limits, refused as `rate_limited` as before; plan
limits are refused as `quota_exceeded`, naming the quota, its limit and when it resets.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from threadline.context import UserContext
from threadline.errors import RateLimitedError
from threadline.plans import PlanBook, UserPlan
from threadline.ratelimit import RateLimiter
from threadline.store.accounts import AccountStore, Standing
from threadline.store.db import read_transaction
from threadline.store.runs import RunStore
from threadline.store.tables import threads
from threadline.usage.store import UsageStore, next_day_start, utc_day

# A refused active-run quota frees up when one of the user's runs ends: no fixed reset time.
_ACTIVE_RUNS_RETRY_SECONDS = 5


class QuotaExceededError(RateLimitedError):
    code = "quota_exceeded"

    def __init__(
        self, *, plan: str, quota: str, limit: int, resets_at: datetime | None, retry_after: int
    ) -> None:
        when = f"; resets at {resets_at.isoformat()}" if resets_at else ""
        super().__init__(
            f"The {plan} plan allows {limit} {quota.replace('_', ' ')}{when}",
            retry_after_seconds=max(1, retry_after),
        )
        self.plan = plan
        self.quota = quota
        self.limit = limit
        self.resets_at = resets_at


def _seconds_until(moment: datetime) -> int:
    return int((moment - datetime.now(UTC)).total_seconds()) + 1


class Quotas:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        plans: PlanBook,
        accounts: AccountStore,
        usage: UsageStore,
        runs: RunStore,
        limiter: RateLimiter,
    ) -> None:
        self._engine = engine
        self.plans = plans
        self._accounts = accounts
        self._usage = usage
        self._runs = runs
        self._limiter = limiter

    async def plan(self, conn: AsyncConnection, user_id: str, *, lock: bool = False) -> UserPlan:
        return self.plans.resolve(await self._accounts.plan_of(conn, user_id, lock=lock))

    async def _locked_plan(
        self, conn: AsyncConnection, ctx: UserContext, standing: Standing | None
    ) -> UserPlan:
        if standing is not None and standing.locked:
            return self.plans.resolve(standing.plan)
        return await self.plan(conn, ctx.user_id, lock=True)

    async def lock(self, conn: AsyncConnection, ctx: UserContext) -> Standing:
        """Take the user's row lock for the checks that follow (see the module docstring)."""
        return await self._accounts.standing(conn, ctx.user_id, lock=True)

    async def check_run(
        self,
        conn: AsyncConnection,
        ctx: UserContext,
        *,
        standing: Standing | None = None,
        active_runs: int | None = None,
    ) -> None:
        """In the transaction that queues a run, before it commits. `standing`: the account
        as this transaction read it (locked: the plan is not read again); `active_runs`: the
        user's queued and running runs, already counted under that lock."""
        plan = await self._locked_plan(conn, ctx, standing)
        if plan.name is None:
            return
        limits = plan.limits
        if active_runs is None:
            active_runs = await self._runs.count_active_for_user(conn, ctx)
        if active_runs >= limits.active_runs:
            raise QuotaExceededError(
                plan=plan.name,
                quota="active_runs",
                limit=limits.active_runs,
                resets_at=None,
                retry_after=_ACTIVE_RUNS_RETRY_SECONDS,
            )
        if limits.tokens_per_day is not None:
            used = await self._usage.tokens_on(conn, ctx.user_id, utc_day())
            if used >= limits.tokens_per_day:
                resets = next_day_start()
                raise QuotaExceededError(
                    plan=plan.name,
                    quota="tokens_per_day",
                    limit=limits.tokens_per_day,
                    resets_at=resets,
                    retry_after=_seconds_until(resets),
                )

    async def check_thread(
        self, conn: AsyncConnection, ctx: UserContext, *, standing: Standing | None = None
    ) -> None:
        """In the transaction that creates a thread, before it writes anything (`standing`:
        as for `check_run`)."""
        plan = await self._locked_plan(conn, ctx, standing)
        limit = plan.limits.max_threads
        if plan.name is None or limit is None:
            return
        count = await conn.scalar(
            sa.select(sa.func.count()).select_from(threads).where(threads.c.user_id == ctx.user_id)
        )
        if int(count or 0) >= limit:
            raise QuotaExceededError(
                plan=plan.name, quota="threads", limit=limit, resets_at=None, retry_after=60
            )

    async def hit_message(
        self, ctx: UserContext, *, legacy_limit: int, standing: Standing | None = None
    ) -> None:
        """Count one message against the user's per-minute allowance (`standing`: the plan
        as the request's transaction read it; else it is read in a transaction of its own)."""
        if standing is not None:
            plan = self.plans.resolve(standing.plan)
        else:
            async with read_transaction(self._engine) as conn:
                plan = await self.plan(conn, ctx.user_id)
        limit = legacy_limit if plan.name is None else plan.limits.messages_per_minute
        decision = await self._limiter.hit(
            f"messages:{ctx.user_id}", limit=limit, window_seconds=60
        )
        if decision.allowed:
            return
        if plan.name is None:
            raise RateLimitedError(
                f"At most {limit} messages a minute; retry in {decision.retry_after_seconds} s",
                retry_after_seconds=decision.retry_after_seconds,
            )
        resets_at = datetime.fromtimestamp(
            int(datetime.now(UTC).timestamp()) + decision.retry_after_seconds, UTC
        )
        raise QuotaExceededError(
            plan=plan.name,
            quota="messages_per_minute",
            limit=limit,
            resets_at=resets_at,
            retry_after=decision.retry_after_seconds,
        )

    async def token_budget(
        self, conn: AsyncConnection, user_id: str, plan: UserPlan | None = None
    ) -> int | None:
        """Tokens the user may still spend today; None: unlimited. In the caller's transaction
        (a run's first one). `plan`: the user's, if the caller read it already."""
        if plan is None:
            plan = await self.plan(conn, user_id)
        if plan.limits.tokens_per_day is None:
            return None
        used = await self._usage.tokens_on(conn, user_id, utc_day())
        return plan.limits.tokens_per_day - used
