"""Thread lifecycle through the HTTP API, on SQLite and on PostgreSQL + Redis (C2)."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime

import httpx
import pytest

from tests.conftest import register_user
from tests.integration._support import (
    all_messages,
    app_client,
    assert_error,
    count_rows,
    create_thread,
    error_code,
    get_thread,
    list_threads,
    post_message,
    unique,
)
from threadline.settings import Settings

pytestmark = pytest.mark.integration

STATUSES = ("active", "completed", "archived")
VALID_TRANSITIONS = {
    ("active", "completed"),
    ("active", "archived"),
    ("completed", "active"),
    ("completed", "archived"),
    ("archived", "active"),
}
# How to bring a new (active) thread into each status using valid transitions only.
PATH_TO = {"active": [], "completed": ["completed"], "archived": ["archived"]}


def _cursor(*values: object) -> str:
    raw = json.dumps(list(values)).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- creation ---------------------------------------------------------------------------------


async def test_create_with_title_and_metadata_round_trips(client, make_user):
    user = await make_user()
    metadata = {"project": "apollo", "priority": 2, "tags": ["a", "b"], "nested": {"ok": True}}
    response = await client.post(
        "/v1/threads", json={"title": "  Launch plan  ", "metadata": metadata}, headers=user.headers
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["title"] == "Launch plan"  # surrounding whitespace is not part of a title
    assert created["metadata"] == metadata
    assert created["status"] == "active"
    assert created["version"] == 1
    assert created["message_count"] == 0
    assert created["id"].startswith("thr_")
    assert response.headers["etag"] == '"1"'
    assert created["created_at"] == created["updated_at"] == created["last_activity_at"]

    fetched = await get_thread(client, user, created["id"])
    assert {key: fetched[key] for key in created} == created


async def test_create_without_anything_gives_an_untitled_active_thread(client, make_user):
    user = await make_user()
    response = await client.post("/v1/threads", json={}, headers=user.headers)
    assert response.status_code == 201, response.text
    assert response.json()["title"] is None
    assert response.json()["metadata"] == {}


INVALID_CREATE_BODIES = {
    "title-too-long": {"title": "x" * 201},
    "title-blank": {"title": "   "},
    "title-not-a-string": {"title": 42},
    "metadata-a-list": {"metadata": ["not", "an", "object"]},
    "metadata-a-string": {"metadata": "text"},
    "metadata-null": {"metadata": None},
}


async def test_create_with_invalid_data_is_422_and_leaves_nothing(
    client, make_user, settings: Settings
):
    user = await make_user()
    for case, body in INVALID_CREATE_BODIES.items():
        response = await client.post("/v1/threads", json=body, headers=user.headers)
        assert response.status_code == 422, (case, response.text)
        assert error_code(response) == "validation_error", case
    not_json = await client.post(
        "/v1/threads",
        content=b"{not json",
        headers={**user.headers, "content-type": "application/json"},
    )
    assert_error(not_json, 400, "invalid_json")
    assert await list_threads(client, user) == []
    assert await count_rows(settings.database_url, "threads", user_id=user.id) == 0


async def test_create_with_metadata_too_large_is_422_and_leaves_nothing(
    client, make_user, settings: Settings
):
    user = await make_user()
    big = {"blob": "x" * (settings.max_metadata_bytes + 1)}
    response = await client.post("/v1/threads", json={"metadata": big}, headers=user.headers)
    assert_error(response, 422, "metadata_too_large")
    assert await list_threads(client, user) == []
    assert await count_rows(settings.database_url, "threads", user_id=user.id) == 0
    # Just under the limit is fine: the limit is on the JSON size, not something smaller.
    fits = {"blob": "x" * (settings.max_metadata_bytes - 20)}
    assert (
        await client.post("/v1/threads", json={"metadata": fits}, headers=user.headers)
    ).status_code == 201


async def test_title_of_exactly_200_characters_is_accepted(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user, title="t" * 200)
    assert thread["title"] == "t" * 200


async def test_text_with_a_nul_character_is_stored_or_refused_never_a_500(settings: Settings):
    """A NUL is valid JSON text. Either it round-trips, or it is refused with a 422; a server
    error is never the answer (PostgreSQL cannot store NUL in text). Whatever the answer, a
    create that did not succeed leaves no row behind."""
    async with app_client(settings) as client:  # a 500 comes back as a response here
        user = await register_user(client)
        outcomes = {}
        for case, body in {
            "title": {"title": "before\x00after"},
            "metadata-value": {"metadata": {"k": "before\x00after"}},
            "metadata-key": {"metadata": {"k\x00": "v"}},
        }.items():
            before = await count_rows(settings.database_url, "threads", user_id=user.id)
            response = await client.post("/v1/threads", json=body, headers=user.headers)
            outcomes[case] = response.status_code
            after = await count_rows(settings.database_url, "threads", user_id=user.id)
            if response.status_code == 201:
                assert after == before + 1, case
                fetched = await get_thread(client, user, response.json()["id"])
                assert all(fetched[key] == value for key, value in body.items()), case
            else:
                assert after == before, case  # a failed create leaves nothing
                error_code(response)
        assert all(status in (201, 422) for status in outcomes.values()), outcomes


async def test_metadata_with_nan_is_refused_or_kept_usable(client, make_user):
    """Python's JSON parser accepts `NaN`, which is not JSON. Refusing it is right; storing it
    must at least not break the user's later reads and filtered lists."""
    user = await make_user()
    response = await client.post(
        "/v1/threads",
        content=b'{"title": "nan", "metadata": {"x": NaN}}',
        headers={**user.headers, "content-type": "application/json"},
    )
    assert response.status_code in (201, 422), response.text
    if response.status_code == 422:
        error_code(response)
        return
    fetched = await get_thread(client, user, response.json()["id"])
    assert fetched["metadata"] == response.json()["metadata"]
    filtered = await client.get(
        "/v1/threads", params={"metadata": json.dumps({"x": 1})}, headers=user.headers
    )
    assert filtered.status_code == 200, filtered.text


