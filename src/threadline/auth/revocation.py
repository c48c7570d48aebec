"""Revoked tokens, checked on every request by every process.

With Redis configured the list lives there (a key per token, expiring with the token);
otherwise in the database. Both forget a token once it would have expired anyway.

While Redis cannot be reached the Redis list fails closed: checking or revoking a token raises
`RevocationUnavailableError` (HTTP 503 `revocation_unavailable`, WebSocket close 1013), so a
token that was signed out is never accepted again, not even during an outage. The reasoning is
in docs/deployment.md ("When Redis is down").
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Protocol

import sqlalchemy as sa
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from threadline.errors import ThreadlineError
from threadline.store.db import read_transaction
from threadline.store.tables import revoked_tokens


class RevocationUnavailableError(ThreadlineError):
    """The revocation list cannot be read or written right now (Redis unreachable)."""

    code = "revocation_unavailable"
    http_status = 503
    retry_after_seconds = 5

    def __init__(self, cause: BaseException) -> None:
        super().__init__("Signed-in requests are unavailable for a moment; retry shortly")
        self.cause = f"{type(cause).__name__}: {cause}"


class RevocationList(Protocol):
    in_database: bool
    """Whether the list is a table: then it is read in the request's transaction."""

    async def revoke(self, jti: str, *, expires_at: datetime) -> None: ...

    async def is_revoked(self, jti: str, *, conn: AsyncConnection | None = None) -> bool:
        """Whether `jti` was revoked. A list kept in the database reads it in `conn`'s
        transaction when one is given (the request's own), else in a transaction of its own."""
        ...


class RedisRevocationList:
    in_database = False

    def __init__(self, redis: Redis, *, prefix: str, timeout_seconds: float = 2.0) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:revoked:"
        self._timeout = timeout_seconds

    async def revoke(self, jti: str, *, expires_at: datetime) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.set(
                    self._prefix + jti, b"1", exat=int(expires_at.timestamp()) + 1
                )
        except (RedisError, OSError, TimeoutError) as exc:
            raise RevocationUnavailableError(exc) from exc

    async def is_revoked(self, jti: str, *, conn: AsyncConnection | None = None) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._redis.exists(self._prefix + jti))
        except (RedisError, OSError, TimeoutError) as exc:
            raise RevocationUnavailableError(exc) from exc


_REVOKED = sa.select(revoked_tokens.c.jti).where(revoked_tokens.c.jti == sa.bindparam("jti"))


class DatabaseRevocationList:
    in_database = True

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def revoke(self, jti: str, *, expires_at: datetime) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                revoked_tokens.delete().where(revoked_tokens.c.expires_at < datetime.now(UTC))
            )
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        revoked_tokens.insert().values(jti=jti, expires_at=expires_at)
                    )
            except IntegrityError:
                pass  # already revoked: logging out twice is not an error

    async def is_revoked(self, jti: str, *, conn: AsyncConnection | None = None) -> bool:
        if conn is not None:
            return await conn.scalar(_REVOKED, {"jti": jti}) is not None
        async with read_transaction(self._engine) as own:
            return await own.scalar(_REVOKED, {"jti": jti}) is not None
