"""Everything a running server holds: built once by the app's lifespan, closed in reverse."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from threadline.auth.passwords import Passwords
from threadline.auth.revocation import DatabaseRevocationList, RedisRevocationList
from threadline.auth.service import AuthService
from threadline.auth.tokens import TokenCodec
from threadline.errors import ConfigurationError
from threadline.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from threadline.settings import Settings
from threadline.store.db import create_engine
from threadline.store.messages import MessageStore
from threadline.store.migrate import ensure_schema_current, upgrade_to_head
from threadline.store.threads import ThreadStore
from threadline.store.users import UserStore

logger = logging.getLogger(__name__)
_REDIS_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    engine: AsyncEngine
    redis: Redis | None
    users: UserStore
    threads: ThreadStore
    messages: MessageStore
    auth: AuthService
    limiter: RateLimiter


def resolve_secret(settings: Settings) -> str:
    """The token-signing key: configured, or (outside production) kept in `data_dir` so tokens
    survive a restart of the embedded server."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value()
    if settings.environment == "production":  # settings already refuse this; belt and braces
        raise ConfigurationError("THREADLINE_SECRET_KEY", "is required in production")
    path = Path(settings.data_dir) / "secret_key"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.write_text(secret)
    path.chmod(0o600)
    logger.info("Generated a token-signing key in %s", path)
    return secret


async def _connect_redis(url: str) -> Redis:
    redis = Redis.from_url(
        url,
        socket_timeout=_REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=_REDIS_TIMEOUT_SECONDS,
        health_check_interval=30,
    )
    try:
        async with asyncio.timeout(_REDIS_TIMEOUT_SECONDS):
            await redis.ping()
    except (OSError, TimeoutError, Exception) as exc:
        await redis.aclose()
        raise ConfigurationError("THREADLINE_REDIS_URL", f"cannot reach Redis: {exc}") from exc
    return redis


@asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[Services]:
    async with AsyncExitStack() as stack:
        engine = create_engine(settings.database_url, pool_size=settings.database_pool_size)
        stack.push_async_callback(engine.dispose)
        if settings.is_sqlite:
            await upgrade_to_head(engine)
        else:
            await ensure_schema_current(engine)
        redis = await _connect_redis(settings.redis_url) if settings.redis_url else None
        if redis is not None:
            stack.push_async_callback(redis.aclose)
        revocations = (
            RedisRevocationList(redis, prefix=settings.redis_prefix)
            if redis is not None
            else DatabaseRevocationList(engine)
        )
        limiter: RateLimiter = (
            RedisRateLimiter(redis, prefix=settings.redis_prefix)
            if redis is not None
            else MemoryRateLimiter()
        )
        users = UserStore()
        auth = AuthService(
            engine=engine,
            users=users,
            passwords=Passwords(),
            tokens=TokenCodec(resolve_secret(settings), ttl_seconds=settings.token_ttl_seconds),
            revocations=revocations,
        )
        yield Services(
            settings=settings,
            engine=engine,
            redis=redis,
            users=users,
            threads=ThreadStore(max_metadata_bytes=settings.max_metadata_bytes),
            messages=MessageStore(
                max_message_chars=settings.max_message_chars,
                max_metadata_bytes=settings.max_metadata_bytes,
            ),
            auth=auth,
            limiter=limiter,
        )
