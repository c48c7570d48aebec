"""Per-user isolation with many users acting at once (C1): another user's thread behaves exactly
like one that does not exist, on every endpoint, in every list, search and filter."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import TestUser
from tests.integration._support import (
    all_messages,
    create_thread,
    error_code,
    get_thread,
    list_threads,
    post_message,
    unique,
)
from threadline.ids import IdPrefix, new_id

pytestmark = pytest.mark.integration

USERS = 20
# Headers that legitimately differ between any two responses.
_VOLATILE_HEADERS = {"x-request-id", "date"}
THREAD_FIELDS = ("id", "title", "status", "metadata", "version", "message_count")


@dataclass(frozen=True)
class Actor:
    user: TestUser
    tag: str
    threads: list[dict[str, Any]]


async def _populate(client: httpx.AsyncClient, make_user) -> list[Actor]:
    """Every user signs up, opens two threads and writes in them, all at the same time."""

    async def act(i: int) -> Actor:
        user = await make_user()
        tag = unique("tag")
        first = await create_thread(
            client, user, title=f"{tag} first", metadata={"owner_tag": tag, "n": i}
        )
        second = await create_thread(client, user, metadata={"owner_tag": tag})
        await post_message(client, user, first["id"], f"secret content of {tag}")
        await post_message(client, user, second["id"], f"words about {tag} here")
        await post_message(client, user, second["id"], "a second message")
        threads = [await get_thread(client, user, t["id"]) for t in (first, second)]
        return Actor(user, tag, threads)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(act(i)) for i in range(USERS)]
    return [task.result() for task in tasks]


def _attacks(thread_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """One request per endpoint that takes a thread id, as (method, path, request kwargs)."""
    base = f"/v1/threads/{thread_id}"
    return [
        ("GET", base, {}),
        ("PATCH", base, {"json": {"title": "hijacked", "metadata": {"owner_tag": None}}}),
        ("PATCH", base, {"json": {"status": "archived"}, "headers": {"If-Match": '"1"'}}),
        ("DELETE", base, {}),
        ("DELETE", base, {"params": {"permanent": "true"}}),
        ("POST", f"{base}/messages", {"json": {"content": "injected"}}),
        ("GET", f"{base}/messages", {}),
        ("GET", f"{base}/messages", {"params": {"order": "desc", "limit": 1}}),
    ]


async def _send(
    client: httpx.AsyncClient, user: TestUser, method: str, path: str, kwargs: dict[str, Any]
) -> httpx.Response:
    headers = {**user.headers, **kwargs.get("headers", {})}
    rest = {k: v for k, v in kwargs.items() if k != "headers"}
    return await client.request(method, path, headers=headers, **rest)


def _shape(response: httpx.Response) -> tuple[int, Any, set[str]]:
    headers = {name.lower() for name in response.headers} - _VOLATILE_HEADERS
    return response.status_code, response.json(), headers


async def test_another_users_thread_is_a_404_like_a_missing_one_on_every_endpoint(
    client, make_user
):
    actors = await _populate(client, make_user)
    missing_id = new_id(IdPrefix.THREAD)  # well-formed, never stored

    async def attack(attacker: Actor, victim: Actor) -> list[str]:
        problems = []
        for method, path, kwargs in _attacks(victim.threads[0]["id"]):
            foreign = await _send(client, attacker.user, method, path, kwargs)
            nothing = await _send(
                client,
                attacker.user,
                method,
                path.replace(victim.threads[0]["id"], missing_id),
                kwargs,
            )
            if foreign.status_code != 404 or error_code(foreign) != "thread_not_found":
                problems.append(f"{method} {path}: {foreign.status_code} {foreign.text}")
            elif _shape(foreign) != _shape(nothing):
                problems.append(f"{method} {path}: {_shape(foreign)} != {_shape(nothing)}")
        return problems

    async with asyncio.TaskGroup() as tg:
        tasks = [
            tg.create_task(attack(actor, actors[(i + 1) % USERS])) for i, actor in enumerate(actors)
        ]
    problems = [problem for task in tasks for problem in task.result()]
    assert problems == []

    # None of those requests changed anything: every owner still sees exactly what they made.
    for actor in actors:
        for before in actor.threads:
            after = await get_thread(client, actor.user, before["id"])
            assert {k: after[k] for k in THREAD_FIELDS} == {k: before[k] for k in THREAD_FIELDS}
        messages = await all_messages(client, actor.user, actor.threads[0]["id"])
        assert [m["content"] for m in messages] == [f"secret content of {actor.tag}"]


async def test_a_users_list_and_search_show_only_their_own_threads(client, make_user):
    actors = await _populate(client, make_user)

    async def check(i: int, actor: Actor) -> None:
        own = {t["id"] for t in actor.threads}
        assert {t["id"] for t in await list_threads(client, actor.user)} == own
        assert {t["id"] for t in await list_threads(client, actor.user, limit=1)} == own
        # Search by the user's own tag finds both threads: one by title, one by message content.
        assert {t["id"] for t in await list_threads(client, actor.user, q=actor.tag)} == own
        # A text that only another user's thread contains finds nothing (title nor content).
        other = actors[(i + 1) % USERS]
        assert await list_threads(client, actor.user, q=other.tag) == []
        # Text every user wrote still only finds the searcher's own thread.
        by_content = await list_threads(client, actor.user, q="secret content of")
        assert [t["id"] for t in by_content] == [actor.threads[0]["id"]]
        found = await list_threads(client, actor.user, q="a second message")
        assert [t["id"] for t in found] == [actor.threads[1]["id"]]

    async with asyncio.TaskGroup() as tg:
        for i, actor in enumerate(actors):
            tg.create_task(check(i, actor))


async def test_a_metadata_filter_shows_only_the_users_own_threads(client, make_user):
    actors = await _populate(client, make_user)

    async def check(i: int, actor: Actor) -> None:
        own = {t["id"] for t in actor.threads}
        mine = await list_threads(client, actor.user, metadata=json.dumps({"owner_tag": actor.tag}))
        assert {t["id"] for t in mine} == own
        other = actors[(i + 1) % USERS]
        theirs = await list_threads(
            client, actor.user, metadata=json.dumps({"owner_tag": other.tag})
        )
        assert theirs == []
        # Every user has a thread with "n": their index; only their own matches.
        by_number = await list_threads(client, actor.user, metadata=json.dumps({"n": i}))
        assert [t["id"] for t in by_number] == [actor.threads[0]["id"]]

    async with asyncio.TaskGroup() as tg:
        for i, actor in enumerate(actors):
            tg.create_task(check(i, actor))


async def test_a_user_id_forged_in_the_body_or_query_is_ignored(client, make_user):
    alice = await make_user()
    bob = await make_user()
    bobs = await create_thread(client, bob, title="bob's")

    forged = await client.post(
        "/v1/threads", json={"title": "forged", "user_id": bob.id}, headers=alice.headers
    )
    assert forged.status_code == 201, forged.text
    thread_id = forged.json()["id"]
    assert "user_id" not in forged.json() or forged.json()["user_id"] == alice.id
    # It belongs to the token's user, alice: bob cannot see it, alice can.
    assert (await client.get(f"/v1/threads/{thread_id}", headers=bob.headers)).status_code == 404
    assert [t["id"] for t in await list_threads(client, bob)] == [bobs["id"]]
    assert (await get_thread(client, alice, thread_id))["title"] == "forged"

    # Forged in the query string of a list: alice still sees only her own threads.
    listed = await list_threads(client, alice, user_id=bob.id)
    assert [t["id"] for t in listed] == [thread_id]
    read = await client.get(
        f"/v1/threads/{bobs['id']}", params={"user_id": bob.id}, headers=alice.headers
    )
    assert read.status_code == 404

    # Forged in a message body or a patch: nothing moves to bob, nothing reaches bob's thread.
    await post_message(client, alice, thread_id, "mine", user_id=bob.id)
    patched = await client.patch(
        f"/v1/threads/{thread_id}",
        json={"title": "still mine", "user_id": bob.id},
        headers=alice.headers,
    )
    assert patched.status_code == 200, patched.text
    assert (await client.get(f"/v1/threads/{thread_id}", headers=bob.headers)).status_code == 404
    into_bobs = await client.post(
        f"/v1/threads/{bobs['id']}/messages",
        json={"content": "sneaky", "user_id": bob.id},
        headers=alice.headers,
    )
    assert into_bobs.status_code == 404
    assert await all_messages(client, bob, bobs["id"]) == []
    assert [m["content"] for m in await all_messages(client, alice, thread_id)] == ["mine"]
