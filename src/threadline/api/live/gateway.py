"""Fan-out of live events to this process's client connections (WebSocket and SSE).

Model:
- One bus subscription per thread per process, however many connections watch that thread.
  The bus calls `_dispatch`, which only does `put_nowait` on per-connection bounded queues, so a
  slow or dead connection never delays anyone else.
- A connection whose queue overflows is dropped: its queue is emptied and replaced by one
  `OVERFLOW` marker and its `overflow` event is set; the WebSocket session watches that event
  and closes the socket with a code telling the client to resume from its last sequence number
  (SSE ends the stream when its reader meets the marker). Events are never silently skipped on
  a live connection.
- A replay (`streams.py`) goes through `Connection.put`, which waits while the queue is half
  full: a replay of any length reaches a client at the pace it reads, and the other half of the
  queue stays free for live events of other threads and for replies.
- Subscribing is gap-free and duplicate-free: the live listener is attached first (buffering),
  then the snapshot is read (waiting for a publisher's transaction still in flight, so every
  event published before the attach is in the store) and the stored events are replayed page
  by page; the buffer is then flushed, skipping what the replay already covered, and from then
  on events go straight through, and any `seq` at or below the last one sent is dropped.
- The buffer is bounded: while a long replay is under way, a busy thread's live events could
  otherwise pile up without limit. When it overflows it is emptied and `missed_to` remembers
  the highest durable `seq` thrown away; the replay then reads the store again until it has
  delivered at least that far before it flushes the buffer (ephemeral deltas thrown away are
  lost, as they are for anyone who was not watching).
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
        self.queue_size = queue_size
        self._queue: asyncio.Queue[WireMessage] = asyncio.Queue(maxsize=queue_size)
        self._metrics = metrics
        # A replay fills at most half the queue, leaving the rest to live events and replies.
        self._replay_room = max(1, queue_size // 2)
        self._drained = asyncio.Event()
        self.overflow = asyncio.Event()
        """Set once the connection is given up on (its queue overflowed or a send timed out)."""

    @property
    def overflowed(self) -> bool:
        return self.overflow.is_set()

    def offer(self, message: WireMessage) -> None:
        """Queue `message` without waiting; a full queue drops the connection."""
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self.drop(unsent=1)

    async def put(self, message: WireMessage) -> None:
        """Queue `message` once the queue is less than half full (back-pressure for replays).
        Returns at once, queueing nothing, on a dropped connection."""
        while not self.overflowed and self._queue.qsize() >= self._replay_room:
            self._drained.clear()
            await self._drained.wait()
        self.offer(message)

    def drop(self, *, unsent: int = 0) -> None:
        """Give up on this connection: discard its queue (counted as dropped, with `unsent`
        messages the caller could not deliver), leave only `OVERFLOW`, set `overflow`."""
        if self.overflowed:
            return
        dropped = self._queue.qsize() + unsent
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(OVERFLOW)
        self._metrics.events_dropped.inc(dropped)
        self.overflow.set()
        self._drained.set()  # wake a waiting `put`, which then gives up

    async def next_batch(self) -> list[WireMessage]:
        """Wait for at least one message, then take what else is already queued (in order)."""
        batch = [await self._queue.get()]
        while len(batch) < MAX_BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        self._drained.set()
        return batch


@dataclass(eq=False)  # identity: each subscription is its own entry in a set
class ThreadSubscription:
    connection: Connection
    thread_id: str
    last_seq: int = -1
    buffering: bool = True
    missed_to: int = -1
    """The highest durable `seq` thrown away from an overflowing buffer (-1: none)."""
    _buffer: list[Event] = field(default_factory=list)

    def offer(self, event: Event) -> None:
        if event.user_id != self.connection.user_id:
            return
        if self.buffering:
            self._hold(event)
        elif event.seq > self.last_seq:
            self.last_seq = event.seq
            self.connection.offer(event.to_wire())

    def _hold(self, event: Event) -> None:
        if len(self._buffer) < max(1, self.connection.queue_size):
            self._buffer.append(event)
            return
        held, self._buffer = [*self._buffer, event], []
        self.missed_to = max([self.missed_to, *(e.seq for e in held if e.durable)])

    def take_buffered(self, *, after_seq: int) -> list[Event]:
        """Empty the buffer; return what it held with `seq > after_seq`, in order."""
        held, self._buffer = self._buffer, []
        return [event for event in held if event.seq > after_seq]

    def go_live(self, *, after_seq: int) -> None:
        self.last_seq = after_seq
        self.buffering = False
        for event in self.take_buffered(after_seq=after_seq):
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
        if entry is None or subscription not in entry[1]:
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
