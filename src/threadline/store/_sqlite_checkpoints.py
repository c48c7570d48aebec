"""WAL checkpoints for a SQLite engine's writer, off the event loop.

Left to itself, SQLite checkpoints inside a COMMIT: the commit that takes the WAL past 1,000
pages copies them back into the database file and syncs it before it returns. The writer
commits on the event loop's thread (store/_sqlite_driver.py), where that copy would stall every
request of the process (commits of up to 50 ms were measured on the benchmark machine). So the
writer's connection turns automatic checkpoints off (`wal_autocheckpoint=0`) and counts its
commits here; after every `every_commits` of them, the writer that made the last one runs a
checkpoint on a worker thread before it hands on the write gate (store/sqlite.py).

The event loop runs meanwhile; the process's other writers wait for the gate, as they waited
for a COMMIT that checkpointed before. That wait is what lets the checkpoint finish: with no
frame appended while it runs (by this process), it copies the whole WAL unless a reader still
uses old frames, and the next write then starts the WAL from its beginning again, so it stays
about as large as what is written between two checkpoints. (A checkpoint on a thread of its own
while writers go on would never catch up under steady writes, and the WAL would grow without
end.) Writers of other processes on the same file are not held back, as SQLite's own automatic
checkpoints do not hold them back either; a checkpoint they leave incomplete is completed by a
later one.

The checkpoints are PASSIVE: they never wait for a reader or a writer (no busy handler) and
never make one wait in SQLite. Closing a database's last connection checkpoints it as well.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading

logger = logging.getLogger(__name__)

EVERY_COMMITS = 200
"""Writer commits between two checkpoints: a few hundred pages of WAL at the sizes this
application writes, the order of SQLite's own 1,000-page threshold."""

WAIT_SECONDS = 10.0
"""How long a writer waits for a checkpoint before it hands on the gate anyway (a checkpoint
is bounded by the disk; this bounds the await, as every database await is bounded)."""


class Checkpointer:
    """Counts the writer's commits (`committed`) and runs a checkpoint of the database at
    `path` when one is due (`checkpoint_if_due`)."""

    def __init__(self, path: str, *, every_commits: int = EVERY_COMMITS) -> None:
        self._path = path
        self._every_commits = every_commits
        self._commits = 0
        # The checkpoints' own connection, opened by the first one. Used by one worker thread
        # at a time (`_using`): a checkpoint that outlived its writer's wait is not joined by
        # the next one.
        self._connection: sqlite3.Connection | None = None
        self._using = threading.Lock()
        self.checkpoints = 0
        """Checkpoints run so far (whole or partial), for tests and diagnostics."""

    def committed(self) -> None:
        """Count a commit of the writer (on the event loop: no I/O, no wait)."""
        self._commits += 1

    @property
    def due(self) -> bool:
        return self._commits >= self._every_commits

    async def checkpoint_if_due(self) -> None:
        if not self.due:
            return
        self._commits = 0
        try:
            async with asyncio.timeout(WAIT_SECONDS):
                await asyncio.to_thread(self._checkpoint)
        except TimeoutError:
            logger.warning("A WAL checkpoint of %s took over %g s", self._path, WAIT_SECONDS)

    async def close(self) -> None:
        if self._connection is not None:
            await asyncio.to_thread(self._close)

    def _checkpoint(self) -> None:
        if not self._using.acquire(blocking=False):
            return  # the previous one is still running
        try:
            if self._connection is None:
                self._connection = sqlite3.connect(
                    self._path, isolation_level=None, check_same_thread=False
                )
            self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self.checkpoints += 1
        except sqlite3.Error:
            # Another process's checkpoint is running (SQLITE_BUSY), or the file went
            # away: the next checkpoint copies what this one did not.
            logger.warning("A WAL checkpoint of %s failed", self._path, exc_info=True)
        finally:
            self._using.release()

    def _close(self) -> None:
        with self._using:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
