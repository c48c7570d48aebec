"""Fan-out of live events to this process's client connections (WebSocket and SSE).

Model:
- One bus subscription per thread per process, however many connections watch that thread.
  The bus calls `_dispatch`, which only does `put_nowait` on per-connection bounded queues, so a
  slow or dead connection never delays anyone else.
- A connection whose queue overflows is dropped: its queue is emptied and replaced by one
  `OVERFLOW` marker, on which its writer closes it with a code telling the client to resume
  from its last sequence number. Events are never silently skipped on a live connection.
- Subscribing is gap-free and duplicate-free: the live listener is attached first (buffering),
  then the snapshot and the stored events after `after_seq` are read and queued, then the
  buffer is flushed, skipping what the replay already covered; from then on events go straight
  through, and any `seq` at or below the last one sent is dropped.
- Only events of the connection's own user reach it: the subscription is created after an
  ownership check, and every event's owner is checked again on dispatch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from threadline.events.bus import EventBus, Unsubscribe
from threadline.events.types import Event
from threadline.metrics import Metrics

WireMessage = dict[str, object]
OVERFLOW: WireMessage = {"type": "_overflow"}
# 4000-4999 are application close codes; clients reconnect and subscribe with `after_seq`.
CLOSE_RESUME = 4008
CLOSE_UNAUTHENTICATED = 4001
MAX_BATCH = 64


class Connection:
    """One client connection: who it is, and its bounded outbound queue."""

    def __init__(self, *, user_id: str, connection_id: str, queue_size: int, metrics: Metrics):
        self.user_id = user_id
        self.connection_id = connection_id
        self._queue: asyncio.Queue[WireMessage] = asyncio.Queue(maxsize=queue_size)
        self._metrics = metrics
        self.overflowed = False

    def offer(self, message: WireMessage) -> None:
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self.overflowed = True
            dropped = self._queue.qsize() + 1
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(OVERFLOW)
            self._metrics.events_dropped.inc(dropped)

    async def next_batch(self) -> list[WireMessage]:
        """Wait for at least one message, then take what else is already queued (in order)."""
        batch = [await self._queue.get()]
        while len(batch) < MAX_BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch


@dataclass(eq=False)  # identity: each subscription is its own entry in a set
class ThreadSubscription:
    connection: Connection
    thread_id: str
    last_seq: int = -1
    buffering: bool = True
    _buffer: list[Event] = field(default_factory=list)

    def offer(self, event: Event) -> None:
        if event.user_id != self.connection.user_id:
            return
        if self.buffering:
            self._buffer.append(event)
        elif event.seq > self.last_seq:
            self.last_seq = event.seq
            self.connection.offer(event.to_wire())

    def go_live(self, *, after_seq: int) -> None:
        self.last_seq = after_seq
        self.buffering = False
        buffered, self._buffer = self._buffer, []
        for event in buffered:
            self.offer(event)


class Gateway:
    def __init__(self, bus: EventBus, metrics: Metrics) -> None:
        self._bus = bus
        self._metrics = metrics
        self._threads: dict[str, tuple[Unsubscribe, set[ThreadSubscription]]] = {}

    def attach(self, connection: Connection, thread_id: str) -> ThreadSubscription:
        subscription = ThreadSubscription(connection, thread_id)
        entry = self._threads.get(thread_id)
        if entry is None:
            unsubscribe = self._bus.subscribe(thread_id, self._dispatcher(thread_id))
            entry = (unsubscribe, set())
            self._threads[thread_id] = entry
        entry[1].add(subscription)
        return subscription

    def detach(self, subscription: ThreadSubscription) -> None:
        entry = self._threads.get(subscription.thread_id)
        if entry is None:
            return
        entry[1].discard(subscription)
        if not entry[1]:
            entry[0]()
            del self._threads[subscription.thread_id]

    def _dispatcher(self, thread_id: str) -> Callable[[Event], None]:
        def dispatch(event: Event) -> None:
            entry = self._threads.get(thread_id)
            if entry is None:
                return
            for subscription in tuple(entry[1]):
                subscription.offer(event)

        return dispatch

    @property
    def watched_threads(self) -> int:
        return len(self._threads)
