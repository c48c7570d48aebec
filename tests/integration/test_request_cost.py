"""What one request costs the database, counted (not timed): the hot paths stay at one
transaction each and a bounded number of statements, on both backends. A change that adds a
transaction (or a statement) to them fails here; raise a bound only on purpose.

Counted with the engine's own events on the app's engine: every transaction begun (`begin`,
also when it then rolls back) and every statement sent (`before_cursor_execute`; SQLite's
BEGIN is excluded, it is the transaction). The embedded worker is off, so only the request's
own work is seen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import TestUser, register_user
from threadline.api.app import create_app
from threadline.runtime import Runtime
from threadline.settings import Settings
from threadline.store.queue import RunQueue

pytestmark = pytest.mark.integration


@dataclass
class Counted:
    transactions: int = 0
    statements: list[str] = field(default_factory=list)


@contextmanager
def counting(engine: AsyncEngine) -> Iterator[Counted]:
    counted = Counted()

    def on_begin(_connection: Any) -> None:
        counted.transactions += 1

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.strip().upper() not in ("BEGIN", "BEGIN IMMEDIATE"):
            counted.statements.append(" ".join(statement.split())[:100])

    sync_engine = engine.sync_engine
    event.listen(sync_engine, "begin", on_begin)
    event.listen(sync_engine, "before_cursor_execute", on_statement)
    try:
        yield counted
    finally:
        event.remove(sync_engine, "begin", on_begin)
        event.remove(sync_engine, "before_cursor_execute", on_statement)


@dataclass
class App:
    client: httpx.AsyncClient
    runtime: Runtime


@asynccontextmanager
async def quiet_app(settings: Settings) -> AsyncIterator[App]:
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://threadline") as c:
            yield App(c, app.state.runtime)


async def _thread(client: httpx.AsyncClient, user: TestUser) -> str:
    created = await client.post("/v1/threads", json={}, headers=user.headers)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _report(what: str, counted: Counted) -> str:
    lines = "\n  ".join(counted.statements)
    return f"{what}: {counted.transactions} transactions, {len(counted.statements)} statements\n  {lines}"


async def test_posting_a_message_with_a_run_is_one_transaction(settings_factory) -> None:
    async with quiet_app(settings_factory(embedded_worker=False)) as app:
        user = await register_user(app.client)
        thread_id = await _thread(app.client, user)
        await app.client.get("/v1/threads", headers=user.headers)  # warm the pool
        with counting(app.runtime.engine) as counted:
            posted = await app.client.post(
                f"/v1/threads/{thread_id}/messages",
                json={"content": "hello", "run": {"agent": "demo"}},
                headers=user.headers,
            )
        assert posted.status_code == 201, posted.text
        print(_report("POST /messages with a run", counted))
        assert counted.transactions == 1, _report("POST /messages with a run", counted)
        assert len(counted.statements) <= 99, _report("POST /messages with a run", counted)


async def test_creating_and_listing_threads_is_one_transaction_each(settings_factory) -> None:
    async with quiet_app(settings_factory(embedded_worker=False)) as app:
        user = await register_user(app.client)
        await app.client.get("/v1/threads", headers=user.headers)  # warm the pool
        with counting(app.runtime.engine) as created:
            await _thread(app.client, user)
        with counting(app.runtime.engine) as listed:
            assert (await app.client.get("/v1/threads", headers=user.headers)).status_code == 200
        print(_report("POST /threads", created))
        print(_report("GET /threads", listed))
        assert created.transactions == 1, _report("POST /threads", created)
        assert listed.transactions == 1, _report("GET /threads", listed)


async def test_a_claim_is_one_round_trip_per_statement_bound(settings_factory) -> None:
    async with quiet_app(settings_factory(embedded_worker=False)) as app:
        user = await register_user(app.client)
        thread_id = await _thread(app.client, user)
        posted = await app.client.post(
            f"/v1/threads/{thread_id}/messages",
            json={"content": "hello", "run": {"agent": "demo"}},
            headers=user.headers,
        )
        assert posted.status_code == 201, posted.text
        queue = RunQueue()
        with counting(app.runtime.engine) as counted:
            async with app.runtime.engine.begin() as conn:
                claimed = await queue.claim_next(
                    conn, worker_id="w", lease_seconds=30, per_user_limit=4
                )
        assert claimed is not None and claimed.user_id == user.id
        print(_report("claim", counted))
        assert counted.transactions == 1, _report("claim", counted)
        assert len(counted.statements) <= 99, _report("claim", counted)
