"""Killing a connection mid-run loses nothing: a client that resumes from the last sequence
number it saw gets every later stored event exactly once (WebSocket `after_seq`, SSE
`Last-Event-ID`). The model is slowed down (`THREADLINE_DEMO_DELAY_SECONDS`) so that the cuts
happen while the run streams."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.sockets_support import (
    JSON,
    EventSocket,
    ServerProcess,
    SSEStream,
    User,
    assert_run_lifecycle,
    assert_strictly_increasing,
    compact,
    create_thread,
    durable,
    http_client,
    open_socket,
    open_sse,
    post_message,
    register,
    server_factory,
)
from tests.live_order import assert_in_place

pytestmark = pytest.mark.e2e
DELAY = 0.05
# The demo model echoes this back word by word: a long stream of deltas.
LONG_QUESTION = " ".join(f"word{n}" for n in range(24))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with server_factory(request.param, request, tmp_path_factory.mktemp("resume")) as start:
        yield start(demo_delay_seconds=DELAY)


async def _replay(sock: EventSocket, thread_id: str, after_seq: int) -> list[JSON]:
    """The stored events after `after_seq`: queued right behind the snapshot, so the pong that
    answers a ping sent after the subscribe closes the replay."""
    start = len(sock.messages)
    await sock.subscribe(thread_id, after_seq=after_seq)
    await sock.ping()
    return [m for m in sock.messages[start:] if m.get("thread_id") == thread_id and "seq" in m]


async def _stored_log(server: ServerProcess, user: User, thread_id: str, after: int) -> list[JSON]:
    async with open_socket(server, user.token) as sock:
        return await _replay(sock, thread_id, after)


def _deltas(events: list[JSON], run_id: str) -> int:
    return sum(1 for e in events if e["type"] == "message_delta" and e["run_id"] == run_id)


async def test_socket_killed_mid_run_resumes_without_loss(server: ServerProcess) -> None:
    async with asyncio.timeout(90), http_client(server) as http:
        user = await register(http)
        thread_id = await create_thread(http, user)
        connections: list[tuple[int, list[JSON]]] = []  # (after_seq, events received)

        async with open_socket(server, user.token) as first:
            start_seq = int((await first.subscribe(thread_id))["last_seq"])
            await first.send(
                {
                    "type": "send_message",
                    "thread_id": thread_id,
                    "content": LONG_QUESTION,
                    "agent": "demo",
                }
            )
            run_id = (await first.until_type("message_accepted"))["run_id"]
            await first.until(lambda m: _deltas(first.events, run_id) >= 2)
            first.abort()  # no close frame: the TCP connection is cut
        connections.append((start_seq, first.events))

        # Cut twice more, each time a few deltas after resuming; the last one runs to the end.
        done = False
        while not done:
            last_seq = max(int(e["seq"]) for e in connections[-1][1])
            async with open_socket(server, user.token) as sock:
                await sock.subscribe(thread_id, after_seq=last_seq)
                if len(connections) < 3:

                    def cut_here(message: JSON, sock: EventSocket = sock) -> bool:
                        return (
                            _deltas(sock.events, run_id) >= 3
                            or message.get("type") == "agent_completed"
                        )

                    await sock.until(cut_here)
                    done = any(e["type"] == "agent_completed" for e in sock.events)
                    sock.abort()
                else:
                    await sock.until_type("agent_completed", run_id=run_id)
                    done = True
            connections.append((last_seq, sock.events))

        log = await _stored_log(server, user, thread_id, start_seq)
        assert log == durable(log)
        assert log[-1]["type"] == "agent_completed" and log[-1]["run_id"] == run_id
        received: list[JSON] = []
        for after_seq, events in connections:
            assert events, f"a connection resumed after {after_seq} received nothing"
            # Durable events after `after_seq`; a delta may follow `after_seq` itself.
            assert_strictly_increasing(events, after_seq=after_seq)
            received += durable(events)
        # Every stored event exactly once, in order, across the four connections.
        assert compact(received) == compact(log)
        assert [e["data"] for e in received] == [e["data"] for e in log]
        assert_run_lifecycle(log, run_id)
        assert log[-1]["data"]["text"].startswith("You said:")


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
async def test_sse_reconnects_with_last_event_id_without_loss(server: ServerProcess) -> None:
    async with asyncio.timeout(90), http_client(server) as http:
        user = await register(http)
        thread_id = await create_thread(http, user)
        streams: list[tuple[int, list[JSON]]] = []

        async with open_sse(http, user, thread_id) as first:
            start_seq = int((await first.next())["data"]["last_seq"])
            run_id = (await post_message(http, user, thread_id, LONG_QUESTION, agent="demo"))[
                "run"
            ]["id"]
            await first.until(lambda f: _deltas(first.events, run_id) >= 2)
        streams.append((start_seq, first.events))

        while not any(e["type"] == "agent_completed" for e in streams[-1][1]):
            last_id = int(streams[-1][1][-1]["seq"])
            async with open_sse(http, user, thread_id, last_event_id=last_id) as stream:

                def cut_here(frame: JSON, stream: SSEStream = stream) -> bool:
                    return frame["event"] == "agent_completed" or (
                        len(streams) < 3 and _deltas(stream.events, run_id) >= 3
                    )

                await stream.until(cut_here)
            streams.append((last_id, stream.events))

        log = await _stored_log(server, user, thread_id, start_seq)
        received: list[JSON] = []
        for after_seq, events in streams:
            assert_strictly_increasing(events, after_seq=after_seq)
            received += durable(events)
        assert compact(received) == compact(log)
        assert len(streams) >= 2


async def _cut_and_resume_repeatedly(
    server: ServerProcess, user: User, thread_id: str, run_id: str
) -> list[tuple[int, list[JSON]]]:
    """Connect, resume from the last seq seen, take one event, cut; until the run ends."""
    connections: list[tuple[int, list[JSON]]] = []
    last_seq = 0
    while True:
        async with open_socket(server, user.token) as sock:
            await sock.subscribe(thread_id, after_seq=last_seq)
            await sock.until(lambda m: "seq" in m)
            sock.abort()
        connections.append((last_seq, sock.events))
        if any(e["type"] == "agent_completed" and e["run_id"] == run_id for e in sock.events):
            return connections
        last_seq = max(int(e["seq"]) for e in sock.events)


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
async def test_resuming_over_and_over_during_a_run_loses_nothing(server: ServerProcess) -> None:
    """Dozens of short-lived connections, each resuming where the previous one was cut, while
    the run publishes: every subscription races the publisher's transactions."""
    async with asyncio.timeout(100), http_client(server) as http:
        user = await register(http)
        thread_id = await create_thread(http, user)
        question = " ".join(f"w{n}" for n in range(30))
        run_id = (await post_message(http, user, thread_id, question, agent="demo"))["run"]["id"]
        connections = await _cut_and_resume_repeatedly(server, user, thread_id, run_id)
        log = await _stored_log(server, user, thread_id, 0)
        received: list[JSON] = []
        for after_seq, events in connections:
            assert_strictly_increasing(events, after_seq=after_seq)
            received += durable(events)
        assert compact(received) == compact(log), f"{len(connections)} connections"


