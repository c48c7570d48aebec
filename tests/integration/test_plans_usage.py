"""Plans and usage through the HTTP API: each limit refused at its boundary with
`quota_exceeded`, the limit and when it resets; no overshoot when one user sends many requests
at once; usage per day; a run stopped by its token budget leaves a valid history."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import TestUser, register_user
from tests.integration._support import all_messages, app_client, assert_error, create_thread
from tests.integration.test_runs_support import wait_until
from threadline.settings import Settings
from threadline.store.accounts import AccountStore
from threadline.store.db import create_engine
from threadline.store.queue import RunQueue

pytestmark = pytest.mark.integration

TINY = {
    "messages_per_minute": 3,
    "concurrent_runs": 1,
    "active_runs": 2,
    "tokens_per_day": 1_000_000,
    "max_threads": 2,
}


def plan_settings(make: Callable[..., Settings], **limits: Any) -> Settings:
    plan = {**TINY, **limits}
    return make(plans={"tiny": plan, "roomy": {**plan, "max_threads": None}}, default_plan="tiny")


def assert_quota(response: httpx.Response, quota_words: str, limit: int) -> None:
    assert_error(response, 429, "quota_exceeded")
    message = response.json()["error"]["message"]
    assert f"allows {limit} {quota_words}" in message, message
    assert int(response.headers["Retry-After"]) >= 1


async def test_max_threads_is_refused_at_its_boundary(
    settings_factory: Callable[..., Settings],
) -> None:
    async with app_client(plan_settings(settings_factory)) as client:
        user = await register_user(client)
        for _ in range(2):
            await create_thread(client, user)
        refused = await client.post("/v1/threads", json={}, headers=user.headers)
        assert_quota(refused, "threads", 2)
        listed = await client.get("/v1/threads", headers=user.headers)
        assert len(listed.json()["data"]) == 2, "nothing was written"


async def test_messages_per_minute_is_refused_at_its_boundary_with_the_reset_time(
    settings_factory: Callable[..., Settings],
) -> None:
    async with app_client(plan_settings(settings_factory)) as client:
        user = await register_user(client)
        thread = await create_thread(client, user)
        url = f"/v1/threads/{thread['id']}/messages"
        for n in range(3):
            ok = await client.post(url, json={"content": f"m{n}"}, headers=user.headers)
            assert ok.status_code == 201, ok.text
        refused = await client.post(url, json={"content": "m3"}, headers=user.headers)
        assert_quota(refused, "messages per minute", 3)
        assert int(refused.headers["Retry-After"]) <= 60
        resets = refused.json()["error"]["message"].rsplit("resets at ", 1)[1]
        assert (
            datetime.now(UTC)
            < datetime.fromisoformat(resets)
            <= datetime.now(UTC) + timedelta(seconds=61)
        )
        assert len(await all_messages(client, user, thread["id"])) == 3


async def test_active_runs_never_overshoot_under_concurrent_requests_of_one_user(
    settings_factory: Callable[..., Settings],
) -> None:
    """Eight runs at once, on eight threads: exactly the plan's two are queued."""
    settings = plan_settings(
        settings_factory, max_threads=None, messages_per_minute=100, active_runs=2
    )
    settings = settings.model_copy(update={"embedded_worker": False})  # runs stay queued
    async with app_client(settings) as client:
        user = await register_user(client)
        threads = [await create_thread(client, user) for _ in range(8)]
        responses = await asyncio.gather(
            *(
                client.post(
                    f"/v1/threads/{t['id']}/messages",
                    json={"content": "what is 2+2?", "run": {"agent": "demo"}},
                    headers=user.headers,
                )
                for t in threads
            )
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201, 201] + [429] * 6, [r.text for r in responses]
        for refused in (r for r in responses if r.status_code == 429):
            assert_quota(refused, "active runs", 2)
        stored = [len(await all_messages(client, user, t["id"])) for t in threads]
        assert sorted(stored) == [0] * 6 + [1, 1], "a refused run writes no message either"


async def _finished_run(
    client: httpx.AsyncClient, user: TestUser, thread_id: str, run_id: str
) -> Any:
    async def terminal() -> Any:
        response = await client.get(f"/v1/threads/{thread_id}/runs/{run_id}", headers=user.headers)
        run = response.json()
        return run if run["status"] in ("completed", "failed", "cancelled", "timed_out") else None

    return await wait_until(terminal, what=f"run {run_id} to finish")


async def _put_on_plan(engine: AsyncEngine, user: TestUser, plan: str) -> None:
    async with engine.begin() as conn:
        await AccountStore().set_plan(conn, user.id, plan)


async def _run(client: httpx.AsyncClient, user: TestUser, thread_id: str, content: str) -> Any:
    response = await client.post(
        f"/v1/threads/{thread_id}/messages",
        json={"content": content, "run": {"agent": "demo"}},
        headers=user.headers,
    )
    assert response.status_code == 201, response.text
    return await _finished_run(client, user, thread_id, response.json()["run"]["id"])


