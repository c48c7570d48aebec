"""The event bus: carries published events to whoever listens on a thread, in this process or
(with the Redis bus) in others, plus a control channel for run cancellation.

Listeners are plain callbacks that must not block: the gateway's listener only puts the event
on bounded per-connection queues. A bus never drops or reorders events for a listener; slow
consumers are the gateway's business.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from threadline.events.types import Event

EventListener = Callable[[Event], None]
ControlListener = Callable[[dict[str, str]], None]
Unsubscribe = Callable[[], None]


class EventBus(Protocol):
    async def publish(self, event: Event) -> None: ...

    def subscribe(self, thread_id: str, listener: EventListener) -> Unsubscribe: ...

    async def publish_control(self, message: dict[str, str]) -> None: ...

    def subscribe_control(self, listener: ControlListener) -> Unsubscribe: ...

    async def aclose(self) -> None: ...


class MemoryBus:
    """The embedded bus: one process, delivery by direct call."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[EventListener]] = {}
        self._control: list[ControlListener] = []

    async def publish(self, event: Event) -> None:
        for listener in tuple(self._listeners.get(event.thread_id, ())):
            listener(event)

    def subscribe(self, thread_id: str, listener: EventListener) -> Unsubscribe:
        self._listeners.setdefault(thread_id, []).append(listener)

        def unsubscribe() -> None:
            listeners = self._listeners.get(thread_id)
            if listeners and listener in listeners:
                listeners.remove(listener)
                if not listeners:
                    del self._listeners[thread_id]

        return unsubscribe

    async def publish_control(self, message: dict[str, str]) -> None:
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
