"""The Redis event bus against a real Redis: order, refused appends, trimming, bounded
connections, control latency, and the gateway catching up from the store after a gap or a
Redis restart (a private redis-server the test starts and kills, never the shared one).

Two `RedisBus` objects stand for two processes: they share no Python state, only Redis.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.conftest import _delete_prefix
from tests.private_redis import PrivateRedis, private_redis
from threadline.api.live.gateway import Connection, Gateway, settled_reader
from threadline.api.live.streams import subscribe
from threadline.context import UserContext
from threadline.events.bus import MemoryBus
from threadline.events.control import CancelRun, SessionEnded
from threadline.events.publisher import EventPublisher
from threadline.events.redis_bus import RedisBus, RedisBusConfig, _decode
from threadline.events.types import Event, EventType
from threadline.runtime import Runtime, open_runtime
from threadline.settings import Settings

pytestmark = pytest.mark.integration
WAIT = 20.0


def _event(thread_id: str, seq: int) -> Event:
    return Event(
        type=EventType.THREAD_UPDATED,
        thread_id=thread_id,
        user_id="usr_test",
        seq=seq,
        data={"n": seq},
    )


@asynccontextmanager
async def _bus(
    url: str, prefix: str, *, start: bool = True, **config: object
) -> AsyncIterator[RedisBus]:
    bus = RedisBus(url, config=RedisBusConfig(prefix=prefix, **config))  # type: ignore[arg-type]
    if start:
        bus.start()
    try:
        yield bus
    finally:
        await bus.aclose()


async def _until(condition: Callable[[], bool], within: float = WAIT) -> None:
    """Poll `condition` (the listeners run in this loop) until it holds, bounded."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


@pytest.fixture
def prefix() -> str:
    return f"tlbus-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def shared_redis(redis_url: str, prefix: str) -> AsyncIterator[str]:
    yield redis_url
    await _delete_prefix(redis_url, prefix)


async def test_events_published_by_one_process_arrive_in_order_at_another(
    shared_redis: str, prefix: str
) -> None:
    threads = [f"thr_{n}" for n in range(3)]
    got: dict[str, list[int]] = {t: [] for t in threads}
    async with _bus(shared_redis, prefix) as publisher, _bus(shared_redis, prefix) as reader:
        for thread_id in threads:
            reader.subscribe(thread_id, lambda e: got[e.thread_id].append(e.seq))
            await reader.ready(thread_id)
        for seq in range(1, 101):
            for thread_id in threads:
                await publisher.publish(_event(thread_id, seq))
        await _until(lambda: all(len(seqs) == 100 for seqs in got.values()))
    assert all(seqs == list(range(1, 101)) for seqs in got.values()), got


async def test_redis_refuses_an_out_of_order_or_duplicate_append(
    shared_redis: str, prefix: str
) -> None:
    got: list[int] = []
    async with _bus(shared_redis, prefix) as publisher, _bus(shared_redis, prefix) as reader:
        reader.subscribe("thr_x", lambda e: got.append(e.seq))
        await reader.ready("thr_x")
        for seq in (5, 3, 5, 6):  # 3 is late, the second 5 a duplicate: neither raises
            await publisher.publish(_event("thr_x", seq))
            await publisher.flush()  # one at a time, as publishes from several processes
        await _until(lambda: 6 in got)
        client = Redis.from_url(shared_redis)
        try:
            ids = [entry_id for entry_id, _ in await client.xrange(f"{prefix}:events:thr_x")]
        finally:
            await client.aclose()
    assert got == [5, 6]
    assert ids == [b"5-0", b"6-0"]


