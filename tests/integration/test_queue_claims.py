"""The per-user concurrency limit holds exactly across any number of claimers (issue 7 item 3).

Each claimer here is what a worker process does: its own connection and transaction calling
`RunQueue.claim_next`. On PostgreSQL the claims really run at once (`SKIP LOCKED`), which is
where a limit checked from a snapshot could be exceeded by one; SQLite serializes writers, so
these races cannot happen there by construction, and these tests run on PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from tests.conftest import TestUser
from tests.integration.test_runs_support import Harness, run_settings, running_app, wait_until
from threadline.store.runs import Run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("backend", ["postgres"], indirect=True),
]


@pytest.fixture
async def h(settings_factory) -> AsyncIterator[Harness]:
    async with running_app(run_settings(settings_factory, embedded_worker=False)) as h:
        yield h


async def _queue(h: Harness, user: TestUser, count: int) -> list[str]:
    ids = []
    for i in range(count):
        thread = await h.thread(user)
        ids.append((await h.start(user, thread, f"what is {i}+1?", agent="echo"))["id"])
    return ids


async def _running_by_user(h: Harness) -> Counter[str]:
    async with h.services.engine.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT user_id, count(*) FROM runs WHERE status = 'running' GROUP BY user_id")
        )
        return Counter({str(user): int(n) for user, n in rows})


async def _claim(h: Harness, worker_id: str, limit: int) -> Run | None:
    async with h.services.engine.begin() as conn:
        return await h.services.queue.claim_next(
            conn, worker_id=worker_id, lease_seconds=60, per_user_limit=limit
        )


async def test_a_claim_waits_for_a_concurrent_claim_of_the_same_user(h: Harness) -> None:
    alice = await h.user()
    await _queue(h, alice, 2)
    queue, engine = h.services.queue, h.services.engine

    async with engine.connect() as first:
        transaction = await first.begin()
        claimed = await queue.claim_next(
            first, worker_id="worker-a", lease_seconds=60, per_user_limit=1
        )
        assert claimed is not None
        # The second claimer starts while the first has claimed and not committed yet.
        second = asyncio.create_task(_claim(h, "worker-b", 1))

        async def second_is_waiting_or_done() -> bool:
            if second.done():
                return True
            async with engine.connect() as conn:
                waiting = await conn.scalar(
                    sa.text(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted AND database = "
                        "(SELECT oid FROM pg_database WHERE datname = current_database())"
                    )
                )
            return bool(waiting)

        await wait_until(second_is_waiting_or_done, what="the second claim to wait or finish")
        await transaction.commit()
    assert await asyncio.wait_for(second, timeout=30) is None
    assert await _running_by_user(h) == Counter({alice.id: 1})


async def test_many_claimers_at_once_fill_each_user_exactly_to_the_limit(h: Harness) -> None:
    alice, bob = await h.user(), await h.user()
    await _queue(h, alice, 10)
    await _queue(h, bob, 4)
    limit = 3

    async def claimer(name: str) -> list[str]:
        taken = []
        while (run := await _claim(h, name, limit)) is not None:
            taken.append(run.id)
        return taken

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(claimer(f"worker-{i}") for i in range(4)))
    claimed = [run_id for taken in results for run_id in taken]
    assert len(claimed) == len(set(claimed)) == 2 * limit  # no run claimed twice
    assert await _running_by_user(h) == Counter({alice.id: limit, bob.id: limit})


async def test_a_claim_reads_the_same_few_rows_however_many_runs_its_user_has_had(
    h: Harness,
) -> None:
    """The fair claim asks when each waiting user was last served and how many runs they have
    running; that must cost index probes, not a pass over every run they ever started (which
    made each claim slower as users' histories grew). Counted, not timed: the rows of `runs`
    this transaction read, by scans and through indexes (`pg_stat_xact_user_tables`), with
    3,000 past runs."""
    alice = await h.user()
    thread = await h.thread(alice)
    async with h.services.engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO runs (id, thread_id, user_id, agent, status, input, attempt,"
                " max_attempts, cancel_requested, created_at, started_at, finished_at)"
                " SELECT 'run_past_' || n, :thread, :user, 'echo', 'completed', '{}', 1, 1,"
                " false, now() - n * interval '1 second', now() - n * interval '1 second',"
                " now() - n * interval '1 second' FROM generate_series(1, 3000) AS n"
            ),
            {"thread": thread, "user": alice.id},
        )
        # As autovacuum would after so many new rows. Without it, statistics an autoanalyze
        # took earlier (of a table with a few runs, most of them queued) can make a scan of
        # every run look cheapest to the planner: seen once in a full run, 3,011 rows read.
        await conn.execute(sa.text("ANALYZE runs"))
    waiting = (await _queue(h, alice, 1))[0]
    async with h.services.engine.begin() as conn:
        claimed = await h.services.queue.claim_next(
            conn, worker_id="w-history", lease_seconds=60, per_user_limit=4
        )
        read = (
            await conn.execute(
                sa.text(
                    "SELECT seq_tup_read + idx_tup_fetch FROM pg_stat_xact_user_tables"
                    " WHERE relname = 'runs'"
                )
            )
        ).scalar_one()
    assert claimed is not None and claimed.id == waiting
    assert read < 100, f"the claim read {read} rows of runs"
