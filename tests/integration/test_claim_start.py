"""A run's claim and its start are one transaction, and a claim that saw nothing more is not
followed by an empty one (issue 11).

- The worker's claim transaction also starts the run (`ExecutionEngine.begin`): the candidate
  query, the take, the history read and the start's events commit together.
- After a claim whose candidate query showed no other claimable run, the worker claims again
  only when woken (a run queued, a poll, a run ending that may free a held-back one): a run
  queued while a claim is in progress still wakes the next claim.
- A start that fails rolls its claim back with it: for a lost database connection the run
  simply stays queued and is executed later (no attempt counted); for any other error the run
  ends failed, once, instead of being claimed again and again.

Counted with the engine's own events (`before_cursor_execute`, `begin`), per connection, so
each transaction's statements are known. The embedded worker polls once a minute here: a
claim within a test's deadline came from a wake-up, not from the poll.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from tests.integration._support import recorded_transactions
from tests.integration.test_runs_support import Harness, run_settings, running_app, wait_until
from threadline.store.queue import Claimed

pytestmark = pytest.mark.integration

_CANDIDATE = "WITH queued AS"


def _claims(seen: list[list[str]]) -> list[list[str]]:
    return [tx for tx in seen if any(s.startswith(_CANDIDATE) for s in tx)]


@pytest.fixture
async def h(settings_factory) -> AsyncIterator[Harness]:
    settings = run_settings(settings_factory, worker_poll_seconds=60, webhook_delivery=False)
    async with running_app(settings) as harness:
        yield harness


async def _run(h: Harness, user: Any, text: str = "hello", agent: str = "echo") -> dict[str, Any]:
    thread = await h.thread(user)
    run = await h.start(user, thread, text, agent=agent)
    return await h.wait_run(user, thread, run["id"])


async def test_a_claim_that_saw_nothing_more_is_not_followed_by_an_empty_one(h: Harness) -> None:
    user = await h.user()
    assert (await _run(h, user))["status"] == "completed"  # the worker's first claims are past
    with recorded_transactions(h.services.engine) as seen:
        for _ in range(2):
            assert (await _run(h, user, "what is 12*7?", agent="counter"))["status"] == (
                "completed"
            )
    claims = _claims(seen)
    # One claim per run: none right after a claim that saw no other run, none after a run
    # ended with nothing held back behind it.
    assert len(claims) == 2, claims
    for claim in claims:
        # ... and each one started its run: the history read and the start's events (its
        # agent_started and the first model call announced) in the claim's transaction.
        assert any(s.startswith("SELECT") and "FROM messages" in s for s in claim), claim
        assert any(s.startswith("INSERT INTO events") for s in claim), claim


async def _claim(h: Harness, *, limit: int = 4) -> Claimed:
    async with h.services.engine.begin() as conn:
        return await h.services.queue.claim(
            conn,
            worker_id="test-claimer",
            lease_seconds=30,
            per_user_limit=limit,
            look_ahead=True,
        )


async def test_a_claim_says_whether_another_run_stays_claimable(settings_factory) -> None:
    """`Claimed.more` (the worker claims again at once only then): another user's run, or the
    same user's with room left, stays claimable; the user's own next run at its limit does
    not, nor a run behind its thread's active one (`held_back` says those wait)."""
    async with running_app(run_settings(settings_factory, embedded_worker=False)) as h:
        alice, bob = await h.user(), await h.user()
        threads = [await h.thread(alice) for _ in range(2)]
        for thread in threads:
            await h.start(alice, thread, "hello", agent="echo")
        await h.start(alice, threads[0], "and then?", agent="echo")  # behind the first
        first = await _claim(h, limit=2)
        assert first.run is not None and first.more and first.held_back
        second = await _claim(h, limit=2)
        assert second.run is not None and not second.more and second.held_back
        assert (await _claim(h, limit=2)).run is None  # Alice at her limit, one run waiting
        bob_threads = [await h.thread(bob) for _ in range(2)]
        for thread in bob_threads:
            await h.start(bob, thread, "hello", agent="echo")
        at_limit = await _claim(h, limit=1)  # Bob's first: his second must wait for it
        assert at_limit.run is not None and at_limit.run.user_id == bob.id
        assert not at_limit.more and at_limit.held_back
        last = await _claim(h, limit=2)
        assert last.run is not None and last.run.user_id == bob.id
        assert not last.more and last.held_back  # Alice's run behind her first is still there


async def test_a_claim_of_the_only_queued_run_holds_nothing_back(settings_factory) -> None:
    """The worker then lets its runs end without a claim after them."""
    async with running_app(run_settings(settings_factory, embedded_worker=False)) as h:
        carol = await h.user()
        await h.start(carol, await h.thread(carol), "hello", agent="echo")
        only = await _claim(h)
        assert only.run is not None and not only.more and not only.held_back


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_run_queued_during_a_claim_is_claimed_promptly(h: Harness) -> None:
    """PostgreSQL only: on SQLite writers are serialized, so no run can be queued while a
    claim's transaction is open. The claim of Alice's run saw nothing more; Bob's run, queued
    meanwhile, wakes the next claim all the same."""
    alice, bob = await h.user(), await h.user()
    alice_thread, bob_thread = await h.thread(alice), await h.thread(bob)
    queue = h.services.queue
    real_claim = queue.claim
    paused, resume = asyncio.Event(), asyncio.Event()
    held: list[Claimed] = []

    async def claim_held_open(*args: Any, **kwargs: Any) -> Claimed:
        claimed = await real_claim(*args, **kwargs)
        if claimed.run is not None and not held:
            held.append(claimed)
            paused.set()
            async with asyncio.timeout(30):
                await resume.wait()  # the transaction stays open meanwhile
        return claimed

    queue.claim = claim_held_open  # type: ignore[method-assign]
    try:
        first = await h.start(alice, alice_thread, "hello", agent="echo")
        async with asyncio.timeout(30):
            await paused.wait()
        assert not held[0].more  # it saw no other run: Bob's is not queued yet
        second = await h.start(bob, bob_thread, "hello", agent="echo")  # committed, notified
        resume.set()
        assert (await h.wait_run(alice, alice_thread, first["id"]))["status"] == "completed"
        assert (await h.wait_run(bob, bob_thread, second["id"]))["status"] == "completed"
    finally:
        resume.set()
        del queue.claim