# --- state: status, metadata, activity, concurrency ------------------------------------------


async def test_every_status_transition(client, make_user):
    user = await make_user()
    for source, target in [(s, t) for s in STATUSES for t in STATUSES]:
        thread = await create_thread(client, user, title=f"{source} to {target}")
        for step in PATH_TO[source]:
            moved = await client.patch(
                f"/v1/threads/{thread['id']}", json={"status": step}, headers=user.headers
            )
            assert moved.status_code == 200, moved.text
        before = await get_thread(client, user, thread["id"])
        assert before["status"] == source

        response = await client.patch(
            f"/v1/threads/{thread['id']}", json={"status": target}, headers=user.headers
        )
        after = await get_thread(client, user, thread["id"])
        if source == target:
            # Asking for the status it already has changes nothing.
            assert response.status_code == 200, (source, target, response.text)
            assert after == before
        elif (source, target) in VALID_TRANSITIONS:
            assert response.status_code == 200, (source, target, response.text)
            assert response.json()["status"] == target
            assert after["status"] == target
            assert after["version"] == before["version"] + 1
            assert response.headers["etag"] == f'"{after["version"]}"'
        else:
            assert response.status_code == 409, (source, target, response.text)
            assert error_code(response) == "invalid_status_transition"
            assert after == before  # a refused transition writes nothing


async def test_unknown_status_is_422(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user)
    response = await client.patch(
        f"/v1/threads/{thread['id']}", json={"status": "deleted"}, headers=user.headers
    )
    assert_error(response, 422, "validation_error")


