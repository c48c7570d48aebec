"""The Redis bus with two real processes on one thread, and what a batch costs Redis.

- Per-thread order across processes (`events/redis_bus.py`): this process and a second one
  (`tests/bus_publisher.py`) publish on one thread at once, each durable event numbered and
  published under the thread's lock as `events/publisher.py` does, each followed by a delta:
  every listener gets every durable event once and in order, every delta once and in place
  (after the durable event it follows, before its publisher's next one).
- A batch re-arms a stream's expiry once, not once per event (a private redis-server, whose
  command counts are this test's alone).
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.bus_publisher import publish_turns
from tests.integration.test_redis_bus import WAIT, _bus, _entries, _until, prefix, shared_redis
from tests.integration.test_runs_support import wait_until
from tests.private_redis import private_redis
from threadline.events.redis_bus import RedisBusConfig, _Expiries
from threadline.events.types import Event, EventType

__all__ = ["prefix", "shared_redis"]  # the fixtures, imported for this module's tests

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _check_order(seen: list[Event], *, count: int) -> None:
    """Every durable event once, in seq order; every delta once, after the durable event it
    follows and before its publisher's next one, with the seq of the durable event just
    before it (what the gateway sends in place)."""
    durable = [e.seq for e in seen if e.durable]
    assert durable == list(range(1, count + 1))
    deltas = [(e.data["by"], e.data["after"]) for e in seen if not e.durable]
    assert len(deltas) == len(set(deltas)) == count, "a delta was lost or repeated"
    last, by_seq = 0, {}
    for event in seen:
        if event.durable:
            last = event.seq
            by_seq[event.seq] = event.data["by"]
            continue
        assert event.seq == last, f"delta {event.data} at seq {event.seq} after durable {last}"
        after = int(str(event.data["after"]))
        assert after <= last, f"delta {event.data} before its own durable event"
        later_own = [s for s in range(after + 1, last + 1) if by_seq.get(s) == event.data["by"]]
        assert not later_own, f"delta {event.data} after its publisher's next event {later_own}"


async def test_two_processes_publishing_on_one_thread_keep_one_order(
    shared_redis: str, prefix: str
) -> None:
    """This process (A) and a real second one (B) take turns on one thread as fast as they
    can, each durable event numbered and published under the thread's lock, each followed by
    a delta: A's listener and a third bus's each get all of them once, in order, every delta
    in place."""
    count = 150
    thread = "thr_two"
    at_a: list[Event] = []
    at_c: list[Event] = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    async with _bus(shared_redis, prefix) as a, _bus(shared_redis, prefix) as c:
        for bus, seen in ((a, at_a), (c, at_c)):
            bus.subscribe(thread, seen.append)
            await bus.ready(thread)
        other = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.bus_publisher", shared_redis, prefix, thread,
            str(count), "B", cwd=ROOT, env=env,
        )  # fmt: skip
        try:
            await publish_turns(a, shared_redis, prefix, thread, count, "A")
            async with asyncio.timeout(WAIT):
                assert await other.wait() == 0
        finally:
            if other.returncode is None:
                other.kill()
                await other.wait()
        total = 2 * count
        await _until(lambda: sum(not e.durable for e in at_a) == total and len(at_c) == 2 * total)
        assert {e.data["by"] for e in at_a if e.durable} == {"A", "B"}
    for seen in (at_a, at_c):
        _check_order(seen, count=total)


async def test_a_stream_is_armed_once_per_period_and_again_after_redis_restarts(
    tmp_path: Path,
) -> None:
    """One EXPIRE per stream for a batch; none for the next batch within the period; and a
    Redis restarted empty (every stream and expiry gone), which this bus need not notice, gets
    each stream created again by an append that arms it: none is left without an expiry, and
    no event is lost."""
    prefix = f"tlbus-{uuid.uuid4().hex[:10]}"
    threads = ("thr_a", "thr_b")
    with private_redis(tmp_path) as server:
        async with _bus(server.url, prefix) as bus:

            async def publish(
                seqs: range,
            ) -> tuple[dict[str, dict[str, int]], list[int], list[list[tuple[bytes, list[int]]]]]:
                events = [
                    Event(EventType.THREAD_UPDATED, thread, "usr_test", seq, {"n": seq})
                    for thread in threads
                    for seq in seqs
                ]
                client = Redis.from_url(server.url)
                try:
                    await client.config_resetstat()
                    await bus.publish_many(events)
                    await bus.flush()
                    stats = await client.info("commandstats")
                    ttls = [await client.ttl(f"{prefix}:events:{t}") for t in threads]
                    entries = [await _entries(server.url, f"{prefix}:events:{t}") for t in threads]
                finally:
                    await client.aclose()
                return stats, ttls, entries

            first, first_ttls, _ = await publish(range(1, 6))
            second, _, _ = await publish(range(6, 9))
            server.stop()
            server.start()  # same port, empty
            third, third_ttls, third_entries = await publish(range(9, 11))
    # Each thread's consecutive numbers of one batch are one entry: one XADD per thread.
    assert first["cmdstat_xadd"]["calls"] == 2
    assert first["cmdstat_expire"]["calls"] == 2, first
    assert second["cmdstat_xadd"]["calls"] == 2
    assert "cmdstat_expire" not in second, second
    assert third["cmdstat_expire"]["calls"] == 2, third
    for ttls in (first_ttls, third_ttls):
        assert all(0 < ttl <= RedisBusConfig().ttl_seconds for ttl in ttls), ttls
    assert third_entries == [[(b"10-0", [9, 10])]] * 2


def test_a_stream_is_due_again_a_quarter_of_its_expiry_after_it_was_armed() -> None:
    expiries = _Expiries(ttl_seconds=400)
    assert expiries.due(b"k", now=0.0)
    expiries.armed(b"k", at=0.0)
    assert not expiries.due(b"k", now=99.9)
    assert expiries.due(b"k", now=100.0)


async def test_a_reader_outlasts_a_whole_idle_block_on_its_connection(tmp_path: Path) -> None:
    """A reader blocked in XREAD with nothing to read keeps its connection for the whole block
    and the next: no socket timeout cuts it (redis-py's default, 5 s, would, and the reader's
    reconnect would reset every subscriber each time a thread sat idle)."""
    prefix = f"tlbus-{uuid.uuid4().hex[:10]}"
    block = 6.0  # longer than redis-py's default socket timeout
    resets: list[str] = []
    with private_redis(tmp_path) as server:
        async with _bus(server.url, prefix, readers=1, block_seconds=block) as bus:
            bus.subscribe("thr_idle", lambda _event: None, on_reset=lambda: resets.append("x"))
            await bus.ready("thr_idle")
            client = Redis.from_url(server.url)
            try:

                async def reader_outlasted_a_block() -> bool:
                    clients = await client.client_list()
                    ages = [int(c["age"]) for c in clients if c["cmd"] == "xread"]
                    return max(ages, default=0) > block

                await wait_until(
                    reader_outlasted_a_block,
                    seconds=block + WAIT,
                    interval=0.2,
                    what="a reader connection older than one block",
                )
            finally:
                await client.aclose()
    assert resets == []
