"""Database engine set-up for SQLite (embedded) and PostgreSQL (scale-out)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from threadline.errors import ThreadlineError

logger = logging.getLogger(__name__)

_READ_ONLY = "threadline_read_only"
APPLICATION_NAME = "threadline"
"""`application_name` of the pooled PostgreSQL connections, as `pg_stat_activity` shows it."""
# How long a SQLite writer waits for the lock before failing with "database is locked".
_SQLITE_BUSY_TIMEOUT_MS = 30_000


class DatabaseUnavailableError(ThreadlineError):
    """The database cannot be reached, or does not answer in time."""

    code = "database_unavailable"

    def __init__(self, *, location: str, reason: str) -> None:
        super().__init__(f"Cannot reach the database at {location}: {reason}")
        self.location = location
        self.reason = reason


def create_engine(
    database_url: str,
    *,
    pool_size: int = 10,
    echo: bool = False,
    connect_timeout_seconds: float = 5.0,
    statement_timeout_seconds: float = 0.0,
    pool_timeout_seconds: float = 10.0,
) -> AsyncEngine:
    """Create the async engine for a normalized URL (see `settings.normalize_database_url`).

    On PostgreSQL, `connect_timeout_seconds` bounds opening a connection (TCP, TLS, start-up
    and authentication: a server that accepts but never answers fails within it), and a
    non-zero `statement_timeout_seconds` becomes the session's `statement_timeout`. A checkout
    waits at most `pool_timeout_seconds` for a free connection (SQLAlchemy's default, 30 s, is
    as long as many clients wait for a whole answer)."""
    if database_url.startswith("sqlite"):
        return _create_sqlite_engine(database_url, echo=echo)
    server_settings = {"application_name": APPLICATION_NAME}
    if statement_timeout_seconds > 0:
        server_settings["statement_timeout"] = str(int(statement_timeout_seconds * 1000))
    connect_args: dict[str, Any] = {
        "timeout": connect_timeout_seconds,
        "server_settings": server_settings,
    }
    engine = create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=pool_timeout_seconds,
        # No pre-ping: it cost every checkout a transaction of its own (BEGIN; ; ROLLBACK,
        # three round trips). A dead connection is handled without it:
        # - one whose socket the driver already saw close (a terminated backend, a restarted
        #   server) is replaced at checkout for free, by `_discard_closed` below;
        # - one that dies unnoticed fails its first statement: SQLAlchemy's `is_disconnect`
        #   invalidates it and every older pooled connection, and the request answers 503
        #   `database_unavailable` (api/errors.py) or the run is handed back to the queue
        #   (store/failures.py); the next checkout opens a fresh connection.
        pool_pre_ping=False,
        pool_recycle=1800,
        echo=echo,
        connect_args=connect_args,
    )
    event.listen(engine.sync_engine, "checkout", _discard_closed)
    return engine


def _discard_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Refuse a pooled connection whose socket is already closed; the pool then opens a new
    one. No round trip: asyncpg notices the server closing the socket while it sits idle."""
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the pooled connection was closed by the server")


def describe_location(database_url: str) -> str:
    """`host:port/database` (no credentials), or the SQLite file, for messages."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return str(url.database)
    host = url.host or str(url.query.get("host", "localhost"))
    return f"{host}:{url.port or 5432}/{url.database or ''}"


def unavailable(
    exc: BaseException, *, database_url: str, timeout_seconds: float
) -> DatabaseUnavailableError:
    """The one-line explanation of a failure to connect, with what to check."""
    cause: BaseException = getattr(exc, "orig", None) or exc
    if isinstance(cause, TimeoutError):
        reason = (
            f"no answer within {timeout_seconds:g} s "
            "(THREADLINE_DATABASE_CONNECT_TIMEOUT_SECONDS); is it a PostgreSQL server, "
            "and is it up?"
        )
    elif isinstance(cause, ConnectionRefusedError):
        reason = "connection refused (nothing listens there); check THREADLINE_DATABASE_URL"
        reason += " and that the server is running"
    else:
        detail = " ".join(str(cause).split()) or type(cause).__name__
        reason = f"{detail}; check THREADLINE_DATABASE_URL and that the server is running"
    return DatabaseUnavailableError(location=describe_location(database_url), reason=reason)


async def check_reachable(
    engine: AsyncEngine, *, database_url: str, timeout_seconds: float
) -> None:
    """Connect and run one query within about `timeout_seconds` (the driver's connect timeout
    bounds the connection; this bounds the query too), or raise `DatabaseUnavailableError`."""
    try:
        async with asyncio.timeout(timeout_seconds * 2):
            await ping(engine)
    except (OSError, TimeoutError, DBAPIError) as exc:
        raise unavailable(exc, database_url=database_url, timeout_seconds=timeout_seconds) from exc


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
