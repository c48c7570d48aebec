"""Which workers a queued run wakes (PostgreSQL): the NOTIFY on a run's insert is sent only
when the posting process's own worker cannot take the run at once (its slots are full, or it
has none). A worker with room is told in-process and claims; waking every other process as
well would make them race for it, and each listening backend pays a transaction to read a
NOTIFY. A run queued while the local worker is full is still announced to the others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from tests.integration.test_runs_support import Harness, run_settings, running_app, wait_until
from threadline.store.runs import RUN_QUEUED_CHANNEL
from threadline.store.wakeup import asyncpg_dsn

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("backend", ["postgres"], indirect=True),
]


@asynccontextmanager
async def listening(h: Harness) -> AsyncIterator[list[str]]:
    """The run ids NOTIFY announces on the workers' channel, as another process hears them."""
    heard: list[str] = []
    listener = await asyncpg.connect(asyncpg_dsn(h.services.settings.database_url), timeout=10)
    try:
        await listener.add_listener(RUN_QUEUED_CHANNEL, lambda *args: heard.append(args[3]))
        yield heard
        # A notification committed before this round trip has reached the listener by its end.
        await asyncio.wait_for(listener.fetchval("SELECT 1"), 10)
    finally:
        await listener.close(timeout=10)


async def test_a_run_the_local_worker_has_room_for_wakes_no_other_worker(settings_factory) -> None:
    async with running_app(run_settings(settings_factory)) as h:
        user = await h.user()
        thread = await h.thread(user)
        async with listening(h) as heard:
            run = await h.start(user, thread, "hello there", agent="demo")
            done = await h.wait_run(user, thread, run["id"])
        assert done["status"] == "completed"
        assert run["id"] not in heard


async def test_a_run_queued_while_the_local_worker_is_full_wakes_the_others(
    settings_factory,
) -> None:
    # No poll: a poll's claim holds the only slot for a moment, and a run posted then would
    # notify the others rightly, which is not the case under test for `holding`.
    settings = run_settings(settings_factory, worker_concurrency=1, worker_poll_seconds=600)
    async with running_app(settings) as h:
        user = await h.user()
        busy, waiting = await h.thread(user), await h.thread(user, "second")
        async with listening(h) as heard:
            holding = await h.start(user, busy, "what is 12*7?", agent="blocker")
            await h.wait_tool_started(holding["id"])  # the only slot is taken
            queued = await h.start(user, waiting, "hello there", agent="demo")
            await wait_until(lambda: queued["id"] in heard, what="the NOTIFY of the queued run")
            h.controls.gate.set()
            for thread, run in ((busy, holding), (waiting, queued)):
                done = await h.wait_run(user, thread, run["id"])
                assert done["status"] == "completed", done
        assert holding["id"] not in heard
