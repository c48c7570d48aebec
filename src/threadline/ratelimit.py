"""Per-user rate limits: fixed one-minute windows, counted in Redis or in this process.

A fixed window lets a burst of up to twice the limit straddle a boundary; for "messages per
minute" that is acceptable and costs one round trip, where a sliding log would cost a sorted
set per user.

The Redis limiter fails open: while Redis cannot be reached a hit is allowed and a warning is
logged (once per outage). A rate limit is a fairness tool, not a security boundary; the limits
that protect the system (active and concurrent runs per user) are counted in the database and
keep holding. See docs/deployment.md ("When Redis is down").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    retry_after_seconds: int


class RateLimiter(Protocol):
    async def hit(self, key: str, *, limit: int, window_seconds: int) -> RateDecision: ...


def _window(now: float, window_seconds: int) -> tuple[int, int]:
    start = int(now // window_seconds) * window_seconds
    return start, max(1, int(start + window_seconds - now + 0.999))


class MemoryRateLimiter:
    """For the single-process embedded mode; forgets old windows as it goes."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counts: dict[tuple[str, int], int] = {}

    async def hit(self, key: str, *, limit: int, window_seconds: int) -> RateDecision:
        start, retry_after = _window(self._clock(), window_seconds)
        if len(self._counts) > 10_000:
            self._counts = {k: v for k, v in self._counts.items() if k[1] >= start}
        count = self._counts.get((key, start), 0) + 1
        self._counts[(key, start)] = count
        return RateDecision(allowed=count <= limit, retry_after_seconds=retry_after)


class RedisRateLimiter:
    """Shared by every process: one round trip per hit. `SET NX EX` starts a window with its
    expiry (INCR keeps it); this also works on Redis 6, unlike `EXPIRE ... NX`."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        clock: Callable[[], float] = time.time,
        timeout_seconds: float = 2.0,
    ) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:rate:"
        self._clock = clock
        self._timeout = timeout_seconds
        self._failing = False

    async def hit(self, key: str, *, limit: int, window_seconds: int) -> RateDecision:
        start, retry_after = _window(self._clock(), window_seconds)
        redis_key = f"{self._prefix}{key}:{start}"
        try:
            async with asyncio.timeout(self._timeout):
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.set(redis_key, 0, ex=window_seconds + 1, nx=True)
                    pipe.incr(redis_key)
                    _, count = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            if not self._failing:
                logger.warning("Rate limits not enforced while Redis is unreachable: %s", exc)
            self._failing = True
            return RateDecision(allowed=True, retry_after_seconds=0)
        self._failing = False
        return RateDecision(allowed=int(count) <= limit, retry_after_seconds=retry_after)
