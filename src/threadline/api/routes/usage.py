"""The signed-in user's usage per UTC day, with their plan's limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from threadline.api.deps import DbConn, DbUser, ServicesDep
from threadline.api.schemas import ErrorOut
from threadline.plans import PlanLimits
from threadline.usage.store import DayUsage

router = APIRouter(prefix="/v1/me", tags=["usage"])


class UsageDayOut(BaseModel):
    day: str
    """UTC day, `YYYY-MM-DD`."""
    runs: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    duration_ms: int

    @classmethod
    def of(cls, usage: DayUsage) -> UsageDayOut:
        return cls(
            day=usage.day,
            runs=usage.runs,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens,
            duration_ms=usage.duration_ms,
        )


class UsageOut(BaseModel):
    plan: str | None
    """The user's plan; null: the deployment-wide limits apply."""
    limits: PlanLimits
    data: list[UsageDayOut]
    """Days with runs, newest first."""


@router.get("/usage", responses={401: {"model": ErrorOut}})
async def usage(
    user: DbUser,
    conn: DbConn,
    services: ServicesDep,
    days: Annotated[int, Query(ge=1, le=366, description="How many days back")] = 30,
) -> UsageOut:
    since = (datetime.now(UTC) - timedelta(days=days - 1)).date()
    plan = await services.quotas.plan(conn, user.user_id)
    rows = await services.usage.per_day(conn, user_id=user.user_id, since=since)
    return UsageOut(plan=plan.name, limits=plan.limits, data=[UsageDayOut.of(r) for r in rows])
