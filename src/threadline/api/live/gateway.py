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
  on events go straight through, and any durable `seq` at or below the last one sent is
  dropped.
- Ephemeral events (text deltas) carry the `seq` of the durable event they follow
  (`events/bus.py`). A subscription sends one only *in place*: when the last durable event it
  sent (or the point its replay started from) is exactly that one. So a delta never reaches a
  client before the durable event it follows, nor after a later one (its message's
  `message_created` included); one that does not fit is dropped (its text arrives in
  `message_created`) and counted (`threadline_deltas_out_of_place_total`). Deltas are never
  deduplicated by `seq`, never count as a gap, never move `last_seq`, and never trigger a
  catch-up; the bus carries each once, so none is sent twice. While a subscription buffers
  (replaying, catching up) its deltas are held with the durable events, in bus order, and
  sent after the replay by the same rule.
- The buffer is bounded: while a long replay is under way, a busy thread's live events could
  otherwise pile up without limit. When it overflows it is emptied and `missed_to` remembers
  the highest durable `seq` thrown away; the replay then reads the store again until it has
  delivered at least that far before it flushes the buffer (ephemeral deltas thrown away are
  lost, as they are for anyone who was not watching).
- Only events of the connection's own user reach it: the subscription is created after an
  ownership check, and every event's owner is checked again on dispatch.
