"""Waking workers when a run is queued in another process: PostgreSQL `LISTEN/NOTIFY`.

A run insert does `pg_notify` in its own transaction (`store/runs.py`), unless the inserting
process's own worker has room to take the run (`runs/service.py`), and PostgreSQL delivers the
notification to every listening connection when, and only if, that transaction commits.
`PostgresRunWaker` holds one dedicated connection per worker process (not one from the pool: a
pooled connection is recycled, which would drop the `LISTEN`), calls `wake` with the queued
run's id on every notification, and reconnects by itself when the connection dies (a restarted
server, `pg_terminate_backend`). A notification sent while it was disconnected is lost; it
wakes the worker once on every (re)connect, and the worker's poll is the safety net for the
rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg
from sqlalchemy.engine import make_url

from threadline.store.runs import RUN_QUEUED_CHANNEL

logger = logging.getLogger(__name__)
_CHECK_SECONDS = 2.0
_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)


def asyncpg_dsn(database_url: str) -> str:
    """The libpq-style DSN asyncpg takes, from a normalized `postgresql+asyncpg://` URL."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class PostgresRunWaker:
    def __init__(self, database_url: str, *, connect_timeout_seconds: float = 5.0) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._timeout = connect_timeout_seconds

    async def run(self, wake: Callable[[str | None], None]) -> None:
        """Listen until cancelled, reconnecting after a lost connection."""
        failures = 0
        while True:
            try:
                await self._listen(wake)
                failures = 0
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                delay = _RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)]
                failures += 1
                logger.warning("Run notifications unavailable (%s); retrying in %s s", exc, delay)
                await asyncio.sleep(delay)

    async def _listen(self, wake: Callable[[str | None], None]) -> None:
        connection = await asyncpg.connect(self._dsn, timeout=self._timeout)
        closed = asyncio.Event()
        try:
            connection.add_termination_listener(lambda _conn: closed.set())
            await connection.add_listener(
                RUN_QUEUED_CHANNEL, lambda _conn, _pid, _channel, run_id: wake(run_id or None)
            )
            wake(None)  # anything queued while this process was not listening
            # The termination listener fires on a clean close; a dead socket is only noticed
            # when the connection is used, so check it now and then.
            while not closed.is_set():
                try:
                    async with asyncio.timeout(_CHECK_SECONDS):
                        await closed.wait()
                except TimeoutError:
                    async with asyncio.timeout(self._timeout):
                        await connection.execute("SELECT 1")
            logger.info("The run-notification connection closed; reconnecting")
        finally:
            if not connection.is_closed():
                await connection.close(timeout=self._timeout)
