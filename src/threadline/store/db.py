"""Database engine set-up for SQLite (embedded) and PostgreSQL (scale-out)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

logger = logging.getLogger(__name__)

_READ_ONLY = "threadline_read_only"
# How long a SQLite writer waits for the lock before failing with "database is locked".
_SQLITE_BUSY_TIMEOUT_MS = 30_000


def create_engine(database_url: str, *, pool_size: int = 10, echo: bool = False) -> AsyncEngine:
    """Create the async engine for a normalized URL (see `settings.normalize_database_url`)."""
    if database_url.startswith("sqlite"):
        return _create_sqlite_engine(database_url, echo=echo)
    return create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        echo=echo,
    )


def _create_sqlite_engine(database_url: str, *, echo: bool) -> AsyncEngine:
    database = make_url(database_url).database
    if database:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(
        database_url,
        echo=echo,
        connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000},
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so "begin" below decides how to start one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A deferred transaction that reads and then writes cannot wait for the write lock:
        # SQLite fails it at once with SQLITE_BUSY. Taking the lock up front makes writers queue
        # on busy_timeout instead. Read-only transactions (`read_transaction`) begin deferred,
        # so under WAL they never wait for a writer.
        if connection.get_execution_options().get(_READ_ONLY):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@asynccontextmanager
async def read_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that only reads. On SQLite it does not take the write lock, so it runs
    beside writers; use `engine.begin()` for anything that may write."""
    async with engine.connect() as connection:
        await connection.execution_options(**{_READ_ONLY: True})
        async with connection.begin():
            yield connection


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
