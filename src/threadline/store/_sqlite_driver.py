"""The aiosqlite dialect with one trip to the connection's thread per statement, and none
while the connection holds SQLite's write lock.

aiosqlite runs each `sqlite3` call on the connection's own thread: the event loop queues the
call, the thread runs it and wakes the loop through `call_soon_threadsafe`. SQLAlchemy's
adapter makes four such trips for a query (open a cursor, execute, fetch the rows, close the
cursor) and three for a write. Each trip costs both threads a wake-up and a GIL hand-over,
which on a busy server outweighs the statement itself: with 32 users running agents,
aiosqlite's frames were in about a fifth of the server's CPU samples.

- **One trip per statement.** This adapter does the whole statement (execute, fetch every
  row, read `rowcount` and `lastrowid`, close) as one function on the thread. The results
  are what SQLAlchemy's buffered cursor held anyway: it always fetched every row up front.
  Server-side (streaming) cursors keep aiosqlite's own, trip-per-fetch, cursor.
- **No trip while writing.** The writer's engine (`writes_inline`, store/sqlite.py) begins
  its transactions with `begin_writing`: `BEGIN IMMEDIATE` runs on the event loop's thread
  (busy timeout 0: it never waits there), and once it holds SQLite's write lock every
  statement, the COMMIT and the ROLLBACK of that transaction run there too, without a trip.
  Why: the process's writers take turns on one write gate, and a trip is not just CPU, it
  is a wait for the busy event loop to resume the writer, during which every other writer
  waits for the gate. At 32 users a write transaction held the gate about 6 ms, of which
  SQLite's own work was 0.3 ms; with the gate held across trips the gate, not the CPU, set
  the throughput. Inline, a transaction that awaits nothing else holds the gate only for its
  own CPU time, and no other writer of the process ever waits for it.
  What may block the loop inline is a statement's own work: the statements of a write
  transaction here take tens of microseconds (p50 33 us, p99 0.6 ms measured at 32 users),
  less than a trip's own cost; a large delete (a thread with many events) takes as long as
  it takes. The waits that can be long stay off the loop: another process's lock (the BEGIN
  then runs again on the thread, waiting in SQLite's busy handler up to the engine's busy
  timeout) and WAL checkpoints (store/_sqlite_checkpoints.py).
- **No trip for nothing.** A commit or rollback of a connection with no transaction open
  (the pool's reset of every connection it takes back, after the transaction committed)
  does nothing, where sqlite3 would have done nothing after a trip.

A trip still under way when the next statement comes (its caller was cancelled) keeps that
statement a trip, queued behind it on the thread: one thread at a time uses a sqlite3
connection (`OneTripConnection._using`).

The dialect also begins each transaction itself (`do_begin`) with the statement its engine
was created with (`BEGIN IMMEDIATE` for the writer, `BEGIN` for the readers: store/sqlite.py),
without SQLAlchemy's statement machinery; before, a `begin` event listener sent it as a
statement of its own (3 to 6 % of the server's CPU in py-spy profiles at 32 users).

Engines select it with the URL scheme `sqlite+threadline` (registered on import).
"""

from __future__ import annotations

import collections
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import aiosqlite
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
    SQLiteDialect_aiosqlite,
)
from sqlalchemy.util.concurrency import await_

DRIVER_NAME = "sqlite+threadline"

# description, rows, rowcount, lastrowid: what a finished statement leaves on its cursor.
_Outcome = tuple[Any, list[Any], int, int | None]
_T = TypeVar("_T")


def _run_statement(
    connection: sqlite3.Connection, operation: str, parameters: Any, many: bool
) -> _Outcome:
    cursor = connection.cursor()
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else []
        # Read after fetching: a RETURNING statement counts its rows as they are stepped.
        return description, rows, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


class OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    """A buffered DBAPI cursor whose `execute` is a single call on the connection's thread."""

    __slots__ = ("_description", "_rowcount", "_lastrowid")

    def __init__(self, adapt_connection: AsyncAdapt_aiosqlite_connection) -> None:
        # No aiosqlite cursor: opening one was a trip of its own.
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = None  # type: ignore[assignment]
        self._soft_closed_memoized = {}  # type: ignore[assignment]
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> int:
        return self._lastrowid  # type: ignore[return-value]

    @property
    def arraysize(self) -> int:
        return 1

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        pass  # every row is fetched at once; there is no batch size to set

    async def _async_soft_close(self) -> None:
        pass  # the sqlite3 cursor was closed on the thread, with the statement

    def close(self) -> None:
        self._rows.clear()

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        return self._trip(operation, parameters, many=False)

    def executemany(self, operation: Any, seq_of_parameters: Any) -> Any:
        return self._trip(operation, seq_of_parameters, many=True)

    def _trip(self, operation: Any, parameters: Any, *, many: bool) -> None:
        connection: OneTripConnection = self._adapt_connection  # type: ignore[assignment]
        try:
            outcome = await_(connection.run(_run_statement, operation, parameters, many))
        except Exception as error:
            connection._handle_exception(error)
        self._description, rows, self._rowcount, self._lastrowid = outcome
        self._rows = collections.deque(rows)

    def setinputsizes(self, *inputsizes: Any) -> None:
        pass  # sqlite3 ignores input sizes


