"""A process that publishes on a thread's Redis stream the way a Threadline process does, for
the bus tests that need a second process on the same thread.

    python -m tests.bus_publisher <redis url> <prefix> <thread id> <events> <name>

`publish_turns` is shared with the test's own process: a thread's numbers come from one
counter under one lock (Redis here, standing for the thread's row and its lock in the
database), and each durable event is published while the lock is held, followed by a delta
published after it (as a run's sink does), exactly as `events/publisher.py` does it.
"""

from __future__ import annotations

import asyncio
import sys
import uuid

from redis.asyncio import Redis

from threadline.events.redis_bus import RedisBus, RedisBusConfig
from threadline.events.types import Event, EventType

_LOCK_SECONDS = 10.0
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


async def _locked_next_seq(client: Redis, prefix: str, thread_id: str, token: str) -> int:
    """Take the thread's lock (bounded wait) and its next number."""
    async with asyncio.timeout(_LOCK_SECONDS):
        while True:
            if await client.set(f"{prefix}:lock:{thread_id}", token, nx=True, px=5000):
                break
            await asyncio.sleep(0.0005)
    return int(await client.incr(f"{prefix}:seq:{thread_id}"))


async def publish_turns(bus: RedisBus, url: str, prefix: str, thread_id: str, count: int,
                        name: str) -> None:  # fmt: skip
    client = Redis.from_url(url)
    token = uuid.uuid4().hex
    try:
        for _ in range(count):
            seq = await _locked_next_seq(client, prefix, thread_id, token)
            try:
                await bus.publish(
                    Event(EventType.THREAD_UPDATED, thread_id, "usr_test", seq, {"by": name})
                )
            finally:
                await client.eval(_RELEASE, 1, f"{prefix}:lock:{thread_id}", token)
            delta = {"by": name, "after": seq, "message_id": "msg_x", "text": "t"}
            await bus.publish_ephemeral(
                Event(EventType.MESSAGE_DELTA, thread_id, "usr_test", 0, delta)
            )
            await asyncio.sleep(0)
        await bus.flush()
    finally:
        await client.aclose()


async def _main(url: str, prefix: str, thread_id: str, count: int, name: str) -> None:
    bus = RedisBus(url, config=RedisBusConfig(prefix=prefix))
    bus.start()
    try:
        await publish_turns(bus, url, prefix, thread_id, count, name)
    finally:
        await bus.aclose()


if __name__ == "__main__":
    url, prefix, thread_id, count, name = sys.argv[1:6]
    asyncio.run(_main(url, prefix, thread_id, int(count), name))
