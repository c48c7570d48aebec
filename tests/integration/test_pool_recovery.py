"""The connection pool pings nothing at checkout, yet recovers when its idle connections are
killed (`pg_terminate_backend`): at most one request answers 503 `database_unavailable`, never a
500, and the requests after it work (issue 11 item 2).

Only this test's database's pooled connections (`application_name` = `threadline`) are
terminated, never another session's backends, nor the terminating connection itself.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import event

from tests.conftest import TestUser
from tests.integration.test_runs_support import Harness, run_settings, running_app, wait_until
from threadline.store import db
from threadline.store.wakeup import asyncpg_dsn

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("backend", ["postgres"], indirect=True),
]

_POOLED = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = $1
"""


async def _terminate_pooled(dsn: str) -> int:
    """Terminate this database's pooled connections; returns once they are all gone."""
    killer = await asyncpg.connect(dsn, timeout=10)
    try:
        pids = [row["pid"] for row in await killer.fetch(_POOLED, db.APPLICATION_NAME)]
        for pid in pids:
            await killer.execute("SELECT pg_terminate_backend($1)", pid)

        async def gone() -> bool:
            alive = {row["pid"] for row in await killer.fetch(_POOLED, db.APPLICATION_NAME)}
            return not alive & set(pids)

        await wait_until(gone, seconds=30, what="the terminated backends to exit")
    finally:
        await killer.close()
    return len(pids)


async def _fill_pool(h: Harness, user: TestUser) -> None:
    """Several requests at once, so that the pool holds several idle connections."""
    answers = await asyncio.gather(
        *(h.client.get("/v1/threads", headers=user.headers) for _ in range(8))
    )
    assert [a.status_code for a in answers] == [200] * 8


async def _requests_after_the_kill(h: Harness, user: TestUser) -> list[int]:
    """Reads and writes, one after another, each answer a 2xx or a clear 503."""
    statuses = []
    for i in range(4):
        listed = await h.client.get("/v1/threads", headers=user.headers)
        created = await h.client.post(
            "/v1/threads", json={"title": f"after {i}"}, headers=user.headers
        )
        for answer in (listed, created):
            if answer.status_code == 503:
                assert answer.json()["error"]["code"] == "database_unavailable", answer.text
            statuses.append(answer.status_code)
    return statuses


def _at_most_one_503_then_success(statuses: list[int]) -> None:
    assert 500 not in statuses, statuses
    assert statuses.count(503) <= 1, statuses
    first_ok = next(i for i, s in enumerate(statuses) if s < 300)
    assert all(s < 300 for s in statuses[first_ok:]), statuses


async def test_a_pool_of_terminated_connections_recovers_without_pre_ping(settings_factory):
    settings = run_settings(settings_factory, database_pool_size=4)
    async with running_app(settings) as h:
        engine = h.services.engine
        assert engine.sync_engine.pool._pre_ping is False
        user = await h.user()
        await _fill_pool(h, user)

        assert await _terminate_pooled(asyncpg_dsn(settings.database_url)) >= 2
        _at_most_one_503_then_success(await _requests_after_the_kill(h, user))
        thread = await h.thread(user)
        run = await h.start(user, thread, "what is 2*3?", agent="demo")
        assert (await h.wait_run(user, thread, run["id"]))["status"] == "completed"


async def test_a_dead_connection_the_driver_had_not_noticed_costs_at_most_one_503(
    settings_factory,
):
    """Without the free closed-socket check at checkout, the first statement on a dead
    connection fails: SQLAlchemy invalidates it and every older pooled connection, that
    request answers 503, and the next ones get fresh connections."""
    settings = run_settings(settings_factory, database_pool_size=4)
    async with running_app(settings) as h:
        engine = h.services.engine
        event.remove(engine.sync_engine, "checkout", db._discard_closed)
        user = await h.user()
        await _fill_pool(h, user)

        assert await _terminate_pooled(asyncpg_dsn(settings.database_url)) >= 2
        _at_most_one_503_then_success(await _requests_after_the_kill(h, user))


async def test_an_exhausted_pool_answers_503_within_the_pool_timeout(settings_factory):
    """Every pooled connection held elsewhere: a request waits THREADLINE_DATABASE_POOL_TIMEOUT_
    SECONDS, not SQLAlchemy's 30 s (as long as many clients wait for a whole answer), then gets
    a clear 503 it may retry; once a connection is free again, requests work."""
    settings = run_settings(
        settings_factory, database_pool_size=1, database_pool_timeout_seconds=0.5
    )
    async with running_app(settings) as h:
        user = await h.user()
        engine = h.services.engine
        async with engine.connect(), engine.connect():  # pool of 1, overflow of 1: all taken
            answer = await asyncio.wait_for(
                h.client.get("/v1/threads", headers=user.headers), timeout=10
            )
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "database_unavailable"
        assert (await h.client.get("/v1/threads", headers=user.headers)).status_code == 200
