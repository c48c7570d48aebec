"""A consumer that stops reading is cut off with close code 4008 (resume) once its bounded
queue overflows, while another consumer of the same thread gets everything; the cut-off client
then catches up by resuming from its last sequence number, and a client that never reads again
is let go without its help.

The slow client pauses reading for real: a small TCP receive buffer, no compression (so the
bytes it is sent are the bytes of the events) and a one-frame read-ahead in the client library.
Even so, the kernel's send buffer absorbs megabytes, so the test floods the thread with large
messages until the server reports dropped events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.sockets_support import (
    JSON,
    EventSocket,
    ServerProcess,
    User,
    assert_run_lifecycle,
    assert_strictly_increasing,
    compact,
    create_thread,
    durable,
    http_client,
    in_background,
    metrics,
    open_socket,
    open_stalling_socket,
    post_message,
    register,
    server_factory,
    wait_for_metrics,
)
from tests.live_order import assert_in_place

pytestmark = pytest.mark.e2e
QUEUE_SIZE = 8
BIG = 400_000  # characters per flooding message
MAX_FLOOD = 80  # 32 MB: far beyond any socket buffer
QUESTION = "what is 12*7?"


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with server_factory("sqlite", request, tmp_path_factory.mktemp("slow")) as start:
        yield start(
            socket_queue_size=QUEUE_SIZE,
            messages_per_minute=100_000,
            max_message_chars=BIG + 1000,
            demo_delay_seconds=0.01,
        )


async def _flood_until_dropped(http: httpx.AsyncClient, user: User, thread_id: str) -> int:
    """Post large messages until the server drops events for a connection; return how many
    were posted."""
    before = (await metrics(http))["threadline_events_dropped_total"]
    for posted in range(1, MAX_FLOOD + 1):
        await post_message(http, user, thread_id, f"{posted:04d}" + "x" * BIG)
        samples = await metrics(http)
        if samples["threadline_events_dropped_total"] > before:
            return posted
    raise AssertionError(f"no event dropped after {MAX_FLOOD} large messages: {samples}")


async def _replay(sock: EventSocket, thread_id: str, after_seq: int) -> list[JSON]:
    start = len(sock.messages)
    try:
        await sock.subscribe(thread_id, after_seq=after_seq)
        await sock.ping()  # the replay is queued right behind the snapshot, so the pong ends it
    except ConnectionClosed as closed:
        raise AssertionError(f"closed while resuming after {after_seq}: {closed}") from closed
    return [m for m in sock.messages[start:] if m.get("thread_id") == thread_id and "seq" in m]


def assert_contiguous(events: list[JSON], after_seq: int) -> None:
    """A live consumer sees every durable number, and each ephemeral delta (not numbered)
    right after the durable event it follows."""
    assert_in_place(events, after_seq=after_seq)


@dataclass
class CutOff:
    user: User
    thread_id: str
    start_seq: int
    steady: list[JSON]
    """Everything the steady consumer received: the reference."""
    stalled: list[JSON]
    """What the stalled consumer received before it was closed."""
    close_code: int | None


async def _cut_off(server: ServerProcess, http: httpx.AsyncClient) -> CutOff:
    """One consumer stalls while the thread is flooded and a run answers; another reads on."""
    user = await register(http)
    thread_id = await create_thread(http, user)
    async with (
        open_socket(server, user.token) as steady,
        open_stalling_socket(server, user.token) as stalled,
    ):
        start_seq = int((await steady.subscribe(thread_id))["last_seq"])
        assert (await stalled.subscribe(thread_id))["last_seq"] == start_seq
        # From here on `stalled` reads nothing, while `steady` reads all the time.
        async with in_background(steady.until_type("agent_completed", within=90)) as watching:
            flooded = await _flood_until_dropped(http, user, thread_id)
            await steady.send(
                {
                    "type": "send_message",
                    "thread_id": thread_id,
                    "content": QUESTION,
                    "agent": "demo",
                }
            )
            completed = await watching
        # The steady consumer got to the end while the stalled one was still stalled.
        assert stalled.ws.close_code is None
        flood = [
            e
            for e in steady.events
            if e["type"] == "message_created" and e["data"]["role"] == "user"
        ]
        assert len(flood) == flooded + 1
        assert_run_lifecycle(steady.events, completed["run_id"])
        # Reading again, the stalled client gets what was already on its way, then the close.
        closed = await stalled.drain_until_closed(within=60)
        code = closed.rcvd.code if closed.rcvd is not None else None
        return CutOff(user, thread_id, start_seq, steady.events, stalled.events, code)


async def test_slow_consumer_is_cut_off_with_4008_while_another_gets_everything(
    server: ServerProcess,
) -> None:
    async with asyncio.timeout(100), http_client(server) as http:
        cut = await _cut_off(server, http)
        assert cut.close_code == 4008
        # The steady consumer of the same thread received every event, in order, no gap.
        assert_strictly_increasing(cut.steady)
        assert_contiguous(cut.steady, cut.start_seq)
        assert cut.steady[-1]["type"] == "agent_completed"
        # What the stalled one got before the cut is a gap-free prefix of the same stream.
        assert cut.stalled, "the stalled consumer got nothing at all"
        assert cut.stalled == cut.steady[: len(cut.stalled)]
        assert len(cut.stalled) < len(cut.steady)
        samples = await metrics(http)
        assert samples["threadline_events_dropped_total"] > 0
        await wait_for_metrics(http, lambda s: s["threadline_sockets_active"] == 0)


async def test_cut_off_consumer_catches_up_by_resuming(server: ServerProcess) -> None:
    async with asyncio.timeout(100), http_client(server) as http:
        cut = await _cut_off(server, http)
        assert cut.close_code == 4008
        last_seq = int(cut.stalled[-1]["seq"])
        async with open_socket(server, cut.user.token) as resumed:
            rest = await _replay(resumed, cut.thread_id, last_seq)
            assert resumed.ws.close_code is None, (resumed.ws.close_code, rest)
        expected = [e for e in durable(cut.steady) if int(e["seq"]) > last_seq]
        assert compact(rest) == compact(expected)
        assert compact(durable(cut.stalled)) + compact(rest) == compact(durable(cut.steady))


async def test_a_consumer_that_never_reads_again_is_dropped(server: ServerProcess) -> None:
    async with asyncio.timeout(100), http_client(server) as http:
        user = await register(http)
        thread_id = await create_thread(http, user)
        async with (
            open_socket(server, user.token) as steady,
            open_stalling_socket(server, user.token) as stalled,
        ):
            await steady.subscribe(thread_id)
            await stalled.subscribe(thread_id)
            async with in_background(steady.until_type("pong", within=90)) as watching:
                await _flood_until_dropped(http, user, thread_id)
                await steady.send({"type": "ping"})
                await watching
            # The server gave up on `stalled` (its queue overflowed); it must let it go without
            # the client's help, within a bounded time, leaving only `steady`.
            try:
                await wait_for_metrics(
                    http, lambda s: s["threadline_sockets_active"] == 1, within=6
                )
            finally:
                stalled.abort()