async def test_usage_is_recorded_per_day_and_tokens_per_day_refuses_the_next_run(
    settings_factory: Callable[..., Settings],
) -> None:
    async with app_client(plan_settings(settings_factory, tokens_per_day=5)) as client:
        user = await register_user(client)
        thread = await create_thread(client, user)
        run = await _run(client, user, thread["id"], "hello there")
        assert run["status"] == "completed", run
        usage = (await client.get("/v1/me/usage", headers=user.headers)).json()
        assert usage["plan"] == "tiny" and usage["limits"]["tokens_per_day"] == 5
        (today,) = usage["data"]
        assert today["day"] == datetime.now(UTC).date().isoformat()
        assert today["runs"] == 1 and today["input_tokens"] > 0 and today["output_tokens"] > 0
        assert today["total_tokens"] == today["input_tokens"] + today["output_tokens"] > 5
        refused = await client.post(
            f"/v1/threads/{thread['id']}/messages",
            json={"content": "again", "run": {"agent": "demo"}},
            headers=user.headers,
        )
        assert_quota(refused, "tokens per day", 5)
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
        assert f"resets at {tomorrow}T00:00:00+00:00" in refused.json()["error"]["message"]
        other = await register_user(client)  # another user's allowance is untouched
        assert (await _run(client, other, (await create_thread(client, other))["id"], "hi"))[
            "status"
        ] == "completed"


async def test_a_run_crossing_its_token_budget_stops_at_the_next_step_with_a_valid_history(
    settings_factory: Callable[..., Settings],
) -> None:
    """The demo model asks for the calculator first (step one crosses a one-token budget);
    the tool call is answered, then the run fails before the second model call."""
    async with app_client(plan_settings(settings_factory, tokens_per_day=1)) as client:
        user = await register_user(client)
        thread = await create_thread(client, user)
        run = await _run(client, user, thread["id"], "what is 12*7?")
        assert run["status"] == "failed", run
        assert run["error"]["code"] == "token_budget_exceeded", run
        messages = await all_messages(client, user, thread["id"])
        assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
        (call,) = messages[1]["tool_calls"]
        assert call["name"] == "calculator"
        assert messages[2]["tool_call_id"] == call["id"]
        assert messages[2]["content"] == "84", "the tool really ran and its call is answered"
        usage = (await client.get("/v1/me/usage", headers=user.headers)).json()["data"][0]
        assert usage["runs"] == 1 and usage["total_tokens"] > 1, "the spent step is counted"


async def test_a_run_starts_with_the_token_budget_of_its_users_own_plan(
    settings_factory: Callable[..., Settings],
) -> None:
    """The budget comes from the plan the user is on when the run is claimed (the claim reads
    it), not from the default plan: a user on a one-token plan of their own is stopped at the
    next step, while a user on the default plan's million completes."""
    settings = settings_factory(
        plans={"tiny": TINY, "thrifty": {**TINY, "tokens_per_day": 1}}, default_plan="tiny"
    )
    async with app_client(settings) as client:
        thrifty, roomy = await register_user(client), await register_user(client)
        engine = create_engine(settings.database_url)
        try:
            await _put_on_plan(engine, thrifty, "thrifty")
        finally:
            await engine.dispose()
        results = {}
        for user in (thrifty, roomy):
            thread = await create_thread(client, user)
            results[user.id] = await _run(client, user, thread["id"], "what is 12*7?")
    assert results[thrifty.id]["status"] == "failed", results[thrifty.id]
    assert results[thrifty.id]["error"]["code"] == "token_budget_exceeded"
    assert results[roomy.id]["status"] == "completed", results[roomy.id]


async def test_max_threads_never_overshoots_under_concurrent_requests(
    settings_factory: Callable[..., Settings],
) -> None:
    async with app_client(plan_settings(settings_factory)) as client:
        user = await register_user(client)
        responses = await asyncio.gather(
            *(client.post("/v1/threads", json={}, headers=user.headers) for _ in range(6))
        )
        assert sorted(r.status_code for r in responses) == [201, 201] + [429] * 4
        listed = await client.get("/v1/threads", headers=user.headers)
        assert len(listed.json()["data"]) == 2


async def test_concurrent_runs_follow_the_users_plan_in_the_queue(
    settings_factory: Callable[..., Settings],
) -> None:
    """The claim lets a user on a one-run plan have one running run; a user on no plan keeps
    the deployment's limit."""
    settings = settings_factory(
        plans={"tiny": {**TINY, "active_runs": 10, "max_threads": None}},
        embedded_worker=False,
        max_concurrent_runs_per_user=4,
    )
    async with app_client(settings) as client:
        tiny, other = await register_user(client), await register_user(client)
        engine = create_engine(settings.database_url)
        try:
            await _put_on_plan(engine, tiny, "tiny")
            for user in (tiny, tiny, other, other):
                thread = await create_thread(client, user)
                posted = await client.post(
                    f"/v1/threads/{thread['id']}/messages",
                    json={"content": "hi", "run": {"agent": "demo"}},
                    headers=user.headers,
                )
                assert posted.status_code == 201, posted.text
            queue = RunQueue(plan_limits={"tiny": 1}, default_limit=None)
            claimed = []
            for _ in range(4):
                async with engine.begin() as conn:
                    run = await queue.claim_next(
                        conn, worker_id="w", lease_seconds=30, per_user_limit=4
                    )
                if run is not None:
                    claimed.append(run.user_id)
        finally:
            await engine.dispose()
    assert sorted(claimed) == sorted([tiny.id, other.id, other.id])
