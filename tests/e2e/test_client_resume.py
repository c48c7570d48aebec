"""The client's event streams survive dropped connections: they reconnect on their own and
resume from the last sequence number, so the caller sees every stored event of the run once,
in order (WebSocket and SSE, async and sync), and across a restart of the server.

Connections are dropped by a TCP proxy between the client and a real server (`CuttableProxy`):
first a plain cut mid-run, then an outage during which reconnecting fails for a while. The
model is slowed down (`THREADLINE_DEMO_DELAY_SECONDS`) so both happen while the run streams.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from tests.e2e.client_support import (
    PASSWORD,
    CuttableProxy,
    RestartableServer,
    assert_no_duplicate_or_reorder,
    new_email,
    new_user,
)
from tests.e2e.sockets_support import ServerProcess, server_factory
from threadline.client import AsyncThreadline, Event, EventType, Threadline

pytestmark = pytest.mark.e2e
DELAY = 0.03
# The demo model echoes this back word by word: a long stream of deltas.
LONG_QUESTION = " ".join(f"word{n}" for n in range(40))
Transport = Literal["websocket", "sse"]


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with server_factory("sqlite", request, tmp_path_factory.mktemp("resume")) as start:
        yield start(demo_delay_seconds=DELAY)


async def _stored(client: AsyncThreadline, thread_id: str, after_seq: int) -> list[Event]:
    """The thread's stored events after `after_seq`, read on a fresh, undisturbed stream."""
    events: list[Event] = []
    async with client.events(thread_id, after_seq=after_seq) as stream:
        async for event in stream:
            events.append(event)
            if event.terminal:
                return events
    raise AssertionError("the stored log has no terminal event")


def _durable(events: list[Event]) -> list[tuple[int, str]]:
    return [(e.seq, e.type) for e in events if e.type != EventType.MESSAGE_DELTA]


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_stream_resumes_after_cut_and_outage(
    server: ServerProcess, transport: Transport
) -> None:
    async with (
        asyncio.timeout(90),
        CuttableProxy(server.port) as proxy,
        new_user(server.base_url) as direct,
    ):
        behind_proxy = AsyncThreadline(proxy.url, token=direct.token, reconnect_timeout=30)
        thread = await direct.create_thread()
        received: list[Event] = []
        restore: asyncio.Task[None] | None = None

        async def bring_back() -> None:
            await proxy.refused_one()  # the stream tried, and failed, to reconnect
            proxy.up()

        async with behind_proxy, behind_proxy.events(thread.id, transport=transport) as stream:
            start = stream.last_seq[thread.id]
            posted = await direct.post_message(thread.id, LONG_QUESTION, agent="demo")
            assert posted.run is not None
            deltas = 0
            async for event in stream:
                received.append(event)
                deltas += event.type == EventType.MESSAGE_DELTA
                if deltas == 3 and stream.reconnects == 0:
                    proxy.cut()
                elif deltas >= 6 and stream.reconnects == 1 and restore is None:
                    proxy.down()
                    restore = asyncio.create_task(bring_back())
                if event.terminal:
                    break
            assert stream.reconnects == 2, stream.reconnects
        assert restore is not None
        await restore

        assert received[-1].type == EventType.AGENT_COMPLETED
        assert received[-1].run_id == posted.run.id
        assert_no_duplicate_or_reorder(received)
        assert _durable(received) == _durable(await _stored(direct, thread.id, start))
        assert proxy.refused >= 1


def test_sync_stream_resumes_after_cut(server: ServerProcess) -> None:
    """The sync client, on its own thread's loop, resumes the same way; the proxy runs on
    another loop so that cutting it does not depend on the client's."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    proxy = CuttableProxy(server.port)
    asyncio.run_coroutine_threadsafe(proxy.__aenter__(), loop).result(30)
    try:
        with Threadline(server.base_url) as direct:
            direct.register(email := new_email("sync-resume"), PASSWORD)
            direct.login(email, PASSWORD)
            thread = direct.create_thread()
            with (
                Threadline(proxy.url, token=direct.token, reconnect_timeout=30) as client,
                client.events(thread.id) as stream,
            ):
                posted = direct.post_message(thread.id, LONG_QUESTION, agent="demo")
                received: list[Event] = []
                for event in stream:
                    received.append(event)
                    if event.type == EventType.MESSAGE_DELTA and stream.reconnects == 0:
                        loop.call_soon_threadsafe(proxy.cut)
                    if event.terminal:
                        break
                assert stream.reconnects >= 1
        assert posted.run is not None and received[-1].run_id == posted.run.id
        assert received[-1].type == EventType.AGENT_COMPLETED
        assert_no_duplicate_or_reorder(received)
    finally:
        asyncio.run_coroutine_threadsafe(proxy.__aexit__(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(30)
        loop.close()


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_stream_resumes_across_a_server_restart(tmp_path: Path, transport: Transport) -> None:
    """The server stops mid-run (its run goes back to the queue) and starts again on the same
    port: the stream reconnects, resumes, and sees the retried run to its end."""
    server = RestartableServer(tmp_path, demo_delay_seconds=DELAY, shutdown_grace_seconds=0)
    await asyncio.to_thread(server.start)
    try:
        async with asyncio.timeout(120), new_user(server.base_url) as client:
            thread = await client.create_thread()
            received: list[Event] = []
            async with client.events(thread.id, transport=transport) as stream:
                start = stream.last_seq[thread.id]
                posted = await client.post_message(thread.id, LONG_QUESTION, agent="demo")
                async for event in stream:
                    received.append(event)
                    if event.type == EventType.MESSAGE_DELTA and server.starts == 1:
                        await asyncio.to_thread(server.stop)
                        await asyncio.to_thread(server.start)
                    if event.terminal:
                        break
                assert stream.reconnects >= 1
            assert posted.run is not None and received[-1].run_id == posted.run.id
            assert received[-1].type == EventType.AGENT_COMPLETED
            assert_no_duplicate_or_reorder(received)
            assert _durable(received) == _durable(await _stored(client, thread.id, start))
            assert server.starts == 2
    finally:
        await asyncio.to_thread(server.stop)
