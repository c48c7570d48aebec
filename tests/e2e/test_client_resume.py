"""The client's event streams survive dropped connections: they reconnect on their own and
resume from the last sequence number, so the caller sees every stored event of the run once,
in order (WebSocket and SSE, async and sync), and across a restart of the server.

Connections are dropped by a TCP proxy between the client and a real server (`CuttableProxy`).
The runs use the `gated` agent, whose tool waits for the test to open its gate: the drops
happen while the run is held in the middle, and the run finishes while the client is offline,
so what it missed must come from the replay. Nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
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
    running_server,
    threaded_proxy,
)
from threadline.client import AsyncThreadline, Event, EventStream, EventType, Threadline

pytestmark = pytest.mark.e2e
WAIT = 30.0
Transport = Literal["websocket", "sse"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableServer]:
    with running_server(tmp_path_factory.mktemp("resume")) as started:
        yield started


async def _stored(client: AsyncThreadline, thread_id: str, after_seq: int) -> list[Event]:
    """The thread's stored events after `after_seq`, read on a fresh, undisturbed stream."""
    events: list[Event] = []
    async with client.events(thread_id, after_seq=after_seq) as stream:
        async for event in stream:
            events.append(event)
            if event.terminal:
                return events
    raise AssertionError("the stored log has no terminal event")


