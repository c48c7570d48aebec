"""Under load, several events go out as one `{"type": "batch", "events": [...]}` frame, and
batching never reorders: inside a batch and from one frame to the next, a thread's sequence
numbers only go up.

Load here means events arriving faster than the client takes them. On loopback a reading
client keeps up with any event rate, so the tests make the backlog happen: a client that pauses
reading while the thread is flooded (its socket buffers fill, the server's writer waits, events
queue up), and a replay of many stored events, queued as fast as the client takes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.sockets_support import (
    JSON,
    EventSocket,
    ServerProcess,
    User,
    assert_strictly_increasing,
    create_thread,
    http_client,
    metrics,
    open_socket,
    open_stalling_socket,
    post_message,
    register,
    server_factory,
)

pytestmark = pytest.mark.e2e
MAX_BATCH = 64  # events per batch frame (api/live/gateway.py)
BIG = 400_000
MAX_BIG_MESSAGES = 80  # 32 MB: far more than the socket buffers to a stalled reader hold
UPDATES = 120


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with server_factory("sqlite", request, tmp_path_factory.mktemp("batching")) as start:
        yield start(messages_per_minute=100_000, max_message_chars=BIG + 1000)


async def _update_title(http: httpx.AsyncClient, user: User, thread_id: str, n: int) -> None:
    response = await http.patch(
        f"/v1/threads/{thread_id}", json={"title": f"title {n}"}, headers=user.headers
    )
    assert response.status_code == 200, response.text


async def _fill_the_pipe(http: httpx.AsyncClient, user: User, thread_id: str) -> int:
    """Post large messages until the server's writer to the (only) stalled subscriber is stuck:
    it has delivered at least three fewer events than were posted. Returns how many."""
    before = (await metrics(http))["threadline_events_delivered_total"]
    for posted in range(1, MAX_BIG_MESSAGES + 1):
        await post_message(http, user, thread_id, f"{posted:03d}" + "y" * BIG)
        delivered = (await metrics(http))["threadline_events_delivered_total"] - before
        if posted - delivered >= 3:
            return posted
    raise AssertionError(f"the writer never fell behind in {MAX_BIG_MESSAGES} large messages")


def _check_frames(frames: list[JSON]) -> list[JSON]:
    """Every batch holds 2..MAX_BATCH messages; returns the batch frames."""
    batches = [f for f in frames if f["type"] == "batch"]
    for batch in batches:
        assert 2 <= len(batch["events"]) <= MAX_BATCH, len(batch["events"])
        assert all(e["type"] != "batch" for e in batch["events"])
    return batches


def _flatten(frames: list[JSON]) -> list[JSON]:
    out: list[JSON] = []
    for frame in frames:
        out.extend(frame["events"] if frame["type"] == "batch" else [frame])
    return out


async def test_backlog_goes_out_in_ordered_batches(server: ServerProcess) -> None:
    async with asyncio.timeout(100), http_client(server) as http:
        user = await register(http)
        thread_id = await create_thread(http, user)
        # Frames of several large messages are big: lift the client's 1 MiB frame limit (see
        # test_batch_frames_stay_small_enough_for_default_clients).
        async with open_stalling_socket(server, user.token, max_size=None) as sock:
            start_seq = int((await sock.subscribe(thread_id))["last_seq"])
            first_frame = len(sock.frames)
            # While the client reads nothing: large messages fill the pipe, then a burst of
            # small updates from several writers at once piles up in the server's queue.
            big_messages = await _fill_the_pipe(http, user, thread_id)
            for start in range(0, UPDATES, 4):
                await asyncio.gather(
                    *(_update_title(http, user, thread_id, n) for n in range(start, start + 4))
                )
            # Reading again: everything arrives, the backlog in batch frames.
            last_title = f"title {UPDATES - 1}"
            await sock.until(
                lambda m: m.get("type") == "thread_updated" and m["data"]["title"] == last_title,
                within=60,
            )
            await sock.ping()
            assert sock.ws.close_code is None
        frames = sock.frames[first_frame:]
        batches = _check_frames(frames)
        assert batches, f"no batch frame among {len(frames)} frames"
        events = [m for m in _flatten(frames) if "seq" in m]
        # No reordering, no gap, no duplicate, across and inside frames.
        assert_strictly_increasing(events)
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(start_seq + 1, start_seq + 1 + big_messages + UPDATES))
        titles = [e["data"]["title"] for e in events if e["type"] == "thread_updated"]
        assert len(titles) == UPDATES and len(set(titles)) == UPDATES
        # The batches carry the small updates, several per frame.
        batched = [e for b in batches for e in b["events"] if e.get("type") == "thread_updated"]
        assert len(batched) >= 2


async def test_replay_of_many_events_is_batched_in_order(server: ServerProcess) -> None:
    async with asyncio.timeout(100), http_client(server) as http:
        user = await register(http)
        thread_id = await create_thread(http, user)
        for start in range(0, 130, 5):
            await asyncio.gather(
                *(_update_title(http, user, thread_id, n) for n in range(start, start + 5))
            )
        async with open_socket(server, user.token) as sock:
            await sock.subscribe(thread_id, after_seq=0)
            await sock.ping()
            # and a live event right behind the replay
            await _update_title(http, user, thread_id, 999)
            await sock.until(lambda m: m.get("type") == "thread_updated" and m["seq"] == 132)
        frames = sock.frames[1:]  # after `authenticated`
        batches = _check_frames(frames)
        assert len(batches) >= 3, [f["type"] for f in frames]  # snapshot + 131 replayed
        assert batches[0]["events"][0]["type"] == "snapshot"
        events = [m for m in _flatten(frames) if "seq" in m]
        assert_strictly_increasing(events)
        assert [e["seq"] for e in events] == list(range(1, 133))
        assert events[-1]["data"]["title"] == "title 999"


async def test_live_events_of_many_threads_stay_in_order(server: ServerProcess) -> None:
    """Several runs and a burst of updates at once on one socket: whichever way the server
    frames them, each thread's events keep their order."""
    async with asyncio.timeout(100), http_client(server) as http:
        user = await register(http)
        threads = [await create_thread(http, user, f"t{n}") for n in range(6)]
        async with open_socket(server, user.token) as sock:
            for thread_id in threads:
                await sock.subscribe(thread_id)
            await asyncio.gather(
                *(post_message(http, user, t, "what is 12*7?", agent="demo") for t in threads),
                *(_update_title(http, user, threads[0], n) for n in range(30)),
            )

            def all_done(_: JSON, sock: EventSocket = sock) -> bool:
                return sum(1 for m in sock.messages if m.get("type") == "agent_completed") >= 6

            await sock.until(all_done, within=60)
        _check_frames(sock.frames)
        assert_strictly_increasing(sock.events)
        by_thread = {t: [e for e in sock.events if e["thread_id"] == t] for t in threads}
        for thread_id, events in by_thread.items():
            assert events[-1]["type"] in ("agent_completed", "thread_updated"), thread_id


async def test_batch_frames_stay_small_enough_for_default_clients(server: ServerProcess) -> None:
    async with asyncio.timeout(100), http_client(server) as http:
        user = await register(http)
        thread_id = await create_thread(http, user)
        for n in range(40):  # 40 messages of the default maximum size (32,000 characters)
            await post_message(http, user, thread_id, f"{n:03d}" + "z" * 31_990)
        async with open_socket(server, user.token) as sock:  # the client's default max_size
            try:
                await sock.subscribe(thread_id, after_seq=0)
                await sock.ping()
            except ConnectionClosed as closed:
                raise AssertionError(
                    f"the replay broke the client's frame limit: {closed}"
                ) from None
        assert [e["seq"] for e in sock.events] == list(range(1, 42))