async def test_a_step_is_one_entry_but_a_gap_in_its_numbers_splits_it(
    shared_redis: str, prefix: str
) -> None:
    """A batch's consecutive numbers of one thread are one entry; another thread's events, or
    a gap, start another. The gap matters: here another process appended 3 before this one's
    sender got to 1, 2 and 4 (its wait ran out). Appended as one entry at 4, 1 and 2 would land
    after 3; cut at the gap, they are refused as late (listeners read them from the database)
    and 4 goes after 3."""
    got: list[tuple[str, int]] = []
    async with (
        _bus(shared_redis, prefix) as reader,
        _bus(shared_redis, prefix) as other,
        _bus(shared_redis, prefix, start=False) as bus,
    ):
        for thread_id in ("thr_s", "thr_o"):
            reader.subscribe(thread_id, lambda e: got.append((e.thread_id, e.seq)))
            await reader.ready(thread_id)
        await other.publish(_event("thr_s", 3))
        await other.flush()
        await bus._send(
            [
                _event("thr_s", 1),
                _event("thr_s", 2),
                _event("thr_s", 4),
                _event("thr_o", 1),
                _event("thr_o", 2),
                _event("thr_s", 5),
                _event("thr_s", 6),
            ]
        )
        await _until(lambda: ("thr_s", 6) in got)
        await _until(lambda: ("thr_o", 2) in got)
        stream = await _entries(shared_redis, f"{prefix}:events:thr_s")
        other_stream = await _entries(shared_redis, f"{prefix}:events:thr_o")
    # 4 alone: before it a gap, after it another thread's events.
    assert stream == [(b"3-0", [3]), (b"4-0", [4]), (b"6-0", [5, 6])]
    assert other_stream == [(b"2-0", [1, 2])]
    assert [seq for thread_id, seq in got if thread_id == "thr_s"] == [3, 4, 5, 6]
    assert [seq for thread_id, seq in got if thread_id == "thr_o"] == [1, 2]


def _delta(thread_id: str, text: str) -> Event:
    """A text delta as the publisher hands it over: the bus gives it its place (`seq`)."""
    return Event(
        type=EventType.MESSAGE_DELTA,
        thread_id=thread_id,
        user_id="usr_test",
        seq=0,
        data={"message_id": "msg_1", "text": text},
    )


async def _entries(url: str, key: str) -> list[tuple[bytes, list[int]]]:
    """Each entry of the stream: its id and the numbers of the events it carries."""
    client = Redis.from_url(url)
    try:
        return [
            (entry_id, [e.seq for e in _decode(fields, seq=int(entry_id.split(b"-")[0]))])
            for entry_id, fields in await client.xrange(key)
        ]
    finally:
        await client.aclose()


async def _entry_ids(url: str, key: str) -> list[bytes]:
    client = Redis.from_url(url)
    try:
        return [entry_id for entry_id, _ in await client.xrange(key)]
    finally:
        await client.aclose()


async def test_deltas_go_after_the_durable_event_they_follow_without_numbers(
    shared_redis: str, prefix: str
) -> None:
    got: list[tuple[int, str]] = []
    async with _bus(shared_redis, prefix) as publisher, _bus(shared_redis, prefix) as reader:
        reader.subscribe("thr_d", lambda e: got.append((e.seq, e.type.value)))
        await reader.ready("thr_d")
        await publisher.publish(_event("thr_d", 1))
        for text in ("a", "b"):
            await publisher.publish_ephemeral(_delta("thr_d", text))
        await publisher.publish(_event("thr_d", 2))
        await publisher.publish_ephemeral(_delta("thr_d", "c"))
        await publisher.flush()
        await _until(lambda: len(got) == 5)
    assert got == [
        (1, "thread_updated"),
        (1, "message_delta"),
        (1, "message_delta"),
        (2, "thread_updated"),
        (2, "message_delta"),
    ]
    assert await _entry_ids(shared_redis, f"{prefix}:events:thr_d") == [
        b"1-0",
        b"1-1",
        b"1-2",
        b"2-0",
        b"2-1",
    ]


