"""The event bus: carries published events to whoever listens on a thread, in this process or
(with the Redis bus, `events/redis_bus.py`) in others, plus a channel of typed control messages
(`events/control.py`).

Listeners are plain callbacks that must not block: the gateway's listener only puts the event
on bounded per-connection queues. A bus never reorders events for a listener and drops none on
purpose; slow consumers are the gateway's business. A bus that may have lost events on the way
(the Redis bus after a connection loss) says so by calling the subscription's `on_reset`; the
listener then reads what it missed from the events table (`api/live/gateway.py`). A listener
can also see a jump in a durable `seq` (an event the bus never carried) and do the same.

Ephemeral events (text deltas, `EPHEMERAL`) go through `publish_ephemeral`: no database work
happened for them, so they have no number; the bus gives each the `seq` of the thread's last
durable event it knows of (`events/positions.py`) and carries it in the same order as the
durable ones, so a listener sees it after the durable event it follows and before the next.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

from threadline.events.control import CancelRun, SessionEnded
from threadline.events.positions import ThreadPositions
from threadline.events.types import Event, EventType

EventListener = Callable[[Event], None]
ResetListener = Callable[[], None]
ControlListener = Callable[[CancelRun | SessionEnded], None]
Unsubscribe = Callable[[], None]


class EventBus(Protocol):
    async def publish(self, event: Event) -> None:
        """Carry `event` to the thread's listeners. Never raises for a transport failure: the
        event is already numbered (and, unless `thread_deleted`, stored), and listeners catch
        up."""
        ...

    async def publish_ephemeral(self, event: Event) -> None:
        """Carry an ephemeral event (its `seq` is ignored) to the thread's listeners, placed
        after the last durable event of the thread published before it: its `seq` is set to
        that event's. Call it only once the durable events that precede it were published.
        Does not wait for a transport; never raises for a transport failure (the event is
        lost: the finished text is in a durable event)."""
        ...

    async def publish_many(self, events: Sequence[Event]) -> None:
        """`publish` each of `events`, in order, waiting once for the lot (a batch numbered in
        one transaction); an ephemeral one among them is published as `publish_ephemeral`
        does, placed after the durable event before it."""
        ...

    def subscribe(
        self, thread_id: str, listener: EventListener, *, on_reset: ResetListener | None = None
    ) -> Unsubscribe:
        """Call `listener` for every event of the thread from now on; `on_reset` when some may
        have been lost on the way."""
        ...

    async def ready(self, thread_id: str) -> None:
        """Return once the thread's listeners will receive every event published from now on
        (the Redis bus has to learn where the thread's stream ends first). Bounded; never
        raises for a transport failure (the subscription is then reset when the bus recovers)."""
        ...

    async def publish_control(self, message: CancelRun | SessionEnded) -> None: ...

    def subscribe_control(self, listener: ControlListener) -> Unsubscribe: ...

    async def aclose(self) -> None: ...


class MemoryBus:
    """The embedded bus: one process, delivery by direct call."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[EventListener]] = {}
        self._control: list[ControlListener] = []
        # Every event of the deployment passes here, in seq order (the publisher publishes
        # under the thread's row lock), so this is exactly where each thread's log stands.
        self._positions = ThreadPositions()

    async def publish(self, event: Event) -> None:
        if event.type is EventType.THREAD_DELETED:
            self._positions.forget(event.thread_id)
        else:
            self._positions.advance(event.thread_id, event.seq)
        self._deliver(event)

    async def publish_ephemeral(self, event: Event) -> None:
        if event.thread_id not in self._listeners:
            return  # nobody to show it to
        seq = self._positions.get(event.thread_id)
        if seq is None:
            return  # no durable event of the thread passed lately: it cannot be placed
        self._deliver(dataclasses.replace(event, seq=seq))

    def _deliver(self, event: Event) -> None:
        for listener in tuple(self._listeners.get(event.thread_id, ())):
            listener(event)

    async def publish_many(self, events: Sequence[Event]) -> None:
        for event in events:
            await (self.publish(event) if event.durable else self.publish_ephemeral(event))

    def subscribe(
        self, thread_id: str, listener: EventListener, *, on_reset: ResetListener | None = None
    ) -> Unsubscribe:
        # Direct calls lose nothing: `on_reset` is never called.
        self._listeners.setdefault(thread_id, []).append(listener)

        def unsubscribe() -> None:
            listeners = self._listeners.get(thread_id)
            if listeners and listener in listeners:
                listeners.remove(listener)
                if not listeners:
                    del self._listeners[thread_id]

        return unsubscribe

    async def ready(self, thread_id: str) -> None:
        return None

    async def publish_control(self, message: CancelRun | SessionEnded) -> None:
        for listener in tuple(self._control):
            listener(message)

    def subscribe_control(self, listener: ControlListener) -> Unsubscribe:
        self._control.append(listener)
        return lambda: self._control.remove(listener) if listener in self._control else None

    def subscribed_threads(self) -> int:
        return len(self._listeners)

    async def aclose(self) -> None:
        self._listeners.clear()
        self._control.clear()
