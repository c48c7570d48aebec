"""SQLite, the embedded default: one writer at a time per process, readers beside it.

SQLite lets one transaction write to a database file at a time. Left to itself, a second
writer waits in SQLite's busy handler, which sleeps on the connection's thread in growing
steps (up to 100 ms) and retries; with 32 users' runs writing at once those sleeps made up
much of a run's latency, and each sleeping writer held a pooled connection. So here:

- **One writer per process.** Every connection from `engine.connect()` or `engine.begin()`
  is the *writer*: it first takes the engine's write `Gate` (one slot, an asyncio semaphore)
  and holds it from before the pool checkout until the connection is closed. Writers of one
  process therefore wait in turn (first come, first served) on the event loop, holding
  nothing, and the writer never meets another writer of its process inside SQLite. The writer
  has a pool of its own, one connection, whose transactions begin with `BEGIN IMMEDIATE`
  (taking SQLite's write lock up front); its page cache stays valid from one write to the
  next, since no other connection of the process writes.
- **The gate is held for CPU time only.** While it holds the write lock the writer runs its
  statements on the event loop's thread, not on aiosqlite's (store/_sqlite_driver.py), and a
  writer whose transaction ended hands the connection back without SQLAlchemy's extra task
  (`GatedConnection.__aexit__`): from taking the gate to handing it on, a write transaction
  that awaits nothing else lets no other task run, so in the common case no writer waits for
  the gate at all. The gate still serializes writers that do await something inside their
  transaction, and it is what makes a claim's read-then-write exact.
- **Readers never wait for the writer.** `read_transaction` (store/db.py) opens its
  connection with `reader(engine)`: one of `READERS` connections of the readers' pool (behind
  a gate of their own, for the same bounded waits), whose transactions begin deferred; under
  WAL a reader sees the last committed state while a write is in progress.
- **Settled reads are writers.** `EventStore.after(settled=True)` must not read before a
  transaction that already published an event commits; on SQLite it runs on a writer
  connection, so it starts after the writer in flight has finished.
- **Every wait has a deadline.** A connection that cannot take its gate within
  `wait_timeout_seconds` fails with `DatabaseBusyError` (a 503 `database_busy`; a run that
  meets it is handed back to the queue). A task that holds the writer and asks for it again
  would wait for itself: that is refused at once with `RuntimeError`.
- **Other processes** on the same file (`threadline worker`, the admin CLI, `threadline
  migrate`) have gates of their own; between processes SQLite's lock decides, and
  `busy_timeout` stays as the fallback that makes a writer of one process wait for a writer of
  another instead of failing with "database is locked" (that wait is on the connection's
  thread, never on the event loop).
- **Checkpoints** copy the WAL back into the database file every `EVERY_COMMITS` commits, on
  a worker thread, while the writer that made the last of them still holds the gate
  (store/_sqlite_checkpoints.py); the writer's commits never checkpoint themselves.

Durability (`journal_mode=WAL`, `synchronous=NORMAL`): every commit is atomic and survives a
crash of the process; the WAL is synced to disk at checkpoints rather than at each commit, so
a power loss or an operating-system crash can lose the last transactions before it (they roll
back whole; the database is never corrupted). `synchronous=FULL` would sync the WAL at every
commit: a disk flush inside the COMMIT, on the event loop's thread, for each of a run's seven
write transactions; kept at NORMAL, the choice SQLite recommends for WAL.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

# Importing the driver module registers its dialect under DRIVER_NAME.
from threadline.store._sqlite_checkpoints import Checkpointer
from threadline.store._sqlite_driver import DRIVER_NAME
from threadline.store.errors import DatabaseBusyError

READERS = 8
"""Read transactions of one process at once. With the writer, that is `READERS + 1`
connections, each a thread of aiosqlite's (docs/configuration.md)."""

# SQLite's page cache per connection (KiB; the default is 2,000) and where its temporary
# tables and sort spills go (memory instead of a file).
_CACHE_KIB = 16_000


class Gate:
    """At most `capacity` connections of one kind at a time, handed out in arrival order,
    every wait bounded by `timeout_seconds`."""

    def __init__(self, *, kind: str, capacity: int, location: str, timeout_seconds: float):
        self._slots = asyncio.Semaphore(capacity)  # wakes its waiters in the order they came
        self._exclusive = capacity == 1
        self._holder: asyncio.Task[Any] | None = None
        self._kind = kind
        self._location = location
        self._timeout_seconds = timeout_seconds

    async def acquire(self) -> None:
        task = asyncio.current_task()
        if self._exclusive and task is not None and task is self._holder:
            raise RuntimeError(
                f"this task already holds the SQLite {self._kind} connection; a second one "
                "would wait for the first forever (use read_transaction for reads inside a "
                "write)"
            )
        if not self._slots.locked():
            await self._slots.acquire()  # a free slot: no wait, so no deadline to arm
        else:
            await self._wait_for_slot()
        if self._exclusive:
            self._holder = task

    async def _wait_for_slot(self) -> None:
        try:
            async with asyncio.timeout(self._timeout_seconds):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise DatabaseBusyError(
                location=self._location, kind=self._kind, timeout_seconds=self._timeout_seconds
            ) from exc

    def release(self) -> None:
        self._holder = None
        self._slots.release()