async def test_a_delta_goes_after_a_later_event_another_process_appended_first(
    shared_redis: str, prefix: str
) -> None:
    """Process A published durable 1 and streams; process B appends durable 2 (a user's
    message on the same thread). A's next delta is placed after 2, not refused or dropped."""
    got: list[tuple[int, str]] = []
    async with (
        _bus(shared_redis, prefix) as a,
        _bus(shared_redis, prefix) as b,
        _bus(shared_redis, prefix) as reader,
    ):
        reader.subscribe("thr_r", lambda e: got.append((e.seq, e.type.value)))
        await reader.ready("thr_r")
        await a.publish(_event("thr_r", 1))
        await a.publish_ephemeral(_delta("thr_r", "a"))
        await a.flush()
        await b.publish(_event("thr_r", 2))
        await b.flush()
        await a.publish_ephemeral(_delta("thr_r", "b"))
        await a.flush()
        await _until(lambda: len(got) == 4)
    assert got == [(1, "thread_updated"), (1, "message_delta"), (2, "thread_updated"),
                   (2, "message_delta")]  # fmt: skip
    assert await _entry_ids(shared_redis, f"{prefix}:events:thr_r") == [
        b"1-0",
        b"1-1",
        b"2-0",
        b"2-1",
    ]


async def test_a_reader_never_repeats_a_delta(shared_redis: str, prefix: str) -> None:
    """Two watches of one thread in one process (a second subscriber re-positions it), many
    deltas after one durable event: each arrives once per listener."""
    first: list[str] = []
    second: list[str] = []
    async with _bus(shared_redis, prefix) as publisher, _bus(shared_redis, prefix) as reader:
        reader.subscribe("thr_n", lambda e: first.append(str(e.data.get("text", e.seq))))
        await reader.ready("thr_n")
        await publisher.publish(_event("thr_n", 1))
        for n in range(50):
            await publisher.publish_ephemeral(_delta("thr_n", str(n)))
        await publisher.flush()
        await _until(lambda: len(first) == 51)
        reader.subscribe("thr_n", lambda e: second.append(str(e.data.get("text", e.seq))))
        await reader.ready("thr_n")
        await publisher.publish_ephemeral(_delta("thr_n", "last"))
        await publisher.flush()
        await _until(lambda: "last" in second)
    assert first == ["1", *map(str, range(50)), "last"]
    assert second == ["last"]


