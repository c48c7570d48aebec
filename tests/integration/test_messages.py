"""Messages through the HTTP API, on SQLite and on PostgreSQL + Redis (C3, C8 rate limits)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import register_user
from tests.integration._support import (
    all_messages,
    app_client,
    assert_error,
    create_thread,
    error_code,
    get_thread,
    post_message,
)
from threadline.settings import Settings

pytestmark = pytest.mark.integration


MESSAGE_FIELDS = ("id", "thread_id", "position", "role", "content", "metadata", "created_at")


def _core(message: dict) -> dict:
    return {key: message[key] for key in MESSAGE_FIELDS}


def _cursor(*values: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


async def test_append_and_read_back(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user, title="chat")
    first = await post_message(client, user, thread["id"], "hello", metadata={"lang": "en"})
    second = await post_message(client, user, thread["id"], "how are you?")

    assert first["position"] == 1 and second["position"] == 2
    assert first["role"] == "user"
    assert first["thread_id"] == thread["id"]
    assert first["metadata"] == {"lang": "en"}
    assert first["id"].startswith("msg_") and first["id"] != second["id"]
    assert second["created_at"] >= first["created_at"]

    listed = await all_messages(client, user, thread["id"])
    assert [_core(m) for m in listed] == [_core(first), _core(second)]  # stored as returned
    assert (await get_thread(client, user, thread["id"]))["message_count"] == 2


async def test_concurrent_posts_get_gap_free_unique_positions(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user, title="busy")
    count = 30

    async def post(i: int) -> httpx.Response:
        return await client.post(
            f"/v1/threads/{thread['id']}/messages",
            json={"content": f"message {i}"},
            headers=user.headers,
        )

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(post(i)) for i in range(count)]
    responses = [task.result() for task in tasks]
    assert [r.status_code for r in responses] == [201] * count, [
        r.text for r in responses if r.status_code != 201
    ]
    positions = sorted(r.json()["position"] for r in responses)
    assert positions == list(range(1, count + 1))

    stored = await all_messages(client, user, thread["id"], limit=7)
    assert [m["position"] for m in stored] == list(range(1, count + 1))
    by_id = {r.json()["id"]: _core(r.json()) for r in responses}
    assert {m["id"]: _core(m) for m in stored} == by_id  # each poster got back what is stored
    assert (await get_thread(client, user, thread["id"]))["message_count"] == count


async def test_pagination_ascending_and_descending(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user)
    for i in range(1, 26):
        await post_message(client, user, thread["id"], f"m{i}")

    ascending = await all_messages(client, user, thread["id"], limit=10)
    assert [m["content"] for m in ascending] == [f"m{i}" for i in range(1, 26)]
    descending = await all_messages(client, user, thread["id"], limit=10, order="desc")
    assert [m["content"] for m in descending] == [f"m{i}" for i in range(25, 0, -1)]

    url = f"/v1/threads/{thread['id']}/messages"
    first_page = (await client.get(url, params={"limit": 10}, headers=user.headers)).json()
    assert len(first_page["data"]) == 10 and first_page["next_cursor"]
    newest = (
        await client.get(url, params={"limit": 3, "order": "desc"}, headers=user.headers)
    ).json()
    assert [m["position"] for m in newest["data"]] == [25, 24, 23]
    whole = (await client.get(url, params={"limit": 25}, headers=user.headers)).json()
    assert len(whole["data"]) == 25
    # A full last page has no cursor, or a cursor to an empty page.
    if whole["next_cursor"] is not None:
        rest = await client.get(
            url, params={"limit": 25, "cursor": whole["next_cursor"]}, headers=user.headers
        )
        assert rest.json()["data"] == []


async def test_invalid_message_list_parameters_are_422(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user)
    await post_message(client, user, thread["id"], "x")
    url = f"/v1/threads/{thread['id']}/messages"
    for params, code in (
        ({"order": "sideways"}, "validation_error"),
        ({"limit": 0}, "validation_error"),
        ({"limit": 201}, "validation_error"),
        ({"cursor": "%%%"}, "invalid_cursor"),
        ({"cursor": _cursor("one")}, "invalid_cursor"),
        ({"cursor": _cursor(1, 2)}, "invalid_cursor"),
        ({"cursor": _cursor(True)}, "invalid_cursor"),
    ):
        response = await client.get(url, params=params, headers=user.headers)
        assert response.status_code == 422, (params, response.text)
        assert error_code(response) == code, params


async def test_message_cursor_with_a_huge_position_is_answered_not_a_500(client, make_user):
    """A hand-made cursor beyond any integer column must not crash the query."""
    user = await make_user()
    thread = await create_thread(client, user)
    await post_message(client, user, thread["id"], "x")
    response = await client.get(
        f"/v1/threads/{thread['id']}/messages",
        params={"cursor": _cursor(2**70)},
        headers=user.headers,
    )
    assert response.status_code in (200, 422), response.text
    if response.status_code == 422:
        assert error_code(response) == "invalid_cursor"


async def _assert_nothing_written(
    client: httpx.AsyncClient, user, thread_id: str, before: dict
) -> None:
    after = await get_thread(client, user, thread_id)
    assert after == before  # no count, no activity, no title from a refused message
    assert await all_messages(client, user, thread_id) == []


async def test_input_limits_have_clear_errors_and_write_nothing(
    client, make_user, settings: Settings
):
    user = await make_user()
    thread = await create_thread(client, user)  # untitled: a stored message would title it
    before = await get_thread(client, user, thread["id"])
    url = f"/v1/threads/{thread['id']}/messages"

    too_long = await client.post(
        url, json={"content": "x" * (settings.max_message_chars + 1)}, headers=user.headers
    )
    assert_error(too_long, 422, "message_too_long")
    for blank in ("", "   ", "\n\t "):
        empty = await client.post(url, json={"content": blank}, headers=user.headers)
        assert_error(empty, 422, "message_empty")
    big_metadata = {"blob": "x" * (settings.max_metadata_bytes + 1)}
    too_much = await client.post(
        url, json={"content": "ok", "metadata": big_metadata}, headers=user.headers
    )
    assert_error(too_much, 422, "metadata_too_large")
    missing = await client.post(url, json={}, headers=user.headers)
    assert_error(missing, 422, "validation_error")
    wrong_type = await client.post(url, json={"content": ["a"]}, headers=user.headers)
    assert_error(wrong_type, 422, "validation_error")
    await _assert_nothing_written(client, user, thread["id"], before)

    # Exactly at the limit is accepted.
    at_limit = await post_message(client, user, thread["id"], "y" * settings.max_message_chars)
    assert at_limit["position"] == 1


async def test_body_over_the_request_limit_is_413(client, make_user, settings: Settings):
    user = await make_user()
    thread = await create_thread(client, user)
    before = await get_thread(client, user, thread["id"])
    url = f"/v1/threads/{thread['id']}/messages"
    payload = json.dumps({"content": "z" * (settings.max_request_bytes + 10)}).encode()

    declared = await client.post(
        url, content=payload, headers={**user.headers, "content-type": "application/json"}
    )
    assert_error(declared, 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the limit must hold for a streamed body too.
        for start in range(0, len(payload), 64 * 1024):
            yield payload[start : start + 64 * 1024]

    streamed = await client.post(
        url, content=chunks(), headers={**user.headers, "content-type": "application/json"}
    )
    assert_error(streamed, 413, "payload_too_large")
    await _assert_nothing_written(client, user, thread["id"], before)


async def test_posting_to_an_archived_thread_is_409_until_restored(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user, title="old")
    await post_message(client, user, thread["id"], "first")
    await client.delete(f"/v1/threads/{thread['id']}", headers=user.headers)
    before = await get_thread(client, user, thread["id"])
    refused = await client.post(
        f"/v1/threads/{thread['id']}/messages", json={"content": "late"}, headers=user.headers
    )
    assert_error(refused, 409, "thread_archived")
    assert await get_thread(client, user, thread["id"]) == before

    await client.patch(
        f"/v1/threads/{thread['id']}", json={"status": "active"}, headers=user.headers
    )
    assert (await post_message(client, user, thread["id"], "again"))["position"] == 2


async def test_a_completed_thread_still_takes_messages(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user)
    await client.patch(
        f"/v1/threads/{thread['id']}", json={"status": "completed"}, headers=user.headers
    )
    assert (await post_message(client, user, thread["id"], "one more thing"))["position"] == 1


_WINDOW_MARGIN = 10.0


async def _well_inside_a_window() -> None:
    """Return once at least `_WINDOW_MARGIN` seconds remain in the current clock minute (at
    once, or after the next minute starts)."""
    remaining = 60 - time.time() % 60
    if remaining < _WINDOW_MARGIN:
        await asyncio.sleep(remaining + 0.05)


async def test_rate_limit_is_429_with_retry_after(settings_factory, backend):
    """Over `messages_per_minute` a user gets 429 with Retry-After. On the scale-out backend the
    count is shared: posts spread over two API processes add up (Redis); the embedded backend is
    one process by design."""
    settings = settings_factory(messages_per_minute=3)
    async with app_client(settings) as first, app_client(settings) as second:
        clients = [first, second] if backend == "postgres" else [first]
        user = await register_user(first)
        other = await register_user(first)
        thread = await create_thread(first, user)
        url = f"/v1/threads/{thread['id']}/messages"

        # Windows are fixed minutes of the clock: a burst that straddled a boundary could get
        # twice the limit through, so start it well inside one window (a bounded wait for the
        # clock, at most _WINDOW_MARGIN s) and check it stayed there.
        await _well_inside_a_window()
        window = int(time.time() // 60)
        responses = [
            await clients[i % len(clients)].post(
                url, json={"content": f"m{i}"}, headers=user.headers
            )
            for i in range(6)
        ]
        assert int(time.time() // 60) == window, "the burst outlasted the margin: rerun"
        statuses = [r.status_code for r in responses]
        # Exactly the limit, over both processes together: two separate counters (each seeing
        # every other post) would let all six through.
        assert statuses == [201, 201, 201, 429, 429, 429], [r.text for r in responses]
        limited = responses[statuses.index(429)]
        assert error_code(limited) == "rate_limited"
        retry_after = int(limited.headers["retry-after"])
        assert 1 <= retry_after <= 60

        # A refused message is not stored; the accepted ones are, in order.
        stored = await all_messages(first, user, thread["id"])
        assert [m["content"] for m in stored] == [
            f"m{i}" for i, r in enumerate(responses) if r.status_code == 201
        ]
        assert [m["position"] for m in stored] == list(range(1, len(stored) + 1))

        # The limit is per user: someone else is not slowed down.
        others = await create_thread(first, other)
        assert (await post_message(first, other, others["id"], "fine"))["position"] == 1
        # Reading is not limited.
        reads = await first.get(url, headers=user.headers)
        assert reads.status_code == 200


async def test_first_user_message_titles_an_untitled_thread(client, make_user):
    user = await make_user()
    untitled = await create_thread(client, user)
    await post_message(client, user, untitled["id"], "  Plan the   trip to\nLisbon in May  ")
    assert (await get_thread(client, user, untitled["id"]))["title"] == (
        "Plan the trip to Lisbon in May"
    )
    await post_message(client, user, untitled["id"], "A second message does not retitle it")
    assert (await get_thread(client, user, untitled["id"]))["title"] == (
        "Plan the trip to Lisbon in May"
    )

    titled = await create_thread(client, user, title="Mine")
    await post_message(client, user, titled["id"], "This does not replace a given title")
    assert (await get_thread(client, user, titled["id"]))["title"] == "Mine"

    long_thread = await create_thread(client, user)
    words = " ".join(f"word{i}" for i in range(60))
    await post_message(client, user, long_thread["id"], words)
    title = (await get_thread(client, user, long_thread["id"]))["title"]
    assert title.endswith("…")
    assert len(title) <= 61
    assert words.startswith(title.removesuffix("…"))
    assert title.removesuffix("…").split(" ")[-1] in words.split(" ")  # cut at a word boundary

    # A refused first message does not title the thread; the next accepted one does.
    waiting = await create_thread(client, user)
    refused = await client.post(
        f"/v1/threads/{waiting['id']}/messages", json={"content": "   "}, headers=user.headers
    )
    assert refused.status_code == 422
    assert (await get_thread(client, user, waiting["id"]))["title"] is None
    await post_message(client, user, waiting["id"], "Real start")
    assert (await get_thread(client, user, waiting["id"]))["title"] == "Real start"


async def test_message_with_a_nul_character_is_stored_or_refused_never_a_500(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user)
    response = await client.post(
        f"/v1/threads/{thread['id']}/messages",
        json={"content": "before\x00after"},
        headers=user.headers,
    )
    assert response.status_code in (201, 422), response.text
    stored = await all_messages(client, user, thread["id"])
    if response.status_code == 201:
        assert [m["content"] for m in stored] == ["before\x00after"]
    else:
        assert stored == []