class GatedConnection(AsyncConnection):
    """A connection that holds a slot of its engine's gate from before the pool checkout until
    it is closed."""

    __slots__ = ("_gate", "_holds_slot", "_checkpointer")

    def __init__(self, async_engine: AsyncEngine, sync_connection: Connection | None = None):
        super().__init__(async_engine, sync_connection)
        if not isinstance(async_engine, GatedEngine):
            raise TypeError("a GatedConnection belongs to a GatedEngine")
        self._gate = async_engine.gate
        self._holds_slot = False
        self._checkpointer = async_engine.checkpointer

    async def start(self, is_ctxmanager: bool = False) -> AsyncConnection:
        await self._gate.acquire()
        self._holds_slot = True
        try:
            return await super().start(is_ctxmanager)
        except BaseException:
            self._release_slot()
            raise

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        if self.in_transaction():
            # A rollback: SQLAlchemy runs the close in a task of its own, which a
            # cancellation of this one cannot cut short.
            await super().__aexit__(type_, value, traceback)
            return
        # Nothing left to end: the close only hands the connection back to the pool, which
        # no cancellation can cut short (it does not wait for anything), so it needs no task
        # of its own (that task cost a turn of the event loop with the gate held, and every
        # writer waited for it). A checkpoint that is due is waited for, and cut short by a
        # cancellation harmlessly: it goes on in its thread, beside the next writer.
        await self.close()

    async def close(self) -> None:
        try:
            await super().close()
            if self._checkpointer is not None:
                await self._checkpointer.checkpoint_if_due()  # while this writer holds the gate
        finally:
            self._release_slot()

    def _release_slot(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            self._gate.release()


class GatedEngine(AsyncEngine):
    """An `AsyncEngine` whose connections take a slot of `gate` first."""

    __slots__ = ("gate", "checkpointer")
    _connection_cls = GatedConnection

    def __init__(
        self, sync_engine: Engine, *, gate: Gate, checkpointer: Checkpointer | None = None
    ) -> None:
        super().__init__(sync_engine)
        self.gate = gate
        self.checkpointer = checkpointer


class SQLiteEngine(GatedEngine):
    """The writer's engine (`connect()`, `begin()`), with the readers' and the writer's
    checkpointer beside it."""

    __slots__ = ("readers",)

    def __init__(
        self, sync_engine: Engine, *, gate: Gate, readers: GatedEngine, checkpointer: Checkpointer
    ) -> None:
        super().__init__(sync_engine, gate=gate, checkpointer=checkpointer)
        self.readers = readers

    async def dispose(self, close: bool = True) -> None:
        await self.readers.dispose(close)
        await super().dispose(close)
        if self.checkpointer is not None:
            await self.checkpointer.close()


def sync_engines(engine: AsyncEngine) -> list[Engine]:
    """Every sync engine behind `engine`, for event listeners that must see all its work."""
    if isinstance(engine, SQLiteEngine):
        return [engine.sync_engine, engine.readers.sync_engine]
    return [engine.sync_engine]


def reader(engine: AsyncEngine) -> AsyncConnection:
    """A connection for transactions that only read: on SQLite one of the readers' (it
    begins deferred and never waits for the writer); on PostgreSQL `engine.connect()`."""
    if isinstance(engine, SQLiteEngine):
        return engine.readers.connect()
    return engine.connect()


def create_sqlite_engine(
    database_url: str,
    *,
    echo: bool = False,
    busy_timeout_seconds: float = 30.0,
    wait_timeout_seconds: float = 30.0,
) -> SQLiteEngine:
    """The engine for a SQLite file: WAL, one writer at a time (see the module docstring).
    `busy_timeout_seconds` bounds a wait for another process's writer, `wait_timeout_seconds`
    a wait for a connection of this process."""
    url = make_url(database_url).set(drivername=DRIVER_NAME)
    if url.database:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    location = str(url.database)

    checkpointer = Checkpointer(location)
    busy_timeout_ms = int(busy_timeout_seconds * 1000)

    def engine(*, begin_statement: str, connections: int, inline: bool = False) -> Engine:
        sync_engine = create_async_engine(
            url,
            echo=echo,
            begin_statement=begin_statement,
            writes_inline=inline,
            busy_timeout_ms=busy_timeout_ms,
            after_commit=checkpointer.committed if inline else None,
            # The gate hands out at most this many connections, so the pool never makes
            # anyone wait; its timeout is only a backstop.
            pool_size=connections,
            max_overflow=0,
            pool_timeout=wait_timeout_seconds,
            connect_args={"timeout": busy_timeout_seconds, "check_same_thread": not inline},
        ).sync_engine
        _configure_connections(sync_engine, busy_timeout_ms=busy_timeout_ms, inline=inline)
        return sync_engine

    def gate(kind: str, capacity: int) -> Gate:
        return Gate(
            kind=kind, capacity=capacity, location=location, timeout_seconds=wait_timeout_seconds
        )

    readers = GatedEngine(
        engine(begin_statement="BEGIN", connections=READERS),
        gate=gate("read", READERS),
    )
    return SQLiteEngine(
        engine(begin_statement="BEGIN IMMEDIATE", connections=1, inline=True),
        gate=gate("write", 1),
        readers=readers,
        checkpointer=checkpointer,
    )


def _configure_connections(sync_engine: Engine, *, busy_timeout_ms: int, inline: bool) -> None:
    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver: the dialect's `do_begin` starts them.
        # A deferred transaction that reads and then writes cannot wait for the write lock
        # (SQLite fails it at once with SQLITE_BUSY), so the writer begins IMMEDIATE: within
        # this process its gate already made the lock free, another process's writer is
        # waited for on busy_timeout. A reader begins deferred and under WAL never waits.
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
        if inline:
            # The writer's statements run on the event loop (store/_sqlite_driver.py), where
            # nothing may wait: its BEGIN fails at once when another process holds the lock
            # (and is then retried on its thread, on `busy_timeout_ms`), and its commits
            # leave checkpoints to the checkpointer's thread (store/_sqlite_checkpoints.py).
            cursor.execute("PRAGMA busy_timeout=0")
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()