async def test_metadata_patch_merges_and_persists(client, make_user):
    user = await make_user()
    thread = await create_thread(
        client, user, title="m", metadata={"keep": 1, "drop": "x", "replace": "old"}
    )
    response = await client.patch(
        f"/v1/threads/{thread['id']}",
        json={"metadata": {"drop": None, "replace": "new", "added": [1, 2]}},
        headers=user.headers,
    )
    assert response.status_code == 200, response.text
    expected = {"keep": 1, "replace": "new", "added": [1, 2]}
    assert response.json()["metadata"] == expected
    assert response.json()["version"] == 2
    assert (await get_thread(client, user, thread["id"]))["metadata"] == expected

    # Fields not mentioned stay as they are; a PATCH with nothing in it changes nothing.
    unchanged = await client.patch(f"/v1/threads/{thread['id']}", json={}, headers=user.headers)
    assert unchanged.status_code == 200
    assert unchanged.json()["version"] == 2
    assert unchanged.json()["title"] == "m"


async def test_title_can_be_changed_and_cleared(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user, title="first")
    renamed = await client.patch(
        f"/v1/threads/{thread['id']}", json={"title": "second"}, headers=user.headers
    )
    assert renamed.json()["title"] == "second"
    cleared = await client.patch(
        f"/v1/threads/{thread['id']}", json={"title": None}, headers=user.headers
    )
    assert cleared.status_code == 200
    assert (await get_thread(client, user, thread["id"]))["title"] is None


async def test_metadata_patch_that_makes_it_too_large_is_refused_and_writes_nothing(
    client, make_user, settings: Settings
):
    user = await make_user()
    half = "x" * (settings.max_metadata_bytes // 2)
    thread = await create_thread(client, user, metadata={"a": half})
    response = await client.patch(
        f"/v1/threads/{thread['id']}", json={"metadata": {"b": half + "y"}}, headers=user.headers
    )
    assert_error(response, 422, "metadata_too_large")
    assert await get_thread(client, user, thread["id"]) == thread


async def test_posting_a_message_moves_last_activity_and_list_order_follows(client, make_user):
    user = await make_user()
    first = await create_thread(client, user, title="first")
    second = await create_thread(client, user, title="second")
    third = await create_thread(client, user, title="third")
    assert [t["id"] for t in await list_threads(client, user)] == [
        third["id"],
        second["id"],
        first["id"],
    ]

    message = await post_message(client, user, first["id"], "bring the oldest back to the top")
    moved = await get_thread(client, user, first["id"])
    assert _ts(moved["last_activity_at"]) > _ts(first["last_activity_at"])
    assert _ts(moved["last_activity_at"]) >= _ts(message["created_at"])
    assert moved["message_count"] == 1
    assert [t["id"] for t in await list_threads(client, user)] == [
        first["id"],
        third["id"],
        second["id"],
    ]

    await post_message(client, user, second["id"], "and now this one")
    listed = await list_threads(client, user)
    assert [t["id"] for t in listed] == [second["id"], first["id"], third["id"]]
    activity = [_ts(t["last_activity_at"]) for t in listed]
    assert activity == sorted(activity, reverse=True)


async def test_concurrent_patches_without_if_match_lose_no_write(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user, title="race")
    count = 20

    async def add_key(i: int) -> httpx.Response:
        return await client.patch(
            f"/v1/threads/{thread['id']}", json={"metadata": {f"k{i}": i}}, headers=user.headers
        )

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(add_key(i)) for i in range(count)]
    statuses = [task.result().status_code for task in tasks]
    assert statuses == [200] * count, [
        t.result().text for t in tasks if t.result().status_code != 200
    ]

    final = await get_thread(client, user, thread["id"])
    assert final["metadata"] == {f"k{i}": i for i in range(count)}
    assert final["version"] == 1 + count
    # Each response saw a distinct version: no two writers both thought they made version N.
    assert sorted(task.result().json()["version"] for task in tasks) == list(range(2, count + 2))