class OneTripConnection(AsyncAdapt_aiosqlite_connection):
    """A connection whose statements are one trip each, or none while it holds SQLite's
    write lock (see the module docstring)."""

    __slots__ = ("_inline", "_using")
    _cursor_cls = OneTripCursor  # type: ignore[assignment]  # a subclass, mypy disagrees

    def __init__(self, dbapi: Any, connection: Any) -> None:
        super().__init__(dbapi, connection)
        self._inline = False  # between a `begin_writing` and the end of its transaction
        # Held by whichever thread is inside the sqlite3 connection: the loop's, running a
        # statement inline, or aiosqlite's, on a trip. A trip still under way (its caller was
        # cancelled) makes the next statement a trip too, queued behind it.
        self._using = threading.Lock()

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(sqlite3_connection, *args)`: here and now while the connection writes, else
        on the connection's thread."""
        if self._inline and self._using.acquire(blocking=False):
            try:
                return fn(self._sqlite, *args)
            finally:
                self._using.release()
        async with self._execute_mutex:
            result: _T = await self._connection._execute(self._in_thread, fn, *args)
            return result

    def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        with self._using:
            return fn(self._sqlite, *args)

    @property
    def _sqlite(self) -> sqlite3.Connection:
        sqlite: sqlite3.Connection = self._connection._conn  # raises once closed
        return sqlite

    def begin_writing(self, statement: str, busy_timeout_ms: int) -> None:
        """Begin a transaction that takes SQLite's write lock (`BEGIN IMMEDIATE`); its
        statements then run inline until it ends."""
        try:
            await_(self._begin_writing(statement, busy_timeout_ms))
        except Exception as error:
            self._handle_exception(error)

    async def _begin_writing(self, statement: str, busy_timeout_ms: int) -> None:
        self._inline = True
        try:
            await self.run(_execute, statement)  # the connection's busy timeout is 0
            return
        except sqlite3.OperationalError as error:
            self._inline = False
            if error.sqlite_errorcode != sqlite3.SQLITE_BUSY or busy_timeout_ms <= 0:
                raise
        except BaseException:
            self._inline = False
            raise
        # Another process holds the lock: wait for it on the thread, in SQLite's busy
        # handler, as long as the engine's busy timeout allows.
        await self.run(_begin_waiting, statement, busy_timeout_ms)
        self._inline = True

    def commit(self) -> None:
        self._end(sqlite3.Connection.commit)

    def rollback(self) -> None:
        self._end(sqlite3.Connection.rollback)

    def _end(self, end: Callable[[sqlite3.Connection], None]) -> None:
        # Nothing to end (the pool's reset of a connection it takes back, after a commit):
        # sqlite3 would do nothing either, but only after a trip.
        if not self._in_transaction():
            return
        try:
            await_(self.run(end))
        except Exception as error:
            self._handle_exception(error)
        finally:
            self._inline = self._inline and self._in_transaction()

    def _in_transaction(self) -> bool:
        connection = self._connection._connection  # None once closed
        return connection is not None and connection.in_transaction


def _execute(connection: sqlite3.Connection, statement: str) -> None:
    connection.execute(statement)


def _begin_waiting(connection: sqlite3.Connection, statement: str, busy_timeout_ms: int) -> None:
    connection.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    try:
        connection.execute(statement)
    finally:
        connection.execute("PRAGMA busy_timeout=0")


class OneTripDBAPI(AsyncAdapt_aiosqlite_dbapi):
    """`OneTripDialect`'s DBAPI module: aiosqlite's, with connections of the class above."""

    def connect(self, *arg: Any, **kw: Any) -> OneTripConnection:
        adapted = super().connect(*arg, **kw)
        return OneTripConnection(self, adapted._connection)


class OneTripDialect(SQLiteDialect_aiosqlite):
    supports_statement_cache = True

    # Not keyword-only: create_engine() finds a dialect's own arguments by their names in the
    # positional part of the signature.
    def __init__(
        self,
        begin_statement: str = "BEGIN IMMEDIATE",
        writes_inline: bool = False,
        busy_timeout_ms: int = 0,
        after_commit: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.begin_statement = begin_statement
        self.writes_inline = writes_inline
        self.busy_timeout_ms = busy_timeout_ms
        self.after_commit = after_commit

    @classmethod
    def import_dbapi(cls) -> OneTripDBAPI:
        return OneTripDBAPI(aiosqlite, sqlite3)

    def do_commit(self, dbapi_connection: Any) -> None:
        dbapi_connection.commit()
        if self.after_commit is not None:
            self.after_commit()

    def do_begin(self, dbapi_connection: Any) -> None:
        if self.writes_inline:
            dbapi_connection.begin_writing(self.begin_statement, self.busy_timeout_ms)
            return
        # The connections run with isolation_level=None (the driver begins nothing by itself).
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(self.begin_statement)
        finally:
            cursor.close()


registry.register(DRIVER_NAME.replace("+", "."), __name__, OneTripDialect.__name__)
