"""Revoked tokens, checked on every request by every process.

With Redis configured the list lives there (a key per token, expiring with the token);
otherwise in the database. Both forget a token once it would have expired anyway.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from threadline.store.db import read_transaction
from threadline.store.tables import revoked_tokens


class RevocationList(Protocol):
    async def revoke(self, jti: str, *, expires_at: datetime) -> None: ...

    async def is_revoked(self, jti: str) -> bool: ...


class RedisRevocationList:
    def __init__(self, redis: Redis, *, prefix: str) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:revoked:"

    async def revoke(self, jti: str, *, expires_at: datetime) -> None:
        await self._redis.set(self._prefix + jti, b"1", exat=int(expires_at.timestamp()) + 1)

    async def is_revoked(self, jti: str) -> bool:
        return bool(await self._redis.exists(self._prefix + jti))


class DatabaseRevocationList:
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

    async def is_revoked(self, jti: str) -> bool:
        async with read_transaction(self._engine) as conn:
            found = await conn.scalar(
                sa.select(revoked_tokens.c.jti).where(revoked_tokens.c.jti == jti)
            )
        return found is not None