async def test_two_patches_with_the_same_if_match_exactly_one_wins(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user, title="optimistic")
    etag = (await client.get(f"/v1/threads/{thread['id']}", headers=user.headers)).headers["etag"]

    async def rename(title: str) -> httpx.Response:
        return await client.patch(
            f"/v1/threads/{thread['id']}",
            json={"title": title},
            headers={**user.headers, "If-Match": etag},
        )

    async with asyncio.TaskGroup() as tg:
        a = tg.create_task(rename("from A"))
        b = tg.create_task(rename("from B"))
    responses = [a.result(), b.result()]
    assert sorted(r.status_code for r in responses) == [200, 409], [r.text for r in responses]
    winner = next(r for r in responses if r.status_code == 200)
    loser = next(r for r in responses if r.status_code == 409)
    assert error_code(loser) == "thread_version_conflict"
    final = await get_thread(client, user, thread["id"])
    assert final["title"] == winner.json()["title"]
    assert final["version"] == 2


async def test_stale_if_match_is_409_and_current_one_succeeds(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user, title="v1")
    url = f"/v1/threads/{thread['id']}"
    ok = await client.patch(url, json={"title": "v2"}, headers={**user.headers, "If-Match": '"1"'})
    assert ok.status_code == 200, ok.text
    assert ok.headers["etag"] == '"2"'
    stale = await client.patch(
        url, json={"title": "lost"}, headers={**user.headers, "If-Match": '"1"'}
    )
    assert_error(stale, 409, "thread_version_conflict")
    assert (await get_thread(client, user, thread["id"]))["title"] == "v2"
    weak = await client.patch(
        url, json={"title": "v3"}, headers={**user.headers, "If-Match": 'W/"2"'}
    )
    assert weak.status_code == 200, weak.text
    star = await client.patch(url, json={"title": "v4"}, headers={**user.headers, "If-Match": "*"})
    assert star.status_code == 200, star.text
    garbage = await client.patch(
        url, json={"title": "v5"}, headers={**user.headers, "If-Match": "yesterday"}
    )
    assert_error(garbage, 422, "invalid_if_match")


# --- retrieval: by id, pagination, filters, search --------------------------------------------


