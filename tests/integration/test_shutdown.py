"""Graceful shutdown: running runs finish within the grace period or go back to the queue."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from asgi_lifespan import LifespanManager

from tests.conftest import register_user
from threadline.api.app import create_app
from threadline.context import UserContext
from threadline.store.runs import RunStatus

pytestmark = pytest.mark.integration


async def _wait_for_status(client, user, thread_id, run_id, wanted):
    async with asyncio.timeout(30):
        while True:
            path = f"/v1/threads/{thread_id}/runs/{run_id}"
            run = (await client.get(path, headers=user.headers)).json()
            if run["status"] in wanted:
                return run
            await asyncio.sleep(0.02)


async def _start_slow_run(client, user):
    thread = (await client.post("/v1/threads", json={}, headers=user.headers)).json()
    posted = await client.post(
        f"/v1/threads/{thread['id']}/messages",
        json={"content": "what is 12*7?", "run": {"agent": "demo"}},
        headers=user.headers,
    )
    assert posted.status_code == 201, posted.text
    run_id = posted.json()["run"]["id"]
    await _wait_for_status(client, user, thread["id"], run_id, {"running"})
    return thread["id"], run_id


async def test_shutdown_hands_unfinished_runs_back_and_another_worker_finishes_them(
    settings_factory,
):
    # The demo model streams slowly, so the run is still going when the server stops.
    slow = settings_factory(demo_delay_seconds=0.5, shutdown_grace_seconds=0.05)
    app = create_app(slow)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            user = await register_user(client)
            thread_id, run_id = await _start_slow_run(client, user)
    # The first server is gone: the run is queued again, with no terminal event.
    fast = settings_factory()
    app = create_app(fast)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            services = app.state.runtime
            run = await _wait_for_status(
                client, user, thread_id, run_id, {"completed", "failed", "cancelled"}
            )
            assert run["status"] == RunStatus.COMPLETED
            assert run["result"]["text"] == "12*7 = 84."
            async with services.engine.connect() as conn:
                ctx = UserContext.create(user.id)
                stored = await services.events.after(conn, ctx, thread_id, after_seq=0)
            terminal = [
                e.type.value
                for e in stored.events
                if e.run_id == run_id
                and e.type.value in ("agent_completed", "agent_failed", "run_cancelled")
            ]
            assert terminal == ["agent_completed"]


async def test_shutdown_lets_a_run_finish_within_the_grace_period(settings_factory):
    app = create_app(settings_factory(demo_delay_seconds=0.05, shutdown_grace_seconds=30))
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            user = await register_user(client)
            thread_id, run_id = await _start_slow_run(client, user)
    # Shutdown waited for the run instead of interrupting it: a new server finds it completed.
    app = create_app(settings_factory(embedded_worker=False))
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            path = f"/v1/threads/{thread_id}/runs/{run_id}"
            run = (await client.get(path, headers=user.headers)).json()
    assert run["status"] == RunStatus.COMPLETED
