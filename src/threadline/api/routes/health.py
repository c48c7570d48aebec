from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from threadline.api.deps import ServicesDep
from threadline.api.schemas import HealthOut
from threadline.store.db import ping, read_transaction
from threadline.store.runs import RunStatus

router = APIRouter(tags=["operations"])
_CHECK_TIMEOUT_SECONDS = 3.0


@router.get("/healthz")
async def healthz() -> HealthOut:
    """The process is up and serving."""
    return HealthOut(status="ok")


@router.get("/readyz", responses={503: {"model": HealthOut}})
async def readyz(services: ServicesDep) -> JSONResponse:
    """The database (and Redis, when configured) answer: the process can take traffic."""
    checks = {"database": await _check(ping(services.engine))}
    if services.redis is not None:
        checks["redis"] = await _check(services.redis.ping())
    ready = all(value == "ok" for value in checks.values())
    body = HealthOut(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(services: ServicesDep) -> Response:
    """Prometheus metrics of this process (and run counts by state from the database)."""
    async with read_transaction(services.engine) as conn:
        counts = await services.queue.count_by_status(conn)
    for status in RunStatus:
        services.metrics.runs_by_state.labels(status.value).set(counts.get(status.value, 0))
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _check(probe: Awaitable[object]) -> str:
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_SECONDS):
            await probe
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return "ok"
