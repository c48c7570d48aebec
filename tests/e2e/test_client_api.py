"""The Python client (`threadline.client`) against a real `threadline serve` process: every
call, typed results, errors with the API's code and status, `ask()`, async and sync."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Literal

import pytest

from tests.e2e.client_support import PASSWORD, new_email, new_user
from tests.e2e.sockets_support import ServerProcess, free_port, server_factory
from threadline.client import (
    APIConnectionError,
    APIError,
    AsyncThreadline,
    EventType,
    MessageRole,
    RunStatus,
    Threadline,
    ThreadOut,
    ThreadStatus,
)

pytestmark = pytest.mark.e2e
MESSAGES_PER_MINUTE = 8


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with server_factory("sqlite", request, tmp_path_factory.mktemp("client")) as start:
        yield start(messages_per_minute=MESSAGES_PER_MINUTE)


async def test_identity_calls(server: ServerProcess) -> None:
    async with asyncio.timeout(60), AsyncThreadline(server.base_url) as client:
        email = new_email()
        user = await client.register(email, PASSWORD)
        assert user.email == email and user.id.startswith("usr_")
        issued = await client.login(email, PASSWORD)
        assert issued.token_type == "bearer" and issued.expires_in > 0
        assert client.token == issued.access_token
        assert (await client.me()).id == user.id
        assert (await client.health()).status == "ok"
        ready = await client.ready()
        assert ready.status == "ok" and ready.checks["database"] == "ok"
        [demo] = [a for a in await client.agents() if a.name == "demo"]
        assert {t.name for t in demo.tools} >= {"calculator", "clock"}

        token = client.token
        await client.logout()
        assert client.token is None
        client.token = token
        with pytest.raises(APIError) as revoked:
            await client.me()
        assert (revoked.value.status, revoked.value.code) == (401, "token_revoked")


async def test_thread_calls(server: ServerProcess) -> None:
    async with asyncio.timeout(60), new_user(server.base_url) as client:
        first = await client.create_thread(title="Apollo notes", metadata={"project": "apollo"})
        assert isinstance(first, ThreadOut) and first.status is ThreadStatus.ACTIVE
        assert (await client.get_thread(first.id)) == first
        others = [await client.create_thread(title=f"other {n}") for n in range(4)]

        page = await client.list_threads(limit=2)
        assert len(page.data) == 2 and page.next_cursor is not None
        every = [t.id async for t in client.iter_threads(page_size=2)]
        assert every == [t.id for t in reversed([first, *others])]  # newest activity first
        by_metadata = await client.list_threads(metadata={"project": "apollo"})
        assert [t.id for t in by_metadata.data] == [first.id]
        assert [t.id for t in (await client.list_threads(q="Apollo")).data] == [first.id]

        renamed = await client.update_thread(first.id, title="Apollo", metadata={"n": 1})
        assert renamed.title == "Apollo" and renamed.metadata == {"project": "apollo", "n": 1}
        with pytest.raises(APIError) as conflict:
            await client.update_thread(first.id, title="late", expected_version=first.version)
        assert (conflict.value.status, conflict.value.code) == (409, "thread_version_conflict")
        cleared = await client.update_thread(first.id, title=None)
        assert cleared.title is None

        await client.archive_thread(first.id)
        archived = await client.list_threads(status=ThreadStatus.ARCHIVED)
        assert [t.id for t in archived.data] == [first.id]
        assert (await client.restore_thread(first.id)).status is ThreadStatus.ACTIVE
        with pytest.raises(APIError) as transition:
            await client.update_thread(others[0].id, status="archived")
            await client.update_thread(others[0].id, status="completed")
        assert (transition.value.status, transition.value.code) == (
            409,
            "invalid_status_transition",
        )

        await client.delete_thread(first.id)
        with pytest.raises(APIError) as gone:
            await client.get_thread(first.id)
        assert (gone.value.status, gone.value.code) == (404, "thread_not_found")


async def test_message_and_run_calls(server: ServerProcess) -> None:
    async with asyncio.timeout(90), new_user(server.base_url) as client:
        thread = await client.create_thread()
        note = await client.post_message(thread.id, "just a note", metadata={"k": "v"})
        assert note.run is None and note.role is MessageRole.USER and note.metadata == {"k": "v"}
        assert (await client.get_thread(thread.id)).title == "just a note"

        result = await client.ask(thread.id, "what is 12*7?", agent="demo")
        assert result.ok and result.status is RunStatus.COMPLETED
        assert result.text == "12*7 = 84."
        [tool] = result.tool_calls
        assert tool.data["tool"] == "calculator" and tool.data["result"] == "84"
        kinds = [e.type for e in result.events]
        assert kinds[-1] == EventType.AGENT_COMPLETED and EventType.TOOL_EXECUTING in kinds
        # Durable events are numbered one by one; a delta carries the seq of the durable
        # event it follows (docs/events.md), so seqs never go down.
        durable = [e.seq for e in result.events if e.type != EventType.MESSAGE_DELTA]
        assert durable == sorted(set(durable))
        assert [e.seq for e in result.events] == sorted(e.seq for e in result.events)

        run = await client.create_run(thread.id, "demo")
        assert run.status in (RunStatus.QUEUED, RunStatus.RUNNING) and run.agent == "demo"
        runs = await client.list_runs(thread.id, limit=1)
        assert len(runs.data) == 1 and runs.next_cursor is not None
        ids = {r.id for r in (await client.list_runs(thread.id)).data}
        assert ids == {run.id, result.run.id}
        assert (await client.get_run(thread.id, result.run.id)).result is not None
        finished = await client.cancel_run(thread.id, result.run.id)
        assert finished.status is RunStatus.COMPLETED  # a finished run is returned unchanged

        history = [m async for m in client.iter_messages(thread.id, page_size=2)]
        assert [m.position for m in history] == sorted(m.position for m in history)
        assert history[0].content == "just a note"
        assert any(m.role is MessageRole.TOOL and m.content == "84" for m in history)
        newest = await client.list_messages(thread.id, limit=1, order="desc")
        assert newest.data[0].position == history[-1].position


async def test_errors_carry_code_and_status(server: ServerProcess) -> None:
    async with asyncio.timeout(60), new_user(server.base_url) as alice:
        anonymous = AsyncThreadline(server.base_url)
        async with anonymous, new_user(server.base_url) as bob:
            email = (await alice.me()).email
            cases = [
                (anonymous.register(email, PASSWORD), 409, "email_taken"),
                (anonymous.login(email, "not the password"), 401, "wrong_password"),
                (anonymous.login(new_email(), PASSWORD), 401, "unknown_user"),
                (anonymous.me(), 401, "not_authenticated"),
                (alice.create_run("thr_00000000000000000000000000", "demo"), 404, None),
                (alice.post_message("thr_x", "hi", agent="demo"), 404, "thread_not_found"),
            ]
            bobs = await bob.create_thread(title="bob's")
            cases += [
                (alice.get_thread(bobs.id), 404, "thread_not_found"),  # never 403
                (alice.post_message(bobs.id, "hi"), 404, "thread_not_found"),
                (alice.create_run((await alice.create_thread()).id, "nobody"), 422, None),
            ]
            for call, status, code in cases:
                with pytest.raises(APIError) as raised:
                    await call
                assert raised.value.status == status, raised.value
                if code is not None:
                    assert raised.value.code == code, raised.value
                assert raised.value.message

            thread = await alice.create_thread()
            with pytest.raises(APIError) as limited:
                for n in range(MESSAGES_PER_MINUTE + 1):
                    await alice.post_message(thread.id, f"message {n}")
            assert (limited.value.status, limited.value.code) == (429, "rate_limited")
            assert limited.value.retry_after is not None and limited.value.retry_after > 0

    async with AsyncThreadline(server.base_url, token="not-a-token") as forged:
        for transport in ("websocket", "sse"):
            with pytest.raises(APIError) as refused:
                async with forged.events(bobs.id, transport=transport):
                    pass
            assert refused.value.status == 401, (transport, refused.value)
    async with new_user(server.base_url) as carol:
        for transport in ("websocket", "sse"):
            with pytest.raises(APIError) as hidden:
                async with carol.events(bobs.id, transport=transport):
                    pass
            assert (hidden.value.status, hidden.value.code) == (404, "thread_not_found")

    nowhere = AsyncThreadline(f"http://127.0.0.1:{free_port()}", token="t", timeout=5)
    async with nowhere:
        with pytest.raises(APIConnectionError):
            await nowhere.health()
        for transport in ("websocket", "sse"):
            with pytest.raises(APIConnectionError):
                async with nowhere.events("thr_x", transport=transport):
                    pass


def test_sync_client(server: ServerProcess) -> None:
    with Threadline(server.base_url, timeout=30) as client:
        email = new_email("sync")
        client.register(email, PASSWORD)
        client.login(email, PASSWORD)
        assert client.me().email == email
        thread = client.create_thread(title="sync")
        result = client.ask(thread.id, "what is 2+3?", agent="demo", timeout=60)
        assert result.ok and result.text == "2+3 = 5."
        history = list(client.iter_messages(thread.id))
        assert history[0].content == "what is 2+3?" and history[-1].content == "2+3 = 5."
        assert [t.id for t in client.iter_threads()] == [thread.id]

        for transport in ("websocket", "sse"):
            with client.events(thread.id, after_seq=0, transport=transport) as stream:
                replayed = []
                for event in stream:
                    replayed.append(event)
                    if event.type == EventType.AGENT_COMPLETED:
                        break
            assert replayed[0].type == EventType.THREAD_CREATED and replayed[0].seq == 1
            assert stream.last_seq[thread.id] == replayed[-1].seq

        with pytest.raises(APIError) as missing:
            client.get_run(thread.id, "run_nope")
        assert (missing.value.status, missing.value.code) == (404, "run_not_found")
        client.delete_thread(thread.id)
        assert client.list_threads().data == []


async def test_one_socket_follows_several_threads(server: ServerProcess) -> None:
    async with asyncio.timeout(60), new_user(server.base_url) as client:
        first, second = await client.create_thread(), await client.create_thread()
        async with client.socket(first.id) as live:
            snapshot = await live.subscribe(second.id)
            assert snapshot.thread_id == second.id and snapshot.active_run is None
            asked = [
                await client.post_message(thread.id, "what is 1+1?", agent="demo")
                for thread in (first, second)
            ]
            finished: set[str] = set()
            async for event in live:
                if event.terminal:
                    finished.add(event.thread_id)
                if finished == {first.id, second.id}:
                    break
            assert set(live.last_seq) == {first.id, second.id}
            assert all(posted.run is not None for posted in asked)

            await live.unsubscribe(first.id)
            await client.post_message(first.id, "quiet, please")
            await client.post_message(second.id, "still listening")
            event = await anext(live)
            while event.type != EventType.MESSAGE_CREATED:
                event = await anext(live)
            assert (event.thread_id, event.data["content"]) == (second.id, "still listening")


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_logout_ends_open_streams(
    server: ServerProcess, transport: Literal["websocket", "sse"]
) -> None:
    """A token revoked while its stream is open ends the stream with an `APIError`, not
    a resume loop."""
    async with asyncio.timeout(60), new_user(server.base_url) as client:
        thread = await client.create_thread()
        same_token = AsyncThreadline(server.base_url, token=client.token)
        async with same_token, client.events(thread.id, transport=transport) as stream:
            await same_token.logout()
            with pytest.raises(APIError) as ended:
                async for _event in stream:
                    pass
        assert (ended.value.status, ended.value.code) == (401, "token_revoked"), ended.value
