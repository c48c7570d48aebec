"""What one request costs the database, counted (not timed): the hot paths stay at one
transaction each and a bounded number of statements, on both backends. A change that adds a
transaction (or a statement) to them fails here; raise a bound only on purpose.

Counted with the engine's own events (`tests/integration/_support.recorded_transactions`):
every transaction begun, also when it then rolls back, and every statement sent in it. The
embedded worker is off, so only the request's own work is seen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import TestUser, register_user
from tests.integration._support import recorded_transactions
from threadline.api.app import create_app
from threadline.runtime import Runtime
from threadline.settings import Settings
from threadline.store.queue import RunQueue

pytestmark = pytest.mark.integration


@dataclass
class Counted:
    seen: list[list[str]]
    """Each transaction's statements (`recorded_transactions`)."""

    @property
    def transactions(self) -> int:
        return len(self.seen)

    @property
    def statements(self) -> list[str]:
        return [statement[:100] for transaction in self.seen for statement in transaction]


@contextmanager
def counting(engine: AsyncEngine) -> Iterator[Counted]:
    with recorded_transactions(engine) as seen:
        yield Counted(seen)


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
    return f"{what}: {counted.transactions} tx, {len(counted.statements)} statements\n  {lines}"


def _check(what: str, counted: Counted, *, statements: int) -> None:
    assert counted.transactions == 1, _report(what, counted)
    assert len(counted.statements) <= statements, _report(what, counted)


# Without Redis (SQLite, the embedded default) the revocation list is a table: one statement
# more per signed-in request, in the same transaction.
def _revocation(backend: str) -> int:
    return 1 if backend == "sqlite" else 0


async def test_posting_a_message_with_a_run_is_one_transaction(settings_factory, backend) -> None:
    """The account check, the plan's quotas, the message, the run, and both events
    (`message_created`, `run_queued`): one transaction. Statements: account and plan (1),
    the thread's row, giving the message its position and both events their numbers (1),
    message (1), active runs (1), run with its NOTIFY (1), and both events' insert (1): they
    are one batch, published together."""
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
        assert posted.json()["run"]["status"] == "queued"
        _check("POST /messages with a run", counted, statements=6 + _revocation(backend))


async def test_creating_and_listing_threads_is_one_transaction_each(
    settings_factory, backend
) -> None:
    async with quiet_app(settings_factory(embedded_worker=False)) as app:
        user = await register_user(app.client)
        await app.client.get("/v1/threads", headers=user.headers)  # warm the pool
        with counting(app.runtime.engine) as created:
            await _thread(app.client, user)
        with counting(app.runtime.engine) as listed:
            assert (await app.client.get("/v1/threads", headers=user.headers)).status_code == 200
        _check("POST /threads", created, statements=4 + _revocation(backend))
        _check("GET /threads", listed, statements=2 + _revocation(backend))


async def test_a_claim_takes_at_most_three_statements(settings_factory, backend) -> None:
    """PostgreSQL: candidate, the user's claim lock, the take (which counts the user's running
    runs itself); SQLite, whose writers are serialized: candidate and take."""
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
        _check("claim", counted, statements=3 if backend == "postgres" else 2)
