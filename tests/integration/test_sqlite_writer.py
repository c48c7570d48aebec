"""The embedded SQLite default: one writer at a time per process (store/sqlite.py).

Most tests here set SQLite's busy timeout to 0, so two writers of one process that met inside
SQLite would fail at once with "database is locked" instead of waiting in the busy handler.
They pass because the write gate makes a process's writers take turns on the event loop; the
control test shows the same load failing without the gate.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tests.integration.test_runs_support import TERMINAL, run_settings, running_app
from threadline.settings import Settings
from threadline.store import db
from threadline.store._sqlite_checkpoints import EVERY_COMMITS
from threadline.store.db import read_transaction
from threadline.store.errors import DatabaseBusyError
from threadline.store.failures import is_database_unavailable
from threadline.store.sqlite import create_sqlite_engine

pytestmark = pytest.mark.integration

WRITERS = 50
_SCRATCH = sa.table("scratch", sa.column("writer", sa.Integer), sa.column("step", sa.Integer))


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "threadline.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
async def engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_sqlite_engine(sqlite_url, busy_timeout_seconds=0)
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE scratch (writer INTEGER, step INTEGER)"))
    yield engine
    await engine.dispose()


async def _write_twice(conn: AsyncConnection, writer: int) -> None:
    """Two inserts with a turn of the event loop between them, so that every other writer
    runs while this transaction is open."""
    await conn.execute(sa.insert(_SCRATCH).values(writer=writer, step=1))
    await asyncio.sleep(0)
    await conn.execute(sa.insert(_SCRATCH).values(writer=writer, step=2))


async def _count(engine: AsyncEngine) -> int:
    async with read_transaction(engine) as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(_SCRATCH)) or 0)


async def test_concurrent_writers_of_one_process_take_turns_outside_sqlite(
    engine: AsyncEngine,
) -> None:
    async def writer(n: int) -> None:
        async with engine.begin() as conn:
            await _write_twice(conn, n)

    async with asyncio.timeout(60), asyncio.TaskGroup() as tasks:
        for n in range(WRITERS):
            tasks.create_task(writer(n))
    assert await _count(engine) == 2 * WRITERS


async def test_control_writers_that_do_not_take_turns_collide(
    engine: AsyncEngine, sqlite_url: str
) -> None:
    """What the test above would see if its writers did not take turns: writers of a second
    engine (a second writer, like a second process) that start while a writer of the first
    is inside its transaction meet it inside SQLite and, with nobody waiting in a busy
    handler, fail. (The first writer stays in its transaction until they have all tried: a
    write transaction that does not wait for anything else is over within a turn of the
    event loop, so without that the two engines' turns might never overlap.)"""
    other = create_sqlite_engine(sqlite_url, busy_timeout_seconds=0)

    async def writer(n: int) -> None:
        async with other.begin() as conn:
            await _write_twice(conn, n)

    try:
        async with asyncio.timeout(60), engine.begin() as holding:
            await _write_twice(holding, 0)
            outcomes = await asyncio.gather(
                *(writer(n) for n in range(1, WRITERS)), return_exceptions=True
            )
    finally:
        await other.dispose()
    locked = [o for o in outcomes if isinstance(o, OperationalError)]
    assert locked, "writers that do not take turns should have met inside SQLite"
    assert all("database is locked" in str(error) for error in locked)


async def test_a_reader_is_not_blocked_by_an_open_write_transaction(engine: AsyncEngine) -> None:
    async with asyncio.timeout(30), engine.begin() as writing:
        await writing.execute(sa.insert(_SCRATCH).values(writer=1, step=1))
        # The writer holds the gate and SQLite's write lock, uncommitted. A reader runs now,
        # sees the last committed state, and a second writer is still waiting for its turn.
        second_writer = asyncio.create_task(_insert(engine, writer=2))
        started = time.monotonic()
        async with asyncio.timeout(5):
            assert await _count(engine) == 0
        assert time.monotonic() - started < 1
        assert not second_writer.done()
    async with asyncio.timeout(30):
        await second_writer
    assert await _count(engine) == 2


async def _insert(engine: AsyncEngine, *, writer: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.insert(_SCRATCH).values(writer=writer, step=1))


async def test_a_writer_waiting_past_its_deadline_gets_a_clear_error(sqlite_url: str) -> None:
    engine = create_sqlite_engine(sqlite_url, busy_timeout_seconds=0, wait_timeout_seconds=0.2)
    try:
        async with asyncio.timeout(30):
            async with engine.begin() as holding:
                await holding.execute(sa.text("SELECT 1"))
                started = time.monotonic()
                with pytest.raises(DatabaseBusyError) as raised:
                    await asyncio.create_task(_insert_anything(engine))
                assert 0.15 < time.monotonic() - started < 5
            # The slot is free again once the holder is done.
            await _insert_anything(engine)
    finally:
        await engine.dispose()
    error = raised.value
    assert error.code == "database_busy"
    assert (error.kind, error.timeout_seconds) == ("write", 0.2)
    assert error.location in sqlite_url
    assert "no write connection came free within 0.2 s" in error.message
    # A 503 for the API, and a run that meets it goes back to the queue (store/failures.py).
    assert is_database_unavailable(error)


async def _insert_anything(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE IF NOT EXISTS anything (n INTEGER)"))


async def test_a_task_asking_for_a_second_writer_is_refused_at_once(engine: AsyncEngine) -> None:
    async with asyncio.timeout(5), engine.begin():
        with pytest.raises(RuntimeError, match="already holds the SQLite write connection"):
            async with engine.connect():
                pass
        # Reading inside a write is what read_transaction is for.
        assert await _count(engine) == 0


async def test_writers_of_two_processes_wait_for_each_other_in_sqlite(sqlite_url: str) -> None:
    """Two engines stand for two processes (`threadline serve` and `threadline worker` on one
    file): each has its own gate, so between them SQLite's busy timeout still decides."""
    first, second = create_sqlite_engine(sqlite_url), create_sqlite_engine(sqlite_url)
    try:
        async with first.begin() as conn:
            await conn.execute(sa.text("CREATE TABLE scratch (writer INTEGER, step INTEGER)"))

        async def writer(engine: AsyncEngine, n: int) -> None:
            async with engine.begin() as conn:
                await _write_twice(conn, n)

        async with asyncio.timeout(60), asyncio.TaskGroup() as tasks:
            for n in range(20):
                tasks.create_task(writer(first if n % 2 else second, n))
        assert await _count(first) == 40
    finally:
        await first.dispose()
        await second.dispose()


class LoopTurns:
    """Counts turns of the event loop: a task that does nothing but yield."""

    def __init__(self) -> None:
        self.count = 0
        self._waiting: list[tuple[int, asyncio.Event]] = []

    async def run(self) -> None:
        while True:
            self.count += 1
            for target, reached in self._waiting:
                if self.count >= target:
                    reached.set()
            await asyncio.sleep(0)

    async def wait(self, turns: int) -> None:
        """Return after `turns` more turns of the loop."""
        reached = asyncio.Event()
        self._waiting.append((self.count + turns, reached))
        await reached.wait()


@pytest.fixture
async def loop_turns() -> AsyncIterator[LoopTurns]:
    turns = LoopTurns()
    async with asyncio.TaskGroup() as tasks:
        ticking = tasks.create_task(turns.run())
        await asyncio.sleep(0)  # started
        yield turns
        ticking.cancel()


async def test_a_write_transaction_holds_the_writer_for_no_turn_of_the_event_loop(
    engine: AsyncEngine, loop_turns: LoopTurns
) -> None:
    """The writer's statements run inline (store/_sqlite_driver.py): from taking the gate to
    handing it on, a transaction that awaits nothing else lets no other task run, so no other
    writer of the process ever waits for it."""
    async with asyncio.timeout(30):
        before = loop_turns.count
        async with engine.begin() as conn:
            await conn.execute(sa.insert(_SCRATCH).values(writer=1, step=1))
            await conn.execute(sa.update(_SCRATCH).values(step=2))
            rows = (await conn.execute(sa.select(_SCRATCH.c.step))).all()
        assert loop_turns.count == before
        assert rows == [(2,)]
        await asyncio.sleep(0)
        assert loop_turns.count > before  # the counter does count


async def test_a_failing_statement_rolls_back_only_its_own_transaction(
    engine: AsyncEngine,
) -> None:
    """Inline statements keep each transaction atomic and its errors its own: every third
    writer fails after its first insert, in the middle of the others."""

    async def writer(n: int) -> None:
        async with engine.begin() as conn:
            await conn.execute(sa.insert(_SCRATCH).values(writer=n, step=1))
            await asyncio.sleep(0)
            if n % 3 == 0:
                await conn.execute(sa.text("INSERT INTO missing_table VALUES (1)"))
            await conn.execute(sa.insert(_SCRATCH).values(writer=n, step=2))

    async with asyncio.timeout(60):
        outcomes = await asyncio.gather(
            *(writer(n) for n in range(WRITERS)), return_exceptions=True
        )
        failed = {n for n, outcome in enumerate(outcomes) if outcome is not None}
        assert failed == {n for n in range(WRITERS) if n % 3 == 0}
        assert all(
            isinstance(outcome, OperationalError) and "no such table" in str(outcome)
            for outcome in outcomes
            if outcome is not None
        )
        async with read_transaction(engine) as conn:
            stored = (await conn.execute(sa.select(_SCRATCH.c.writer, _SCRATCH.c.step))).all()
    expected = {(n, step) for n in range(WRITERS) if n not in failed for step in (1, 2)}
    assert sorted(stored) == sorted(expected)


async def test_a_writer_cancelled_inside_its_transaction_rolls_back_and_hands_on_the_writer(
    engine: AsyncEngine,
) -> None:
    inside = asyncio.Event()

    async def stuck_writer() -> None:
        async with engine.begin() as conn:
            await conn.execute(sa.insert(_SCRATCH).values(writer=1, step=1))
            inside.set()
            await asyncio.Event().wait()  # until cancelled

    async with asyncio.timeout(30):
        stuck = asyncio.create_task(stuck_writer())
        await inside.wait()
        second = asyncio.create_task(_insert(engine, writer=2))
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        await second
        async with read_transaction(engine) as conn:
            writers = (await conn.execute(sa.select(_SCRATCH.c.writer))).scalars().all()
    assert writers == [2]


async def test_a_writer_waits_for_another_process_s_writer_off_the_event_loop(
    sqlite_url: str, loop_turns: LoopTurns
) -> None:
    """The inline BEGIN never waits (the writer's busy timeout is 0 on the loop); when another
    process holds SQLite's write lock, it begins again on the connection's thread and waits
    there, in SQLite's busy handler, while the event loop goes on (here: the holder commits)."""
    first = create_sqlite_engine(sqlite_url)
    # Longer than the test's deadline: a BEGIN that waited on the event loop would stop the
    # loop for all of it, and the test would fail on its deadline once the loop ran again.
    second = create_sqlite_engine(sqlite_url, busy_timeout_seconds=60)
    try:
        async with asyncio.timeout(30):
            async with first.begin() as conn:
                await conn.execute(sa.text("CREATE TABLE scratch (writer INTEGER, step INTEGER)"))
            assert await _count(second) == 0  # the second's connections are open: its next
            await _insert(second, writer=0)  # BEGIN is the first thing it does
            async with first.begin() as holding:
                await holding.execute(sa.insert(_SCRATCH).values(writer=1, step=1))
                waiting = asyncio.create_task(_insert(second, writer=2))
                await loop_turns.wait(100)  # the loop turns while `waiting` waits
                assert not waiting.done()
            await waiting
            assert await _count(second) == 3
    finally:
        await first.dispose()
        await second.dispose()


async def test_checkpoints_run_as_the_writer_is_handed_on_not_in_its_commits(
    sqlite_url: str,
) -> None:
    """The writer's commits never checkpoint (that would be I/O on the event loop); the
    checkpointer does, on a thread, every EVERY_COMMITS commits, so the WAL stays bounded."""
    engine = create_sqlite_engine(sqlite_url)
    wal = Path(sqlite_url.removeprefix("sqlite+aiosqlite:///") + "-wal")
    try:
        async with asyncio.timeout(120):
            async with engine.begin() as conn:
                await conn.execute(sa.text("CREATE TABLE blobs (data TEXT)"))
                assert await conn.scalar(sa.text("PRAGMA wal_autocheckpoint")) == 0

            async def commits(count: int) -> None:
                for _ in range(count):
                    async with engine.begin() as conn:
                        await conn.execute(
                            sa.text("INSERT INTO blobs VALUES (:d)"), {"d": "x" * 3000}
                        )

            await commits(EVERY_COMMITS - 2)  # one commit above made the table
            assert engine.checkpointer.checkpoints == 0
            one_interval = _size(wal)
            await commits(4 * EVERY_COMMITS)
            assert engine.checkpointer.checkpoints == 4
            # Without checkpoints the WAL would hold all five intervals' pages.
            assert _size(wal) < 2 * one_interval
    finally:
        await engine.dispose()


_INSERT_BLOB = sa.text("INSERT INTO blobs VALUES (:data)")


def _size(path: Path) -> int:
    return path.stat().st_size


@pytest.mark.parametrize("backend", ["sqlite"])  # the write gate is SQLite's
async def test_fifty_concurrent_runs_on_sqlite_never_wait_in_sqlite(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole server on SQLite, 50 users posting a message with a run at the same moment:
    every post is accepted and every run completes with SQLite's busy timeout at 0."""
    monkeypatch.setattr(
        db, "create_sqlite_engine", functools.partial(create_sqlite_engine, busy_timeout_seconds=0)
    )
    settings = run_settings(settings_factory)
    async with running_app(settings) as h:
        users = [await h.user() for _ in range(WRITERS)]
        threads = [await h.thread(user) for user in users]
        async with asyncio.timeout(120):
            posted = await asyncio.gather(
                *(
                    h.post(user, thread, "what is 12*7?", agent="demo")
                    for user, thread in zip(users, threads, strict=True)
                )
            )
            assert [response.status_code for response in posted] == [201] * WRITERS
            finished = await asyncio.gather(
                *(
                    h.wait_run(
                        user, thread, response.json()["run"]["id"], statuses=TERMINAL, seconds=90
                    )
                    for user, thread, response in zip(users, threads, posted, strict=True)
                )
            )
    assert [run["status"] for run in finished] == ["completed"] * WRITERS