async def test_a_batch_retried_on_a_dead_connection_leaves_its_deltas_out(
    shared_redis: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first append of a batch may have reached Redis before its connection died: the
    durable events are appended again (their ids make that idempotent), the deltas not
    (Redis chose their ids, a second append would deliver them twice). Here the first attempt
    got its first event and the delta in, then lost the connection; the retry appends both
    durable events as one group, whose first event a reader has had already: each event
    reaches the reader once, in order."""
    appended: list[list[str]] = []
    got: list[tuple[int, str]] = []
    async with _bus(shared_redis, prefix) as reader, _bus(shared_redis, prefix, start=False) as bus:
        reader.subscribe("thr_t", lambda e: got.append((e.seq, e.type.value)))
        await reader.ready("thr_t")
        real_append = bus._append

        async def append(batch: list[Event]) -> list[object]:
            appended.append([event.type.value for event in batch])
            if len(appended) == 1:
                await real_append(batch[:2])
                raise RedisConnectionError("connection closed by server")
            return await real_append(batch)

        monkeypatch.setattr(bus, "_append", append)
        await bus._send([_event("thr_t", 1), _delta("thr_t", "a"), _event("thr_t", 2)])
        await _until(lambda: (2, "thread_updated") in got)
    assert appended == [
        ["thread_updated", "message_delta", "thread_updated"],
        ["thread_updated", "thread_updated"],
    ]
    assert await _entry_ids(shared_redis, f"{prefix}:events:thr_t") == [b"1-0", b"1-1", b"2-0"]
    assert got == [(1, "thread_updated"), (1, "message_delta"), (2, "thread_updated")]


async def test_a_reader_behind_the_trim_point_sees_the_jump(shared_redis: str, prefix: str) -> None:
    got: list[int] = []
    async with (
        _bus(shared_redis, prefix, max_len=10) as publisher,
        _bus(shared_redis, prefix, start=False) as reader,
    ):
        reader.subscribe("thr_t", lambda e: got.append(e.seq))
        await reader.ready("thr_t")  # positioned at the (empty) stream's end, not reading yet
        for seq in range(1, 401):
            await publisher.publish(_event("thr_t", seq))
        await publisher.flush()
        client = Redis.from_url(shared_redis)
        try:
            length = await client.xlen(f"{prefix}:events:thr_t")
            ttl = await client.ttl(f"{prefix}:events:thr_t")
        finally:
            await client.aclose()
        reader.start()
        await _until(lambda: 400 in got)
    assert length < 400  # trimmed (MAXLEN ~ trims whole nodes, so about, not exactly, 10)
    assert 0 < ttl <= 3600  # and expiring
    assert got[0] > 1 and got == list(range(got[0], 401))  # the jump is visible, then in order


async def test_connections_stay_bounded_however_many_threads_are_watched(
    tmp_path: Path,
) -> None:
    with private_redis(tmp_path) as server:
        got: set[str] = set()
        config: dict[str, object] = {"readers": 2, "keys_per_read": 16, "max_connections": 4}
        async with (
            _bus(server.url, "p", **config) as publisher,
            _bus(server.url, "p", **config) as reader,
        ):
            threads = [f"thr_{n}" for n in range(300)]
            for thread_id in threads:
                reader.subscribe(thread_id, lambda e: got.add(e.thread_id))
                await reader.ready(thread_id)
            for thread_id in threads:
                await publisher.publish(_event(thread_id, 1))
            await _until(lambda: len(got) == len(threads))
            client = Redis.from_url(server.url)
            try:
                clients = int((await client.info("clients"))["connected_clients"])
            finally:
                await client.aclose()
    # Per bus: its pool (publishing, positioning, pub/sub) plus one connection per reader.
    assert clients <= 2 * (4 + 2) + 1, clients


async def test_a_control_message_reaches_another_process_within_100_ms(
    shared_redis: str, prefix: str
) -> None:
    received: list[tuple[float, CancelRun | SessionEnded]] = []
    async with _bus(shared_redis, prefix) as sender, _bus(shared_redis, prefix) as worker:
        worker.subscribe_control(lambda m: received.append((time.perf_counter(), m)))
        client = Redis.from_url(shared_redis)
        try:  # wait (bounded) until both buses' pub/sub connections are subscribed
            async with asyncio.timeout(WAIT):
                while True:
                    if (await client.pubsub_numsub(f"{prefix}:control"))[0][1] >= 2:
                        break
                    await asyncio.sleep(0.01)
            await client.publish(f"{prefix}:control", b'{"kind": "no_such_kind"}')  # ignored
        finally:
            await client.aclose()
        latencies = []
        for n in range(20):
            sent = time.perf_counter()
            await sender.publish_control(CancelRun(run_id=f"run_{n}", reason="user"))
            await _until(lambda n=n: len(received) > n, within=5)
            latencies.append(received[n][0] - sent)
    assert [m for _, m in received] == [
        CancelRun(run_id=f"run_{n}", reason="user") for n in range(20)
    ]
    # Within 100 ms, not at the next heartbeat (run_lease_seconds / 4 = 7.5 s by default). On
    # a shared, overloaded two-core machine one delivery in ten may wait for the event loop.
    assert sum(1 for latency in latencies if latency < 0.1) >= 18, latencies
    assert max(latencies) < 1.0, latencies


# ---------------------------------------------------------------- the gateway catching up


@asynccontextmanager
async def _api_process(settings: Settings) -> AsyncIterator[tuple[Runtime, Gateway]]:
    """What an API process holds: the runtime (no worker) and the gateway, as the app builds
    them."""
    async with open_runtime(settings, worker=False) as runtime:
        gateway = Gateway(
            runtime.bus, runtime.metrics, reader=settled_reader(runtime.engine, runtime.events)
        )
        try:
            yield runtime, gateway
        finally:
            await gateway.aclose()


async def _user_and_thread(services: Runtime) -> tuple[UserContext, str]:
    user = await services.auth.register(
        email=f"bus-{uuid.uuid4().hex[:10]}@example.com", password="correct horse battery"
    )
    ctx = UserContext.create(user.id)
    async with services.engine.begin() as conn:
        thread = await services.thread_service.create(conn, ctx, title="bus", metadata={})
    return ctx, thread.id


async def _subscribed(
    services: Runtime, gateway: Gateway, ctx: UserContext, thread_id: str
) -> Connection:
    connection = Connection(
        user_id=ctx.user_id, connection_id="test", queue_size=100, metrics=services.metrics
    )
    async with asyncio.timeout(WAIT):
        await subscribe(services, gateway, connection, ctx, thread_id, after_seq=None)
    return connection


async def _received(connection: Connection, seqs: list[int], until: int) -> None:
    """Append the seqs of what `connection` is sent to `seqs` until `until` arrives."""
    async with asyncio.timeout(WAIT):
        while until not in seqs:
            for message in await connection.next_batch():
                if isinstance(message.get("seq"), int):
                    seqs.append(int(message["seq"]))  # type: ignore[call-overload]


def _publishers(services: Runtime) -> tuple[EventPublisher, EventPublisher]:
    """The process's own publisher, and one whose events never reach Redis (stored only)."""
    live = EventPublisher(bus=services.bus, store=services.events, engine=services.engine)
    blind = EventPublisher(bus=MemoryBus(), store=services.events, engine=services.engine)
    return live, blind


async def _emit(publisher: EventPublisher, ctx: UserContext, thread_id: str, n: int) -> int:
    event = await publisher.emit_now(ctx, thread_id, EventType.THREAD_UPDATED, {"n": n})
    return event.seq


@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_gap_on_the_stream_is_filled_from_the_store(
    settings_factory: Callable[..., Settings],
) -> None:
    async with _api_process(settings_factory()) as (services, gateway):
        assert isinstance(services.bus, RedisBus)
        ctx, thread_id = await _user_and_thread(services)
        connection = await _subscribed(services, gateway, ctx, thread_id)
        live, blind = _publishers(services)
        missed = [await _emit(blind, ctx, thread_id, n) for n in range(3)]
        last = await _emit(live, ctx, thread_id, 3)
        seqs: list[int] = []
        await _received(connection, seqs, until=last)
    assert seqs == [*missed, last]


@pytest.mark.parametrize("backend", ["postgres"])
async def test_live_delivery_resumes_after_redis_restarts_without_loss_or_duplicates(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    with private_redis(tmp_path) as server:
        settings = settings_factory(redis_url=server.url)
        async with _api_process(settings) as (services, gateway):
            ctx, thread_id = await _user_and_thread(services)
            connection = await _subscribed(services, gateway, ctx, thread_id)
            live, _ = _publishers(services)
            seqs: list[int] = []
            first = await _emit(live, ctx, thread_id, 0)
            await _received(connection, seqs, until=first)
            server.stop()  # SIGKILL: Redis is gone, with every stream
            during = [await _emit(live, ctx, thread_id, n) for n in (1, 2)]  # stored only
            assert isinstance(services.bus, RedisBus)
            await services.bus.flush()  # tried, and failed: Redis is down
            _restart(server)
            await _received(connection, seqs, until=during[-1])  # the reader's reset
            after = await _emit(live, ctx, thread_id, 3)
            await _received(connection, seqs, until=after)
    assert seqs == [first, *during, after]


def _restart(server: PrivateRedis) -> None:
    server.start()  # same port, empty