async def _read_run(stream: EventStream, into: list[Event]) -> None:
    async for event in stream:
        into.append(event)
        if event.terminal:
            return


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for a state of the client that it announces to nobody."""
    try:
        async with asyncio.timeout(WAIT):
            while not condition():  # noqa: ASYNC110 - a counter, not an event
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"never: {what}") from None


def _durable(events: list[Event]) -> list[tuple[int, str]]:
    return [(e.seq, e.type) for e in events if e.type != EventType.MESSAGE_DELTA]


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_stream_resumes_after_a_cut_and_an_outage(
    server: RestartableServer, transport: Transport
) -> None:
    async with (
        asyncio.timeout(90),
        CuttableProxy(server.port) as proxy,
        new_user(server.base_url) as direct,
    ):
        behind_proxy = AsyncThreadline(proxy.url, token=direct.token, reconnect_timeout=30)
        thread = await direct.create_thread()
        received: list[Event] = []
        async with behind_proxy, behind_proxy.events(thread.id, transport=transport) as stream:
            start = stream.last_seq[thread.id]
            posted = await direct.post_message(thread.id, "what is 12*7?", agent="gated")
            assert posted.run is not None
            reader = asyncio.create_task(_read_run(stream, received))
            try:
                await _until(lambda: any(e.type == "tool_executing" for e in received), "tool")
                proxy.cut()  # 1. a plain cut: the stream reconnects at once
                await _until(lambda: stream.reconnects == 1, "first reconnect")
                proxy.down()  # 2. an outage: reconnecting fails for a while ...
                await proxy.refused_one()
                server.open_gate(thread.id)  # ... while the run finishes
                stored = await _stored(direct, thread.id, start)  # to its terminal event
                proxy.up()
                async with asyncio.timeout(WAIT):
                    await reader
            finally:
                reader.cancel()
            assert stream.reconnects == 2

        assert received[-1].type == EventType.AGENT_COMPLETED
        assert received[-1].run_id == posted.run.id
        assert_no_duplicate_or_reorder(received)
        assert _durable(received) == _durable(stored)
        assert "tool_completed" in [e.type for e in received]  # emitted while offline


def test_sync_stream_resumes_after_cut(server: RestartableServer) -> None:
    """The sync client, on its own thread's loop, resumes the same way; a helper thread
    drives the test while the main thread reads."""
    with threaded_proxy(server.port) as proxy, Threadline(server.base_url) as direct:
        direct.register(email := new_email("sync-resume"), PASSWORD)
        direct.login(email, PASSWORD)
        thread = direct.create_thread()
        with (
            Threadline(proxy.url, token=direct.token, reconnect_timeout=30) as client,
            client.events(thread.id) as stream,
        ):

            def cut_then_release() -> None:
                proxy.cut()
                deadline = time.monotonic() + WAIT
                while stream.reconnects == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                server.open_gate(thread.id)

            posted = direct.post_message(thread.id, "what is 12*7?", agent="gated")
            driver = threading.Thread(target=cut_then_release, daemon=True)
            received: list[Event] = []
            for event in stream:
                received.append(event)
                if event.type == EventType.TOOL_EXECUTING:
                    driver.start()
                if event.terminal:
                    break
            driver.join(WAIT)
            assert stream.reconnects == 1
    assert posted.run is not None and received[-1].run_id == posted.run.id
    assert received[-1].type == EventType.AGENT_COMPLETED
    assert_no_duplicate_or_reorder(received)


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_stream_resumes_across_a_server_restart(tmp_path: Path, transport: Transport) -> None:
    """The server stops mid-run (its run goes back to the queue) and starts again on the same
    port: the stream reconnects, resumes, and sees the retried run to its end."""
    server = RestartableServer(tmp_path, shutdown_grace_seconds=0)
    await asyncio.to_thread(server.start)
    try:
        async with asyncio.timeout(120), new_user(server.base_url) as client:
            thread = await client.create_thread()
            received: list[Event] = []
            async with client.events(thread.id, transport=transport) as stream:
                start = stream.last_seq[thread.id]
                posted = await client.post_message(thread.id, "what is 12*7?", agent="gated")
                async for event in stream:
                    received.append(event)
                    if event.type == EventType.TOOL_EXECUTING and server.starts == 1:
                        await asyncio.to_thread(server.stop)
                        server.open_gate(thread.id)  # the retried run goes through
                        await asyncio.to_thread(server.start)
                    if event.terminal:
                        break
                assert stream.reconnects >= 1
            assert posted.run is not None and received[-1].run_id == posted.run.id
            assert received[-1].type == EventType.AGENT_COMPLETED
            assert_no_duplicate_or_reorder(received)
            assert _durable(received) == _durable(await _stored(client, thread.id, start))
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture(scope="module")
def streaming_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableServer]:
    """The demo model slowed down, so that an answer streams as many deltas."""
    with running_server(
        tmp_path_factory.mktemp("resume-deltas"), demo_delay_seconds=0.03
    ) as started:
        yield started


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_stream_cut_among_many_deltas_resumes_without_gap_or_duplicate(
    streaming_server: RestartableServer, transport: Transport
) -> None:
    """Deltas take no sequence number and are not stored: a client cut while they stream
    resumes from its last durable event, gets every later durable event once (their numbers
    without a gap) and further deltas only in their place; the stored log has none."""
    server = streaming_server
    question = " ".join(f"word{n}" for n in range(24))  # echoed back word by word
    async with (
        asyncio.timeout(90),
        CuttableProxy(server.port) as proxy,
        new_user(server.base_url) as direct,
    ):
        behind_proxy = AsyncThreadline(proxy.url, token=direct.token, reconnect_timeout=30)
        thread = await direct.create_thread()
        received: list[Event] = []
        async with behind_proxy, behind_proxy.events(thread.id, transport=transport) as stream:
            start = stream.last_seq[thread.id]
            await direct.post_message(thread.id, question, agent="demo")
            reader = asyncio.create_task(_read_run(stream, received))
            try:
                await _until(lambda: sum(e.ephemeral for e in received) >= 3, "three deltas")
                proxy.cut()
                async with asyncio.timeout(WAIT):
                    await reader
            finally:
                reader.cancel()
            assert stream.reconnects == 1
        stored = await _stored(direct, thread.id, start)

    assert not any(e.ephemeral for e in stored)
    assert_no_duplicate_or_reorder(received)
    numbers = [e.seq for e in received if not e.ephemeral]
    assert numbers == list(range(start + 1, start + 1 + len(numbers)))  # no gap
    assert _durable(received) == _durable(stored)
    assert sum(e.ephemeral for e in received) >= 3
