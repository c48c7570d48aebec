"""The execution engine (C5), on both backends: per-user engines, isolation between users'
concurrent runs, the per-user concurrency limit, and errors that stay inside their own run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest

from tests.integration.test_runs_support import Harness, run_settings, running_app, wait_until
from threadline.runs.engine import RunLimitError

pytestmark = pytest.mark.integration

LIMIT = 2


@pytest.fixture
async def h(settings_factory) -> AsyncIterator[Harness]:
    settings = run_settings(settings_factory, max_concurrent_runs_per_user=LIMIT)
    async with running_app(settings) as h:
        yield h


def _max_overlap(runs: list[dict[str, Any]]) -> int:
    """Most runs whose [started_at, finished_at] intervals overlap at one instant."""
    edges = []
    for run in runs:
        edges.append((datetime.fromisoformat(run["started_at"]), 1))
        edges.append((datetime.fromisoformat(run["finished_at"]), -1))
    current = peak = 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):  # ends before starts
        current += step
        peak = max(peak, current)
    return peak


async def test_concurrent_runs_of_different_users_stay_apart(h: Harness) -> None:
    users = [await h.user() for _ in range(6)]
    threads = [await h.thread(user) for user in users]

    async def converse(i: int) -> dict[str, Any]:
        run = await h.start(users[i], threads[i], f"what is {i}*7?", agent="counter")
        return await h.wait_run(users[i], threads[i], run["id"])

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(converse(i)) for i in range(len(users))]
    results = [task.result() for task in tasks]

    for i, (user, thread, run) in enumerate(zip(users, threads, results, strict=True)):
        assert run["status"] == "completed", run
        assert run["result"]["text"] == f"{i}*7 = {i * 7} (invocation 1)."
        messages = await h.messages(user, thread)
        assert {m["run_id"] for m in messages if m["role"] != "user"} == {run["id"]}
        assert {e.run_id for e in await h.events(user, thread)} <= {None, run["id"]}
        other = (i + 1) % len(users)
        foreign = await h.client.get(
            f"/v1/threads/{threads[other]}/runs/{results[other]['id']}", headers=user.headers
        )
        assert foreign.status_code == 404
    assert h.controls.invocations == {run["id"]: 1 for run in results}
    for user in users:
        assert h.services.execution.running_for(user.id) == 0


async def test_per_user_concurrency_limit(h: Harness) -> None:
    alice, bob = await h.user(), await h.user()
    threads = [await h.thread(alice) for _ in range(5)]
    runs = [
        await h.start(alice, thread, f"what is {i}+1?", agent="blocker")
        for i, thread in enumerate(threads)
    ]
    ids = [run["id"] for run in runs]

    await wait_until(lambda: len(h.controls.started) == LIMIT, what=f"{LIMIT} runs to start")
    # Another user is not held back by Alice's limit: Bob's run is claimed and completes while
    # Alice's other runs wait (so the worker has looked at the queue since her runs started).
    bob_thread = await h.thread(bob)
    bobs = await h.start(bob, bob_thread, "what is 12*7?", agent="demo")
    assert (await h.wait_run(bob, bob_thread, bobs["id"]))["status"] == "completed"

    statuses = [(await h.get_run(alice, t, i))["status"] for t, i in zip(threads, ids, strict=True)]
    assert sorted(statuses) == ["queued"] * 3 + ["running"] * LIMIT
    assert h.services.execution.running_for(alice.id) == LIMIT

    # The engine refuses a run beyond the limit even if a claim slipped past the queue's check.
    async with h.services.engine.begin() as conn:
        extra = await h.services.queue.claim_next(
            conn, worker_id="test-claimer", lease_seconds=30, per_user_limit=100
        )
    assert extra is not None and extra.user_id == alice.id
    with pytest.raises(RunLimitError):
        await h.services.execution.execute(extra)
    async with h.services.engine.begin() as conn:
        assert await h.services.queue.release(conn, extra)
    assert h.services.execution.running_for(alice.id) == LIMIT

    h.controls.gate.set()
    finished = [await h.wait_run(alice, t, i) for t, i in zip(threads, ids, strict=True)]
    assert [run["status"] for run in finished] == ["completed"] * 5
    assert h.controls.max_active_by_user[alice.id] == LIMIT
    # started_at is the first claim's time, and the test's own claim above came early.
    assert _max_overlap([run for run in finished if run["id"] != extra.id]) <= LIMIT
    assert sorted(h.controls.started) == sorted(ids)  # each ran once (no duplicate claim)


async def test_errors_fail_only_their_own_run(h: Harness) -> None:
    user = await h.user()
    threads = [await h.thread(user) for _ in range(4)]
    blocked = await h.start(user, threads[0], "what is 12*7?", agent="blocker")
    await h.wait_tool_started(blocked["id"])
    others = [
        await h.start(user, threads[1], "what is 1+1?", agent="broken"),
        await h.start(user, threads[2], "what is 2+2?", agent="crasher"),
        await h.start(user, threads[3], "what is 3+3?", agent="one-step"),
    ]
    outcomes = [
        await h.wait_run(user, thread, run["id"])
        for thread, run in zip(threads[1:], others, strict=True)
    ]
    assert [(r["status"], (r["error"] or {}).get("code")) for r in outcomes] == [
        ("failed", "agent_error"),
        ("completed", None),
        ("failed", "max_steps_exceeded"),
    ]
    assert (await h.get_run(user, threads[0], blocked["id"]))["status"] == "running"

    h.controls.gate.set()
    done = await h.wait_run(user, threads[0], blocked["id"])
    assert done["status"] == "completed" and done["result"]["text"] == "12*7 = 84."
    # And the engine goes on serving the user.
    again = await h.start(user, threads[1], "what is 5*5?", agent="demo")
    assert (await h.wait_run(user, threads[1], again["id"]))["result"]["text"] == "5*5 = 25."
