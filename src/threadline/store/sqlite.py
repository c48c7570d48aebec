"""SQLite, the embedded default: one writer at a time per process, readers beside it.

SQLite lets one transaction write to a database file at a time. Left to itself, a second
writer waits in SQLite's busy handler, which sleeps on the connection's thread in growing
steps (up to 100 ms) and retries; with 32 users' runs writing at once those sleeps made up
much of a run's latency, and each sleeping writer held a pooled connection. So here:

- **One writer per process.** Every connection from `engine.connect()` or `engine.begin()`
  is a *writer*: it first takes the engine's `WriteGate`, an asyncio lock, and holds it from
  before the pool checkout until the connection is closed. Writers of one process therefore
  wait in turn (first come, first served) on the event loop, holding nothing, and a writer
  that holds the gate never meets another writer of its process inside SQLite. Its
  transaction begins with `BEGIN IMMEDIATE` (store/db.py), taking SQLite's write lock up
  front.
- **Readers never wait for the writer.** `read_transaction` (store/db.py) opens its
  connection with `reader(engine)`: no gate, a deferred `BEGIN`; under WAL it reads the last
  committed state while a write is in progress.
- **Settled reads are writers.** `EventStore.after(settled=True)` must not read before a
  transaction that already published an event commits; on SQLite it runs on a writer
  connection, so it starts after the writer in flight has finished.
- **Every wait has a deadline.** A writer that cannot take the gate within
  `write_timeout_seconds` fails with `WriteLockTimeoutError` (a 503 `database_busy`; a run
  that meets it is handed back to the queue). A task that already holds the gate and asks for
  it again would wait for itself: that is refused at once with `RuntimeError`.
- **Other processes** on the same file (`threadline worker`, the admin CLI, `threadline
  migrate`) have gates of their own; between processes SQLite's lock decides, and
  `busy_timeout` stays as the fallback that makes a writer of one process wait for a writer of
  another instead of failing with "database is locked".

Durability (`journal_mode=WAL`, `synchronous=NORMAL`): every commit is atomic and survives a
crash of the process; the WAL is synced to disk at checkpoints rather than at each commit, so
a power loss or an operating-system crash can lose the last transactions before it (they roll
back whole; the database is never corrupted).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from threadline.store._sqlite_driver import one_trip_dbapi
from threadline.store.errors import WriteLockTimeoutError

READ_ONLY_OPTION = "threadline_read_only"
"""Execution option of a reader's connection: its transaction begins deferred."""

POOL_SIZE = 6
"""Connections per process: the writer's and the readers'. Each is a thread of aiosqlite's;
more than this made the server slower on two cores, not faster (docs/benchmarks.md)."""

# SQLite's page cache per connection (KiB; the default is 2,000) and where its temporary
# tables and sort spills go (memory instead of a file).
_CACHE_KIB = 16_000


class WriteGate:
    """Lets one task at a time write, in arrival order, each wait bounded."""

    def __init__(self, *, location: str, timeout_seconds: float) -> None:
        self._lock = asyncio.Lock()  # wakes its waiters in the order they came
        self._holder: asyncio.Task[Any] | None = None
        self._location = location
        self._timeout_seconds = timeout_seconds

    async def acquire(self) -> None:
        task = asyncio.current_task()
        if task is not None and task is self._holder:
            raise RuntimeError(
                "this task already holds the SQLite write connection; a second one would wait "
                "for the first forever (use read_transaction for reads inside a write)"
            )
        try:
            async with asyncio.timeout(self._timeout_seconds):
                await self._lock.acquire()
        except TimeoutError as exc:
            raise WriteLockTimeoutError(
                location=self._location, timeout_seconds=self._timeout_seconds
            ) from exc
        self._holder = task

    def release(self) -> None:
        self._holder = None
        self._lock.release()


class WriterConnection(AsyncConnection):
    """A connection that holds its engine's write gate from before checkout until closed."""

    __slots__ = ("_gate", "_holds_gate")

    def __init__(self, async_engine: AsyncEngine, sync_connection: Connection | None = None):
        super().__init__(async_engine, sync_connection)
        if not isinstance(async_engine, SQLiteEngine):
            raise TypeError("a WriterConnection belongs to a SQLiteEngine")
        self._gate = async_engine.write_gate
        self._holds_gate = False

    async def start(self, is_ctxmanager: bool = False) -> AsyncConnection:
        await self._gate.acquire()
        self._holds_gate = True
        try:
            return await super().start(is_ctxmanager)
        except BaseException:
            self._release_gate()
            raise

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self._release_gate()

    def _release_gate(self) -> None:
        if self._holds_gate:
            self._holds_gate = False
            self._gate.release()


class SQLiteEngine(AsyncEngine):
    """An `AsyncEngine` whose `connect()` and `begin()` give writer connections."""

    __slots__ = ("write_gate", "readers")
    _connection_cls = WriterConnection

    def __init__(self, sync_engine: Engine, *, write_gate: WriteGate) -> None:
        super().__init__(sync_engine)
        self.write_gate = write_gate
        # The same pool and event listeners; its connections' transactions begin deferred.
        self.readers = AsyncEngine(sync_engine.execution_options(**{READ_ONLY_OPTION: True}))


def reader(engine: AsyncEngine) -> AsyncConnection:
    """A connection for transactions that only read: on SQLite it takes no write gate and
    begins deferred; on PostgreSQL it is `engine.connect()`."""
    if isinstance(engine, SQLiteEngine):
        return AsyncConnection(engine.readers)
    return engine.connect()


def create_sqlite_engine(
    database_url: str,
    *,
    echo: bool = False,
    busy_timeout_seconds: float = 30.0,
    write_timeout_seconds: float = 30.0,
) -> SQLiteEngine:
    """The engine for a SQLite file: WAL, one writer at a time (see the module docstring).
    `busy_timeout_seconds` bounds a wait for another process's writer, `write_timeout_seconds`
    a wait for this process's."""
    database = make_url(database_url).database
    if database:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    sync_engine = create_async_engine(
        database_url,
        echo=echo,
        module=one_trip_dbapi(),
        pool_size=POOL_SIZE,
        max_overflow=0,
        # A reader waits for a free connection at most this long (then a 503).
        pool_timeout=write_timeout_seconds,
        connect_args={"timeout": busy_timeout_seconds},
    ).sync_engine
    busy_timeout_ms = int(busy_timeout_seconds * 1000)

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so "begin" below decides how to start one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            "foreign_keys=ON",
            f"busy_timeout={busy_timeout_ms}",
            f"cache_size=-{_CACHE_KIB}",
            "temp_store=MEMORY",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A deferred transaction that reads and then writes cannot wait for the write lock:
        # SQLite fails it at once with SQLITE_BUSY. A writer takes the lock up front (within
        # this process the gate already made it free; another process's writer is waited for
        # on busy_timeout). A reader begins deferred, so under WAL it never waits.
        if connection.get_execution_options().get(READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    gate = WriteGate(location=str(database), timeout_seconds=write_timeout_seconds)
    return SQLiteEngine(sync_engine, write_gate=gate)
