"""Webhooks end to end: endpoints added by the admin CLI, deliveries signed per Standard
Webhooks and verified by a loopback receiver with the `standardwebhooks` library, retries with
back-off until a failing receiver recovers (every event exactly once by idempotency key), a
dead letter after the last attempt, a slow receiver that never slows runs, and an event written
by a server that stopped before delivering it, delivered after the restart."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import TestUser, register_user
from tests.integration._support import app_client, create_thread
from tests.integration.test_runs_support import wait_until
from tests.integration.test_service_keys_admin import admin, admin_json
from tests.webhook_receiver import Receiver, webhook_receiver
from threadline.settings import Settings
from threadline.store.db import create_engine
from threadline.store.tables import webhook_deliveries

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as served:
        yield served


def fast(make: Callable[..., Settings], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_poll_seconds": 0.05,
        "webhook_retry_base_seconds": 0.05,
        "webhook_timeout_seconds": 5,
    }
    return make(**{**values, **overrides})


async def add_endpoint(settings: Settings, receiver: Receiver, *events: str) -> str:
    args = [arg for event in events for arg in ("--event", event)]
    created = await admin_json(settings, "webhooks", "add", receiver.url, *args)
    receiver.secret = created["secret"]
    return str(created["id"])


async def finished_run(client: httpx.AsyncClient, user: TestUser, content: str = "hi") -> str:
    thread = await create_thread(client, user)
    posted = await client.post(
        f"/v1/threads/{thread['id']}/messages",
        json={"content": content, "run": {"agent": "demo"}},
        headers=user.headers,
    )
    assert posted.status_code == 201, posted.text
    run_id = str(posted.json()["run"]["id"])

    async def done() -> bool:
        response = await client.get(
            f"/v1/threads/{thread['id']}/runs/{run_id}", headers=user.headers
        )
        return response.json()["status"] == "completed"

    await wait_until(done, what="the run to complete")
    return run_id


async def received(receiver: Receiver, count: int) -> list[dict[str, Any]]:
    await wait_until(lambda: len(receiver.events()) >= count, what=f"{count} deliveries")
    return receiver.events()


async def test_every_completed_run_is_delivered_signed(
    settings_factory: Callable[..., Settings], receiver: Receiver
) -> None:
    settings = fast(settings_factory)
    await add_endpoint(settings, receiver, "run.completed")
    async with app_client(settings) as client:
        user = await register_user(client)
        run_ids = {await finished_run(client, user, f"question {n}") for n in range(3)}
        events = await received(receiver, 3)
    assert receiver.bad_signatures == 0
    assert {e["data"]["run_id"] for e in events} == run_ids
    assert {e["type"] for e in events} == {"run.completed"}
    assert all(
        e["data"]["user_id"] == user.id and e["data"]["usage"]["output_tokens"] > 0 for e in events
    )
    assert len(receiver.by_id) == 3


async def test_a_receiver_that_fails_then_recovers_gets_every_event_once_by_key(
    settings_factory: Callable[..., Settings], receiver: Receiver
) -> None:
    receiver.fail_first = 4
    settings = fast(settings_factory)
    endpoint = await add_endpoint(settings, receiver)
    async with app_client(settings) as client:
        user = await register_user(client)
        run_ids = {await finished_run(client, user, f"q{n}") for n in range(3)}
        events = await received(receiver, 3)
        log = await admin_json(settings, "webhooks", "deliveries", endpoint)
    assert {e["data"]["run_id"] for e in events} == run_ids
    assert receiver.requests >= 3 + 4 and receiver.bad_signatures == 0
    assert {d["status"] for d in log} == {"delivered"}
    assert sum(d["attempts"] for d in log) == receiver.requests


async def test_the_last_failed_attempt_leaves_a_dead_letter(
    settings_factory: Callable[..., Settings], receiver: Receiver
) -> None:
    receiver.always_fail = True
    settings = fast(settings_factory, webhook_max_attempts=3)
    endpoint = await add_endpoint(settings, receiver, "run.completed")
    async with app_client(settings) as client:
        user = await register_user(client)
        await finished_run(client, user)

        async def dead() -> list[dict[str, Any]] | None:
            log = await admin_json(settings, "webhooks", "deliveries", endpoint)
            return log if log and log[0]["status"] == "dead" else None

        (letter,) = await wait_until(dead, what="a dead letter")
    assert letter["attempts"] == 3 and letter["last_error"] == "HTTP 500"
    assert receiver.requests == 3


async def test_a_slow_receiver_never_slows_runs(
    settings_factory: Callable[..., Settings], receiver: Receiver
) -> None:
    receiver.hold.clear()  # every delivery waits until released
    settings = fast(settings_factory)
    await add_endpoint(settings, receiver, "run.completed")
    async with app_client(settings) as client:
        user = await register_user(client)
        for n in range(3):
            await finished_run(client, user, f"q{n}")  # completes while deliveries hang
        assert receiver.events() == []
        receiver.hold.set()
        assert len(await received(receiver, 3)) == 3


async def test_an_event_of_a_server_stopped_before_delivery_is_delivered_after_restart(
    settings_factory: Callable[..., Settings], receiver: Receiver
) -> None:
    stopped = fast(settings_factory, webhook_delivery=False)
    await add_endpoint(stopped, receiver, "run.completed", "thread.deleted")
    async with app_client(stopped) as client:
        user = await register_user(client)
        first = await finished_run(client, user)
        second = await finished_run(client, user)
    assert receiver.requests == 0
    # A process that claimed the second delivery and died: its lease runs out, then it is
    # anyone's again.
    engine = create_engine(stopped.database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                webhook_deliveries.update()
                .where(webhook_deliveries.c.payload.contains(second))
                .values(
                    lease_owner="dead-process",
                    lease_expires_at=datetime.now(UTC) - timedelta(seconds=1),
                )
            )
    finally:
        await engine.dispose()
    async with app_client(fast(settings_factory)) as client:
        events = await received(receiver, 2)
        assert {e["data"]["run_id"] for e in events} == {first, second}
        thread = await create_thread(client, user)
        deleted = await client.delete(
            f"/v1/threads/{thread['id']}", params={"permanent": "true"}, headers=user.headers
        )
        assert deleted.status_code == 204, deleted.text
        events = await received(receiver, 3)
    assert events[-1] == {**events[-1], "type": "thread.deleted"}
    assert events[-1]["data"]["thread_id"] == thread["id"]


async def test_admin_webhooks_test_list_and_remove(
    settings_factory: Callable[..., Settings], receiver: Receiver
) -> None:
    settings = fast(settings_factory)
    endpoint = await add_endpoint(settings, receiver, "run.failed")
    listed = await admin_json(settings, "webhooks", "list")
    assert [e["id"] for e in listed] == [endpoint] and "secret" not in listed[0]
    async with app_client(settings):
        await admin(settings, "webhooks", "test", endpoint)
        (event,) = await received(receiver, 1)
        assert event["type"] == "webhook.test"
    await admin(settings, "webhooks", "remove", endpoint)
    assert await admin_json(settings, "webhooks", "list") == []


async def test_two_delivering_instances_send_each_delivery_once(
    settings_factory: Callable[..., Settings], receiver: Receiver
) -> None:
    settings = fast(settings_factory, webhook_poll_seconds=0.01)
    await add_endpoint(settings, receiver, "run.completed")
    async with app_client(settings) as first, app_client(settings) as second:
        user = await register_user(first)
        run_ids = {await finished_run(client, user, "hi") for client in (first, second, first)}
        events = await received(receiver, 3)
    assert {e["data"]["run_id"] for e in events} == run_ids
    assert receiver.requests == 3, "a claimed delivery is sent by one instance"