async def test_cursor_pagination_returns_every_thread_exactly_once_in_order(client, make_user):
    user = await make_user()
    created = [(await create_thread(client, user, title=f"thread {i:02}"))["id"] for i in range(45)]

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params = {"limit": 10, **({"cursor": cursor} if cursor else {})}
        response = await client.get("/v1/threads", params=params, headers=user.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append([t["id"] for t in body["data"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 10, "pagination does not end"

    assert [len(page) for page in pages] == [10, 10, 10, 10, 5]
    seen = [thread_id for page in pages for thread_id in page]
    assert seen == list(reversed(created))  # newest activity first, each exactly once


async def test_pagination_with_a_page_size_that_divides_evenly_ends_cleanly(client, make_user):
    user = await make_user()
    for i in range(4):
        await create_thread(client, user, title=f"t{i}")
    first = (await client.get("/v1/threads", params={"limit": 2}, headers=user.headers)).json()
    second = (
        await client.get(
            "/v1/threads", params={"limit": 2, "cursor": first["next_cursor"]}, headers=user.headers
        )
    ).json()
    assert len(second["data"]) == 2
    if second["next_cursor"] is not None:  # allowed, but then the next page must be empty
        third = await client.get(
            "/v1/threads",
            params={"limit": 2, "cursor": second["next_cursor"]},
            headers=user.headers,
        )
        assert third.json() == {"data": [], "next_cursor": None}


async def test_filter_by_status(client, make_user):
    user = await make_user()
    active = await create_thread(client, user, title="active one")
    completed = await create_thread(client, user, title="completed one")
    archived = await create_thread(client, user, title="archived one")
    await client.patch(
        f"/v1/threads/{completed['id']}", json={"status": "completed"}, headers=user.headers
    )
    await client.delete(f"/v1/threads/{archived['id']}", headers=user.headers)

    for status, expected in (
        ("active", active),
        ("completed", completed),
        ("archived", archived),
    ):
        listed = await list_threads(client, user, status=status)
        assert [t["id"] for t in listed] == [expected["id"]], status
        assert listed[0]["status"] == status
    bad = await client.get("/v1/threads", params={"status": "gone"}, headers=user.headers)
    assert_error(bad, 422, "validation_error")


async def test_filter_by_metadata(client, make_user):
    user = await make_user()
    apollo_1 = await create_thread(
        client, user, title="a1", metadata={"project": "apollo", "n": 1, "flag": True}
    )
    await create_thread(
        client, user, title="z", metadata={"project": "zeus", "n": 2, "flag": False}
    )
    apollo_str = await create_thread(
        client, user, title="a2", metadata={"project": "apollo", "n": "1"}
    )
    await create_thread(client, user, title="none")

    async def ids(wanted: dict[str, object]) -> set[str]:
        listed = await list_threads(client, user, metadata=json.dumps(wanted))
        return {t["id"] for t in listed}

    assert await ids({"project": "apollo"}) == {apollo_1["id"], apollo_str["id"]}
    assert await ids({"project": "apollo", "n": 1}) == {apollo_1["id"]}  # 1 is not "1"
    assert await ids({"n": "1"}) == {apollo_str["id"]}
    assert await ids({"flag": True}) == {apollo_1["id"]}
    assert await ids({"project": "mars"}) == set()
    # The filter still respects pagination order and status filters.
    archived = await client.delete(f"/v1/threads/{apollo_1['id']}", headers=user.headers)
    assert archived.status_code == 204
    listed = await list_threads(
        client, user, metadata=json.dumps({"project": "apollo"}), status="active"
    )
    assert [t["id"] for t in listed] == [apollo_str["id"]]


async def test_invalid_metadata_filter_is_422(client, make_user):
    user = await make_user()
    for value in (
        "{not json",
        "[1, 2]",
        '"text"',
        '{"nested": {"a": 1}}',
        '{"list": [1]}',
        '{"bad key!": 1}',
        '{"k": null}',
    ):
        response = await client.get("/v1/threads", params={"metadata": value}, headers=user.headers)
        assert response.status_code == 422, (value, response.text)
        assert error_code(response) == "invalid_metadata_filter", value


async def test_metadata_filter_with_a_huge_number_is_answered_not_a_500(client, make_user):
    user = await make_user()
    await create_thread(client, user, metadata={"n": 1})
    response = await client.get(
        "/v1/threads", params={"metadata": json.dumps({"n": 2**70})}, headers=user.headers
    )
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        assert response.json()["data"] == []


async def test_text_search_on_title_and_on_message_content(client, make_user):
    user = await make_user()
    token = unique("zebra")
    by_title = await create_thread(client, user, title=f"About {token.upper()} things")
    by_content = await create_thread(client, user, title="Unrelated title")
    await post_message(client, user, by_content["id"], f"the word {token} is inside this message")
    await create_thread(client, user, title="Nothing to see")

    found = await list_threads(client, user, q=token)
    assert {t["id"] for t in found} == {by_title["id"], by_content["id"]}
    # Case-insensitive both ways.
    assert {t["id"] for t in await list_threads(client, user, q=token.upper())} == {
        by_title["id"],
        by_content["id"],
    }
    assert await list_threads(client, user, q=unique("absent")) == []
    # Search combines with the status filter.
    await client.patch(
        f"/v1/threads/{by_title['id']}", json={"status": "completed"}, headers=user.headers
    )
    assert [t["id"] for t in await list_threads(client, user, q=token, status="completed")] == [
        by_title["id"]
    ]


async def test_text_search_treats_wildcards_literally(client, make_user):
    user = await make_user()
    percent = await create_thread(client, user, title="We are 100% done")
    await create_thread(client, user, title="We are 1000 done")
    underscore = await create_thread(client, user, title="snake_case name")
    await create_thread(client, user, title="snakeXcase name")
    assert [t["id"] for t in await list_threads(client, user, q="100%")] == [percent["id"]]
    assert [t["id"] for t in await list_threads(client, user, q="e_c")] == [underscore["id"]]
    assert len(await list_threads(client, user, q="%")) == 1


async def test_invalid_thread_cursor_is_422(client, make_user):
    user = await make_user()
    await create_thread(client, user)
    for cursor in (
        "not a cursor!",
        "e30",  # base64 of {}
        _cursor(5),  # a message cursor
        _cursor("yesterday", "thr_x"),
        _cursor(1, 2, 3),
        _cursor(True, "thr_x"),
    ):
        response = await client.get("/v1/threads", params={"cursor": cursor}, headers=user.headers)
        assert response.status_code == 422, (cursor, response.text)
        assert error_code(response) == "invalid_cursor", cursor


async def test_cursor_with_a_date_without_timezone_is_422_not_a_500(client, make_user):
    """A hand-edited cursor is still just a malformed cursor."""
    user = await make_user()
    cursor = _cursor("2024-01-01T00:00:00", "thr_01J00000000000000000000000")
    response = await client.get("/v1/threads", params={"cursor": cursor}, headers=user.headers)
    assert_error(response, 422, "invalid_cursor")


async def test_invalid_list_limit_is_422(client, make_user):
    user = await make_user()
    for limit in (0, -1, 201, "ten"):
        response = await client.get("/v1/threads", params={"limit": limit}, headers=user.headers)
        assert response.status_code == 422, (limit, response.text)
        assert error_code(response) == "validation_error"
    ok = await client.get("/v1/threads", params={"limit": 200}, headers=user.headers)
    assert ok.status_code == 200


async def test_unknown_or_malformed_thread_id_is_404(client, make_user):
    user = await make_user()
    for thread_id in (
        "thr_01J00000000000000000000000",
        "nope",
        "thr_",
        "usr_01J00000000000000000000000",
        "0",
        "thr_01j00000000000000000000000",
    ):
        for method in ("GET", "PATCH", "DELETE"):
            response = await client.request(
                method,
                f"/v1/threads/{thread_id}",
                json={"title": "x"} if method == "PATCH" else None,
                headers=user.headers,
            )
            assert response.status_code == 404, (method, thread_id, response.text)
            assert error_code(response) == "thread_not_found"


# --- deletion ---------------------------------------------------------------------------------


async def test_soft_delete_archives_and_restore_brings_it_back(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user, title="keep me")
    await post_message(client, user, thread["id"], "history")

    deleted = await client.delete(f"/v1/threads/{thread['id']}", headers=user.headers)
    assert deleted.status_code == 204
    assert deleted.content == b""
    archived = await get_thread(client, user, thread["id"])
    assert archived["status"] == "archived"
    assert [t["id"] for t in await list_threads(client, user, status="archived")] == [thread["id"]]
    assert await list_threads(client, user, status="active") == []
    # An archived thread takes no new messages, but keeps its history.
    refused = await client.post(
        f"/v1/threads/{thread['id']}/messages", json={"content": "more"}, headers=user.headers
    )
    assert_error(refused, 409, "thread_archived")
    assert [m["content"] for m in await all_messages(client, user, thread["id"])] == ["history"]
    # Archiving again is harmless.
    assert (
        await client.delete(f"/v1/threads/{thread['id']}", headers=user.headers)
    ).status_code == 204

    restored = await client.patch(
        f"/v1/threads/{thread['id']}", json={"status": "active"}, headers=user.headers
    )
    assert restored.status_code == 200, restored.text
    assert restored.json()["status"] == "active"
    assert restored.json()["title"] == "keep me"
    message = await post_message(client, user, thread["id"], "back again")
    assert message["position"] == 2


async def test_hard_delete_removes_the_thread_and_its_messages(
    client, make_user, settings: Settings
):
    user = await make_user()
    doomed = await create_thread(client, user, title="doomed")
    survivor = await create_thread(client, user, title="survivor")
    for i in range(3):
        await post_message(client, user, doomed["id"], f"doomed {i}")
    await post_message(client, user, survivor["id"], "still here")
    assert await count_rows(settings.database_url, "messages", thread_id=doomed["id"]) == 3

    response = await client.delete(
        f"/v1/threads/{doomed['id']}", params={"permanent": "true"}, headers=user.headers
    )
    assert response.status_code == 204, response.text

    assert_error(
        await client.get(f"/v1/threads/{doomed['id']}", headers=user.headers),
        404,
        "thread_not_found",
    )
    assert_error(
        await client.get(f"/v1/threads/{doomed['id']}/messages", headers=user.headers),
        404,
        "thread_not_found",
    )
    assert [t["id"] for t in await list_threads(client, user)] == [survivor["id"]]
    assert await list_threads(client, user, q="doomed") == []
    # Nothing left behind in the database either.
    assert await count_rows(settings.database_url, "messages", thread_id=doomed["id"]) == 0
    assert await count_rows(settings.database_url, "threads", id=doomed["id"]) == 0
    assert await count_rows(settings.database_url, "messages", thread_id=survivor["id"]) == 1
    # Deleting it again: it is gone.
    again = await client.delete(
        f"/v1/threads/{doomed['id']}", params={"permanent": "true"}, headers=user.headers
    )
    assert_error(again, 404, "thread_not_found")


async def test_hard_delete_of_an_archived_thread(client, make_user, settings: Settings):
    user = await make_user()
    thread = await create_thread(client, user)
    await post_message(client, user, thread["id"], "x")
    await client.delete(f"/v1/threads/{thread['id']}", headers=user.headers)
    response = await client.delete(
        f"/v1/threads/{thread['id']}", params={"permanent": "true"}, headers=user.headers
    )
    assert response.status_code == 204
    assert await count_rows(settings.database_url, "threads", id=thread["id"]) == 0
    assert await count_rows(settings.database_url, "messages", thread_id=thread["id"]) == 0


async def test_delete_while_others_read_never_errors(client, make_user):
    user = await make_user()
    thread = await create_thread(client, user, title="read me while I go")
    for i in range(5):
        await post_message(client, user, thread["id"], f"m{i}")
    url = f"/v1/threads/{thread['id']}"
    deleted = asyncio.Event()
    readers = 8
    reading = asyncio.Semaphore(0)  # released once by each reader after its first read
    statuses: list[tuple[str, int, str]] = []

    async def reader(path: str) -> None:
        # Keep reading until a read after the delete has been seen.
        for attempt in range(200):
            was_deleted = deleted.is_set()
            response = await client.get(path, headers=user.headers)
            statuses.append((path, response.status_code, response.text[:200]))
            if attempt == 0:
                reading.release()
            if response.status_code == 404:
                assert error_code(response) == "thread_not_found"
            if was_deleted:
                return
            await asyncio.sleep(0)

    async def deleter() -> None:
        # Delete once every reader is under way, so the delete lands among their reads.
        async with asyncio.timeout(30):
            for _ in range(readers):
                await reading.acquire()
        response = await client.delete(url, params={"permanent": "true"}, headers=user.headers)
        assert response.status_code == 204, response.text
        deleted.set()

    async with asyncio.TaskGroup() as tg:
        for i in range(readers):
            tg.create_task(reader(url if i % 2 else f"{url}/messages"))
        tg.create_task(deleter())

    bad = [entry for entry in statuses if entry[1] not in (200, 404)]
    assert bad == [], bad
    assert any(code == 404 for _, code, _ in statuses)
    assert (await client.get(url, headers=user.headers)).status_code == 404