async def test_a_start_that_fails_for_another_reason_fails_the_run_once(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start raises (not a database error) in the claim's transaction, which rolls back:
    the run ends failed, and is not claimed again and again."""
    engine = h.services.execution
    real_start = engine._start
    starts: list[str] = []

    async def start_that_raises(conn: Any, run: Any, *args: Any) -> Any:
        if run.agent == "echo":
            starts.append(run.id)
            raise RuntimeError("the start broke")
        return await real_start(conn, run, *args)

    monkeypatch.setattr(engine, "_start", start_that_raises)
    user = await h.user()
    failed = await _run(h, user)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "agent_error"
    assert "RuntimeError: the start broke" in failed["error"]["message"]
    assert starts == [failed["id"]]  # started once: no claim loop
    events = await h.run_events(user, failed["thread_id"], failed["id"])
    assert [e.type.value for e in events if e.type.value != "run_queued"] == ["agent_failed"]
    # The worker goes on: the next run (another agent) completes.
    assert (await _run(h, user, "what is 2+2?", agent="counter"))["status"] == "completed"
    assert starts == [failed["id"]]


async def test_a_start_that_loses_the_database_leaves_the_run_queued_for_later(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops during the start: the claim rolls back with it, so the run is
    still queued, with no attempt counted, and a later claim executes it."""
    engine = h.services.execution
    real_start = engine._start
    dropped: list[str] = []
    worker = h.services.worker
    assert worker is not None

    async def start_losing_the_connection_once(conn: Any, run: Any, *args: Any) -> Any:
        if not dropped:
            dropped.append(run.id)
            orig = ConnectionResetError("connection reset by peer")
            raise DBAPIError("SELECT ... FROM messages", None, orig, connection_invalidated=True)
        return await real_start(conn, run, *args)

    monkeypatch.setattr(engine, "_start", start_losing_the_connection_once)
    user = await h.user()
    thread = await h.thread(user)
    run = await h.start(user, thread, "hello", agent="echo")
    await wait_until(lambda: dropped, what="the start to lose its connection")
    assert (await h.get_run(user, thread, run["id"]))["status"] == "queued"
    worker.notify()  # the next claim (here: woken, not the minute's poll)
    done = await h.wait_run(user, thread, run["id"])
    assert done["status"] == "completed" and done["attempt"] == 1, done
    assert dropped == [run["id"]]
    events = await h.run_events(user, thread, run["id"])
    assert [e.data["attempt"] for e in events if e.type.value == "agent_started"] == [1]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.parametrize("change", ["archive", "delete"])
async def test_a_thread_archived_or_deleted_during_its_runs_claim_waits_for_it(
    h: Harness, change: str
) -> None:
    """The claim's transaction writes the run's thread as it starts the run, and archiving or
    deleting a thread locks the thread, then its runs: the claim holds the thread's row from
    its candidate query on, so the change waits for the claim (no deadlock), then ends the
    run that the claim started. PostgreSQL only: SQLite serializes writers."""
    user = await h.user()
    thread = await h.thread(user)
    queue = h.services.queue
    real_claim = queue.claim
    paused, resume = asyncio.Event(), asyncio.Event()

    async def claim_held_open(*args: Any, **kwargs: Any) -> Claimed:
        claimed = await real_claim(*args, **kwargs)
        if claimed.run is not None and not paused.is_set():
            paused.set()
            async with asyncio.timeout(30):
                await resume.wait()
        return claimed

    queue.claim = claim_held_open  # type: ignore[method-assign]
    try:
        run = await h.start(user, thread, "what is 12*7?", agent="blocker")
        async with asyncio.timeout(30):
            await paused.wait()
        if change == "archive":
            request = h.client.patch(
                f"/v1/threads/{thread}", json={"status": "archived"}, headers=user.headers
            )
        else:
            request = h.client.delete(f"/v1/threads/{thread}", headers=user.headers)
        changing = asyncio.create_task(request)
        await wait_until(lambda: _lock_waits(h), what="the thread's change to wait for the claim")
        resume.set()
        response = await asyncio.wait_for(changing, timeout=30)
        assert response.status_code in (200, 204), response.text
        if change == "archive":
            done = await h.wait_run(user, thread, run["id"])
            assert done["status"] == "cancelled", done
            assert done["error"]["reason"] == "thread_archived", done
        h.controls.gate.set()
    finally:
        resume.set()
        del queue.claim


async def _lock_waits(h: Harness) -> bool:
    async with h.services.engine.connect() as conn:
        waiting = await conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)