async def test_deltas_arrive_in_place_on_a_socket_and_on_sse(server: ServerProcess) -> None:
    """A run's text deltas take no sequence number: on both transports they arrive between
    the durable events they belong between (after `agent_started`, before the answer's
    `message_created`), each carrying the seq of the durable event before it; the durable
    numbers have no gap, and the stored log the deltas are not part of replays without
    them."""
    async with asyncio.timeout(90), http_client(server) as http:
        user = await register(http)
        thread_id = await create_thread(http, user)
        async with (
            open_socket(server, user.token) as sock,
            open_sse(http, user, thread_id) as sse,
        ):
            start = int((await sock.subscribe(thread_id))["last_seq"])
            assert int((await sse.next())["data"]["last_seq"]) == start
            run_id = (await post_message(http, user, thread_id, LONG_QUESTION, agent="demo"))[
                "run"
            ]["id"]
            await sock.until_type("agent_completed", run_id=run_id)
            await sse.until(lambda f: f["event"] == "agent_completed")
        for events in (sock.events, sse.events):
            assert_in_place(events, after_seq=start)
            kinds = [e["type"] for e in events if e["run_id"] == run_id]
            deltas = [i for i, kind in enumerate(kinds) if kind == "message_delta"]
            assert len(deltas) >= 10, kinds  # the demo model streams word by word
            answer = kinds.index("message_created", deltas[0])
            assert kinds.index("agent_started") < deltas[0] and deltas[-1] < answer, kinds
            text = "".join(e["data"]["text"] for e in events if e["type"] == "message_delta")
            assert text == next(e for e in events if e["type"] == "agent_completed")["data"]["text"]
        # An SSE delta's id is its seq, the durable event it follows: resuming from it is right.
        assert all(int(f["id"]) == f["data"]["seq"] for f in sse.frames if f["id"] is not None)
        log = await _stored_log(server, user, thread_id, start)
        assert compact(log) == compact(durable(sock.events)) == compact(durable(sse.events))


