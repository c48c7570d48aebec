"""Guarantee (c): fairness between users (C5, C7), on both backends. A user with a long queue
must not hold back another user's run: once Bob queues a run behind Alice's hundred, it is
claimed after at most one more of Alice's (or as many as run at once), not after all of them.

The claim order is observed at the queue itself (`RunQueue.claim_next`, what every worker calls)
and end to end through a worker that runs one run at a time.
"""

from __future__ import annotations

import pytest

from tests.conftest import TestUser
from tests.integration.test_runs_support import Harness, run_settings, running_app, wait_until
from threadline.store.runs import RunStatus

pytestmark = pytest.mark.integration

BACKLOG = 100


async def _queue_backlog(h: Harness, user: TestUser, count: int) -> None:
    """`count` queued runs on `count` threads of one user, written through the stores at once
    (the API would take a request per thread and per run for the same rows)."""
    services = h.services
    ctx = h.ctx(user)
    async with services.engine.begin() as conn:
        for i in range(count):
            thread = await services.threads.create(conn, ctx, title=f"backlog {i}")
            await services.runs.create(
                conn, ctx, thread.id, agent="demo", input={"message_id": None}, max_attempts=3
            )


@pytest.mark.parametrize(
    ("finish_each", "per_user_limit"),
    [
        pytest.param(True, 1, id="one-run-at-a-time"),
        pytest.param(False, 4, id="several-at-once"),
    ],
)
async def test_a_short_queue_is_not_starved_by_a_long_one(
    settings_factory, finish_each: bool, per_user_limit: int
) -> None:
    async with running_app(run_settings(settings_factory, embedded_worker=False)) as h:
        alice, bob = await h.user(), await h.user()
        await _queue_backlog(h, alice, BACKLOG)
        bob_thread = await h.thread(bob)
        bobs = await h.start(bob, bob_thread, "what is 1+1?", agent="demo")

        claimed: list[str] = []
        queue = h.services.queue
        for _ in range(BACKLOG + 1):
            async with h.services.engine.begin() as conn:
                run = await queue.claim_next(
                    conn, worker_id="fairness-test", lease_seconds=60, per_user_limit=per_user_limit
                )
                assert run is not None, claimed
                claimed.append(run.id)
                if finish_each:
                    assert await queue.finish(conn, run, status=RunStatus.COMPLETED)
            if run.id == bobs["id"]:
                break
        alices_before_bob = claimed.index(bobs["id"]) if bobs["id"] in claimed else len(claimed)
        # Bob's run waits for at most one claim of Alice's: the one that may already be going.
        assert alices_before_bob <= 1, (
            f"Bob's run was claimed after {alices_before_bob} of Alice's {BACKLOG} runs"
        )


async def test_a_busy_worker_serves_users_in_turn(settings_factory) -> None:
    settings = run_settings(settings_factory, worker_concurrency=1)
    async with running_app(settings) as h:
        alice, bob = await h.user(), await h.user()
        alice_threads = [await h.thread(alice) for _ in range(6)]
        alices = [
            await h.start(alice, thread, f"what is {i}+1?", agent="blocker")
            for i, thread in enumerate(alice_threads)
        ]
        await h.wait_tool_started(alices[0]["id"])
        bob_thread = await h.thread(bob)
        bobs = await h.start(bob, bob_thread, "what is 2+2?", agent="blocker")

        h.controls.gate.set()
        for thread, run in [*zip(alice_threads, alices, strict=True), (bob_thread, bobs)]:
            user = bob if run is bobs else alice
            assert (await h.wait_run(user, thread, run["id"]))["status"] == "completed"
        await wait_until(lambda: len(h.controls.started) == 7, what="every run's tool call")
        order = h.controls.started
        assert h.controls.max_active == 1  # the worker really ran one at a time
        # Alice's first run was already running; Bob's comes right after it.
        assert order.index(bobs["id"]) == 1, order
