from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from threadline.api.deps import ServicesDep
from threadline.api.schemas import HealthOut
from threadline.store.db import ping

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


async def _check(probe: object) -> str:
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_SECONDS):
            await probe  # type: ignore[misc]
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return "ok"