- Catching up (several processes, `events/redis_bus.py`): a live subscription that sees a
  `seq` jump past what it has sent and past what the store had when it last read it (an event
  trimmed from the stream or lost while Redis was away), or whose bus calls `on_reset` (the
  reader reconnected), goes back to buffering and reads the store from its last sent `seq`,
  settled (waiting for a publisher's transaction in flight), page by page, then flushes its
  buffer and goes live again. Durable events are neither skipped nor sent twice; ephemeral
  deltas lost on the way stay lost. A catch-up that cannot read the store drops the connection
  (the client resumes).
- Sessions: connections opened with a token are kept by token id; a `SessionEnded` control
  message (a logout on any process) ends them with `CLOSE_SESSION_ENDED`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from threadline.context import UserContext
from threadline.events.bus import EventBus, Unsubscribe
from threadline.events.control import CancelRun, SessionEnded
from threadline.events.types import Event
from threadline.metrics import Metrics
from threadline.store.events import EventStore, StoredEvents

logger = logging.getLogger(__name__)
WireMessage = dict[str, object]
OVERFLOW: WireMessage = {"type": "_overflow"}
# 4000-4999 are application close codes; clients reconnect and subscribe with `after_seq`.
CLOSE_RESUME = 4008
CLOSE_UNAUTHENTICATED = 4001
# The token was revoked (signed out, on any process): sign in again; do not resume with it.
CLOSE_SESSION_ENDED = 4003
MAX_BATCH = 64
CATCH_UP_PAGE = 500
_CATCH_UP_TIMEOUT_SECONDS = 30.0

StoreReader = Callable[[str, str, int], Awaitable[StoredEvents]]
"""(user id, thread id, after seq) -> stored events after it (a page) and the thread's last
seq, read settled: every event published before the read is at or below that seq."""


def settled_reader(engine: AsyncEngine, events: EventStore) -> StoreReader:
    async def read(user_id: str, thread_id: str, after_seq: int) -> StoredEvents:
        ctx = UserContext.create(user_id)
        async with asyncio.timeout(_CATCH_UP_TIMEOUT_SECONDS):
            # `connect()`, not `read_transaction`: see `EventStore.after(settled=True)`.
            async with engine.connect() as conn:
                return await events.after(
                    conn, ctx, thread_id, after_seq=after_seq, limit=CATCH_UP_PAGE, settled=True
                )

    return read


class Connection:
    """One client connection: who it is, and its bounded outbound queue."""

    def __init__(
        self,
        *,
        user_id: str,
        connection_id: str,
        queue_size: int,
        metrics: Metrics,
        token_id: str | None = None,
    ):
        self.user_id = user_id
        self.connection_id = connection_id
        self.token_id = token_id
        """The `jti` of the token it was opened with: a logout of that token ends it."""
        self.close_code = CLOSE_RESUME
        self.close_reason = "slow consumer: reconnect and resume"
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

    def skip_deltas(self, count: int = 1) -> None:
        """`count` deltas were not sent: they did not fit where this connection stands."""
        self._metrics.deltas_out_of_place.inc(count)

    def end_session(self) -> None:
        """Its token was revoked: close it with `CLOSE_SESSION_ENDED`, sending nothing more."""
        if self.overflowed:
            return
        self.close_code = CLOSE_SESSION_ENDED
        self.close_reason = "session ended: the token was revoked"
        self.drop()

    @property
    def session_ended(self) -> bool:
        return self.close_code == CLOSE_SESSION_ENDED

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
    synced_to: int = -1
    """The thread's last seq at the last settled store read: nothing durable at or below it
    is missing, so a jump up to it is no gap."""
    reset_pending: bool = False
    """The bus may have lost events while this was still replaying: catch up before live."""
    on_gap: Callable[[ThreadSubscription], None] | None = None
    _buffer: list[Event] = field(default_factory=list)

    def offer(self, event: Event) -> None:
        if event.user_id != self.connection.user_id:
            return
        if self.buffering:
            self._hold(event)
            return
        if not event.durable:
            if event.seq == self.last_seq:  # in place: see the module docstring
                self.connection.offer(event.to_wire())
            else:
                self.connection.skip_deltas()
            return
        if event.seq <= self.last_seq:
            return
        if self.on_gap is not None and event.seq > max(self.last_seq, self.synced_to) + 1:
            # An event between the two never came (trimmed from the stream, or lost while the
            # bus was away): hold this one and read the store first.
            self.buffering = True
            self._hold(event)
            self.on_gap(self)
            return
        self.last_seq = event.seq
        self.connection.offer(event.to_wire())

    def reset(self) -> None:
        """The bus may have lost events: catch up from the store (now, or once the replay
        under way is done)."""
        if self.buffering:
            self.reset_pending = True
        elif self.on_gap is not None:
            self.buffering = True
            self.on_gap(self)

    def _hold(self, event: Event) -> None:
        if len(self._buffer) < max(1, self.connection.queue_size):
            self._buffer.append(event)
            return
        held, self._buffer = [*self._buffer, event], []
        self.missed_to = max([self.missed_to, *(e.seq for e in held if e.durable)])

    def take_buffered(self, *, after_seq: int) -> list[Event]:
        """Empty the buffer; return, in order, the durable events it held with
        `seq > after_seq` and the ephemeral ones in place among them."""
        held, self._buffer = self._buffer, []
        kept = in_place(held, after_seq=after_seq)
        skipped = sum(not e.durable for e in held) - sum(not e.durable for e in kept)
        if skipped:
            self.connection.skip_deltas(skipped)
        return kept

    def go_live(self, *, after_seq: int) -> None:
        """Everything up to `after_seq` was sent: flush the buffer and go live, unless a reset
        came meanwhile or the buffer shows a gap (then it stays buffering and catches up)."""
        self.last_seq = max(self.last_seq, after_seq)
        if self.reset_pending and self.on_gap is not None:
            self.reset_pending = False
            self.on_gap(self)
            return
        self.buffering = False
        for event in self.take_buffered(after_seq=self.last_seq):
            self.offer(event)  # a gap flips `buffering` back on; the rest is held again


def in_place(events: list[Event], *, after_seq: int) -> list[Event]:
    """The durable events with `seq > after_seq`, and each ephemeral event that follows
    exactly the last durable one kept before it (or `after_seq`, for those before any)."""
    kept: list[Event] = []
    position = after_seq
    for event in events:
        if event.durable:
            if event.seq > position:
                kept.append(event)
                position = event.seq
        elif event.seq == position:
            kept.append(event)
    return kept


class Gateway:
    def __init__(self, bus: EventBus, metrics: Metrics, *, reader: StoreReader | None = None):
        """Without a `reader` (tests), subscriptions never catch up from the store."""
        self._bus = bus
        self._metrics = metrics
        self._reader = reader
        self._threads: dict[str, tuple[Unsubscribe, set[ThreadSubscription]]] = {}
        self._catching_up: dict[ThreadSubscription, asyncio.Task[None]] = {}
        self._sessions: dict[str, set[Connection]] = {}
        self._unsubscribe_control = bus.subscribe_control(self._on_control)

    async def aclose(self) -> None:
        self._unsubscribe_control()
        tasks = tuple(self._catching_up.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def attach(self, connection: Connection, thread_id: str) -> ThreadSubscription:
        on_gap = self._catch_up_soon if self._reader is not None else None
        subscription = ThreadSubscription(connection, thread_id, on_gap=on_gap)
        entry = self._threads.get(thread_id)
        if entry is None:
            unsubscribe = self._bus.subscribe(
                thread_id, self._dispatcher(thread_id), on_reset=self._resetter(thread_id)
            )
            entry = (unsubscribe, set())
            self._threads[thread_id] = entry
        entry[1].add(subscription)
        return subscription

    async def ready(self, thread_id: str) -> None:
        """Return once this process receives every event of the thread published from now."""
        await self._bus.ready(thread_id)

    def register(self, connection: Connection) -> None:
        if connection.token_id is not None:
            self._sessions.setdefault(connection.token_id, set()).add(connection)

    def unregister(self, connection: Connection) -> None:
        if connection.token_id is None:
            return
        connections = self._sessions.get(connection.token_id)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self._sessions[connection.token_id]

    def _on_control(self, message: CancelRun | SessionEnded) -> None:
        if isinstance(message, SessionEnded):
            for connection in tuple(self._sessions.get(message.token_id, ())):
                if connection.user_id == message.user_id:
                    connection.end_session()

    def _resetter(self, thread_id: str) -> Callable[[], None]:
        def reset() -> None:
            entry = self._threads.get(thread_id)
            for subscription in tuple(entry[1]) if entry else ():
                subscription.reset()

        return reset

    def _catch_up_soon(self, subscription: ThreadSubscription) -> None:
        if subscription in self._catching_up:
            return  # the running catch-up sees `buffering` again and reads once more
        task = asyncio.get_running_loop().create_task(self._catch_up(subscription))
        self._catching_up[subscription] = task

    async def _catch_up(self, subscription: ThreadSubscription) -> None:
        reader = self._reader
        connection = subscription.connection
        try:
            while reader is not None and subscription.buffering and self._attached(subscription):
                cursor = subscription.last_seq
                while not connection.overflowed:
                    stored = await reader(connection.user_id, subscription.thread_id, cursor)
                    for event in stored.events:
                        await connection.put(event.to_wire())
                        cursor = event.seq
                    if len(stored.events) < CATCH_UP_PAGE:
                        subscription.synced_to = max(subscription.synced_to, stored.last_seq)
                        break
                if connection.overflowed:
                    return
                subscription.go_live(after_seq=cursor)
        except Exception:
            logger.exception(
                "Catching thread %s up from the store failed; dropping connection %s",
                subscription.thread_id,
                connection.connection_id,
            )
            connection.drop()
        finally:
            self._catching_up.pop(subscription, None)

    def _attached(self, subscription: ThreadSubscription) -> bool:
        entry = self._threads.get(subscription.thread_id)
        return entry is not None and subscription in entry[1]

    def detach(self, subscription: ThreadSubscription) -> None:
        entry = self._threads.get(subscription.thread_id)
        if entry is None or subscription not in entry[1]:
            return
        entry[1].discard(subscription)
        catching_up = self._catching_up.pop(subscription, None)
        if catching_up is not None:
            catching_up.cancel()
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
