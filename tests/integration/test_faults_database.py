"""Fault: PostgreSQL backends terminated (`pg_terminate_backend`) while requests and runs are
in flight (issue 7 item 6). Requests fail with a clear 503 `database_unavailable` or succeed,
never a 500; runs whose executor hit the dropped connection are retried, not failed; the pool
recovers by itself; nothing is half-written.

Only backends connected to this test's own database are terminated (never another session's),
and never the terminating connection itself.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError

from tests.conftest import TestUser
from tests.integration.test_runs_support import (
    TERMINAL_EVENTS,
    Harness,
    run_settings,
    running_app,
    wait_until,
)
from threadline.store.wakeup import asyncpg_dsn

pytestmark = pytest.mark.integration

# A long question: the demo model streams its echo in many chunks, each one a database write,
# so runs are busy with the database while backends are being terminated.
_LONG = " ".join(f"word{i}" for i in range(60))
_BUSY_BACKENDS = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle'
"""


async def _terminate_busy_backends(dsn: str, stop: asyncio.Event, *, limit: int) -> int:
    """Kill every busy backend of this database, over and over, until `stop` or `limit`."""
    killer = await asyncpg.connect(dsn, timeout=10)
    killed = 0
    try:
        while not stop.is_set() and killed < limit:
            killed += len(await killer.fetch(_BUSY_BACKENDS, timeout=10))
            await asyncio.sleep(0.01)  # a tight loop, not a wait for anything
    finally:
        await killer.close()
    return killed


async def _converse(h: Harness, user: TestUser, rounds: int) -> list[tuple[str, int, Any]]:
    """A client's requests: threads, messages with runs, reads. (what, status, body)."""
    seen: list[tuple[str, int, Any]] = []
    for i in range(rounds):
        created = await h.client.post("/v1/threads", json={"title": "t"}, headers=user.headers)
        seen.append(("thread", created.status_code, created.json()))
        if created.status_code != 201:
            continue
        thread = created.json()["id"]
        posted = await h.post(user, thread, f"what is {i}*3?", agent="demo")
        seen.append(("post", posted.status_code, posted.json()))
        listed = await h.client.get(f"/v1/threads/{thread}/messages", headers=user.headers)
        seen.append(("list", listed.status_code, listed.json()))
    return seen


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_terminated_backends_are_503s_and_runs_are_retried(settings_factory) -> None:
    settings = run_settings(
        settings_factory, demo_delay_seconds=0.01, run_lease_seconds=2, database_pool_size=4
    )
    async with running_app(settings) as h:
        users = [await h.user() for _ in range(4)]
        stop = asyncio.Event()
        dsn = asyncpg_dsn(settings.database_url)
        killer = asyncio.create_task(_terminate_busy_backends(dsn, stop, limit=25))
        try:
            async with asyncio.timeout(120):
                results = await asyncio.gather(*(_converse(h, u, 8) for u in users))
        finally:
            stop.set()
            killed = await killer
        assert killed > 0

        seen = [item for result in results for item in result]
        statuses = Counter(status for _, status, _ in seen)
        assert set(statuses) <= {200, 201, 503}, statuses
        for what, status, body in seen:
            if status == 503:
                assert body["error"]["code"] == "database_unavailable", (what, body)

        # The pool recovers by itself: the next requests simply work.
        fresh = await h.client.get("/v1/threads", headers=users[0].headers)
        assert fresh.status_code == 200, fresh.text
        await _check_written_and_retried(h, users, seen)
        await _runs_survive_terminated_backends(h, users[0], dsn)


async def _check_written_and_retried(
    h: Harness, users: list[TestUser], seen: list[tuple[str, int, Any]]
) -> None:
    """Every acknowledged write is there, every run it queued ends completed (retried if its
    executor lost the connection, never failed), and no message exists without its run."""
    posted = [body for what, status, body in seen if what == "post" and status == 201]
    assert posted, "no message was posted at all"
    by_thread: dict[str, TestUser] = {}
    for user in users:
        listed = await h.client.get("/v1/threads", params={"limit": 100}, headers=user.headers)
        assert listed.status_code == 200
        by_thread.update({t["id"]: user for t in listed.json()["data"]})
    for body in posted:
        run = body["run"]
        done = await h.wait_run(
            by_thread[run["thread_id"]], run["thread_id"], run["id"], seconds=90
        )
        assert done["status"] == "completed", done
    for thread_id, user in by_thread.items():
        messages = await h.messages(user, thread_id)
        runs = await h.list_runs(user, thread_id)
        questions = [m for m in messages if m["role"] == "user"]
        assert len(questions) == len(runs), (messages, runs)  # message and run: both or neither


async def _runs_survive_terminated_backends(h: Harness, user: TestUser, dsn: str) -> None:
    """Runs busy writing their output while their backends are terminated: each executor
    that hits a dropped connection hands its run back, and every run still completes."""
    started = []
    for _ in range(4):
        thread = await h.thread(user)
        started.append((thread, (await h.start(user, thread, _LONG, agent="demo"))["id"]))
    stop = asyncio.Event()
    killer = asyncio.create_task(_terminate_busy_backends(dsn, stop, limit=15))

    async def all_ended() -> bool:
        for thread, run_id in started:
            response = await h.client.get(
                f"/v1/threads/{thread}/runs/{run_id}", headers=user.headers
            )
            if response.status_code == 503:  # a reader's backend was terminated too
                return False
            if response.json()["status"] in ("queued", "running"):
                return False
        return True

    try:
        await wait_until(all_ended, seconds=90, what="every run to end")
    finally:
        stop.set()
        await killer
    done = [await h.get_run(user, t, r) for t, r in started]
    assert [run["status"] for run in done] == ["completed"] * len(started), done


async def test_a_run_whose_end_hit_a_lost_connection_is_retried_with_one_answer(
    settings_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer is stored, then the connection drops as the run is being ended: the run is
    handed back and retried, and the retry ends it with the stored answer (one answer, not
    two), its events saying that attempt 2 did it."""
    async with running_app(run_settings(settings_factory)) as h:
        queue = h.services.queue
        real_finish = queue.finish
        failures: list[str] = []

        async def finish_losing_the_connection_once(conn: Any, run: Any, **kwargs: Any) -> bool:
            if not failures:
                failures.append(run.id)
                orig = ConnectionResetError("connection reset by peer")
                raise DBAPIError("UPDATE runs ...", None, orig, connection_invalidated=True)
            return await real_finish(conn, run, **kwargs)

        monkeypatch.setattr(queue, "finish", finish_losing_the_connection_once)
        user = await h.user()
        thread = await h.thread(user)
        run = await h.start(user, thread, "what is 12*7?", agent="counter")
        done = await h.wait_run(user, thread, run["id"])

        assert failures == [run["id"]]
        assert done["status"] == "completed" and done["attempt"] == 2, done
        assert done["result"]["text"] == "12*7 = 84 (invocation 1)."
        assert h.controls.invocations[run["id"]] == 1  # the tool was not run again
        messages = await h.messages(user, thread)
        answers = [m["content"] for m in messages if m["role"] == "assistant" and m["content"]]
        assert answers == ["12*7 = 84 (invocation 1)."]
        events = await h.run_events(user, thread, run["id"])
        assert [e.data["attempt"] for e in events if e.type.value == "agent_started"] == [1, 2]
        assert [e.type.value for e in events if e.type.value in TERMINAL_EVENTS] == [
            "agent_completed"
        ]