FAR_BEHIND = 1100  # more stored events than two replay pages (500 each)


@pytest.fixture(scope="module")
def small_queue_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """SQLite, with a socket queue far smaller than a replay of FAR_BEHIND events."""
    with server_factory("sqlite", request, tmp_path_factory.mktemp("small-queue")) as start:
        yield start(socket_queue_size=64, messages_per_minute=100_000)


async def _long_thread(server: ServerProcess, http: httpx.AsyncClient) -> tuple[User, str]:
    """A thread of 1 + FAR_BEHIND stored events: plain messages (no run), pipelined over one
    socket, so it fills quickly."""
    user = await register(http)
    thread_id = await create_thread(http, user)
    async with open_socket(server, user.token) as writer:
        for n in range(FAR_BEHIND):
            await writer.send({"type": "send_message", "thread_id": thread_id, "content": f"m{n}"})
        accepted = 0

        def all_accepted(message: JSON) -> bool:
            nonlocal accepted
            assert message.get("type") != "error", message
            accepted += message.get("type") == "message_accepted"
            return accepted == FAR_BEHIND

        await writer.until(all_accepted, within=90)
    return user, thread_id


async def _update_title(http: httpx.AsyncClient, user: User, thread_id: str) -> None:
    response = await http.patch(
        f"/v1/threads/{thread_id}", json={"title": "live"}, headers=user.headers
    )
    assert response.status_code == 200, response.text


def assert_every_seq(seqs: list[int], last_seq: int) -> None:
    missing = sorted(set(range(1, last_seq + 1)) - set(seqs))
    assert not missing, f"{len(missing)} events never arrived: {missing[:3]}...{missing[-3:]}"
    assert seqs == list(range(1, last_seq + 1))


async def test_resuming_from_far_behind_gets_every_event(
    small_queue_server: ServerProcess,
) -> None:
    server = small_queue_server
    async with asyncio.timeout(100), http_client(server) as http:
        user, thread_id = await _long_thread(server, http)
        last_seq = 1 + FAR_BEHIND  # thread_created, then one message_created each
        async with open_socket(server, user.token) as reader:
            snapshot = await reader.subscribe(thread_id, after_seq=0)
            assert snapshot["last_seq"] == last_seq
            await _update_title(http, user, thread_id)
            await reader.until_type("thread_updated", thread_id=thread_id)
        assert_every_seq([int(e["seq"]) for e in reader.events], last_seq + 1)


async def test_sse_resuming_from_far_behind_gets_every_event(
    small_queue_server: ServerProcess,
) -> None:
    server = small_queue_server
    async with asyncio.timeout(100), http_client(server) as http:
        user, thread_id = await _long_thread(server, http)
        last_seq = 1 + FAR_BEHIND
        async with open_sse(http, user, thread_id, last_event_id=0) as stream:
            snapshot = await stream.next()
            assert (snapshot["event"], snapshot["data"]["last_seq"]) == ("snapshot", last_seq)
            await _update_title(http, user, thread_id)
            await stream.until(lambda f: f["event"] == "thread_updated", within=60)
        assert_every_seq([int(e["seq"]) for e in stream.events], last_seq + 1)
