"""Live events of threads over the WebSocket (`/v1/ws`) or SSE, resumed across disconnects.

Model: a stream remembers, per thread, the highest sequence number it has handed to the caller
(`last_seq`). When the connection drops (the server restarts, the network fails, the server
closes with 4008 "resume" or sends an SSE `resume` event because the client read too slowly),
the stream reconnects with backoff and resubscribes every thread with `after_seq=last_seq`;
the server replays the stored events after it, then goes live.

Invariants:
- No event twice: a durable event at or below its thread's `last_seq` is dropped, so an
  overlap between the replay and what was already received never reaches the caller.
- No durable event skipped: the server replays everything stored after `after_seq`.
  `message_delta` events are ephemeral (`Event.ephemeral`): not stored, so deltas sent while
  disconnected are lost; the full text arrives in `message_created` and `agent_completed`.
  A delta's `seq` is that of the durable event it follows; it is handed on only if that is
  the thread's `last_seq` (where the server places it), and never moves `last_seq`.
- Every network wait has a deadline: opening (`open_timeout`), SSE reads (the server sends a
  comment every 15 s; `_SSE_READ_TIMEOUT` is three of those), WebSocket reads (websockets'
  keep-alive pings; an unanswered ping drops the connection, which then resumes).

Giving up: reconnecting stops after `reconnect_timeout` seconds without a working connection
(`APIConnectionError`). An answer that retrying cannot change (401, 404, 422) raises
`APIError` at once; the first connection is tried once, so a wrong URL fails fast.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections import deque
from types import TracebackType
from typing import Self

import httpx
from websockets.exceptions import InvalidHandshake, InvalidStatus

from threadline.client._errors import APIConnectionError, APIError
from threadline.client._models import Event, Snapshot
from threadline.events.types import EventType

logger = logging.getLogger(__name__)

Message = dict[str, object]
_FIRST_BACKOFF, _MAX_BACKOFF = 0.1, 2.0


class Dropped(Exception):
    """The connection ended in a way that resuming repairs."""


# What a failed attempt to (re)connect may raise, besides `APIError`: worth another try.
RETRYABLE = (Dropped, OSError, TimeoutError, httpx.TransportError, InvalidHandshake)


class EventStream(ABC):
    """An async iterator of `Event`s that reconnects and resumes on its own.

    Use it as `async with client.events(thread_id) as stream: async for event in stream`.
    Entering returns once the subscription is live (its `Snapshot` is in `snapshots`), so
    whatever happens on the thread afterwards is delivered.

    Attributes:
        last_seq: Per thread, the sequence number of the last event yielded.
        snapshots: Per thread, the snapshot of the latest (re)subscription.
        reconnects: How many times the stream has reconnected.
        reconnecting: True while the connection is lost and being re-established.
    """

    def __init__(self, *, open_timeout: float, reconnect_timeout: float) -> None:
        self.last_seq: dict[str, int] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.reconnects = 0
        self.reconnecting = False
        self._open_timeout = open_timeout
        self._reconnect_timeout = reconnect_timeout
        self._pending: deque[Message] = deque()
        self._threads: set[str] = set()
        self._subscribed_any = False
        self._connected = False
        self._closed = False

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect and subscribe (once; entering the stream does it)."""
        if self._connected:
            return
        await self._disconnect()  # whatever a cancelled resume left half-open
        try:
            await self._connect()
        except APIError:
            await self._disconnect()
            raise
        except RETRYABLE as exc:
            await self._disconnect()
            raise APIConnectionError(f"Cannot open the event stream: {describe(exc)}") from exc
        self._connected = True

    async def aclose(self) -> None:
        self._closed = True
        await self._disconnect()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        if not self._connected and not self._closed:
            await self.open()
        while True:
            while self._pending:
                event = self._accept(self._pending.popleft())
                if event is not None:
                    return event
            if self._closed or (self._subscribed_any and not self._threads):
                raise StopAsyncIteration
            try:
                self._pending.extend(await self._receive())
            except Dropped as exc:
                await self._recover(exc)

    async def _recover(self, dropped: Dropped) -> None:
        logger.info("Event stream dropped (%s); resuming", describe(dropped))
        self.reconnecting = True
        try:
            await self._resume()
        finally:
            self.reconnecting = False

    async def _resume(self) -> None:
        """Reconnect and resubscribe after `last_seq`, with backoff, until it works or
        `reconnect_timeout` has passed."""
        await self._disconnect()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._reconnect_timeout
        delay = _FIRST_BACKOFF
        while True:
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.001)):
                    await self._connect()
                self._connected = True
                self.reconnects += 1
                return
            except APIError as exc:
                await self._disconnect()
                if exc.status < 500 and exc.status != 429:
                    raise
                failure: BaseException = exc
            except RETRYABLE as exc:
                await self._disconnect()
                failure = exc
            if loop.time() + delay >= deadline:
                raise APIConnectionError(
                    f"Lost the event stream and could not resume within "
                    f"{self._reconnect_timeout:g} s: {describe(failure)}"
                ) from failure
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF)

    def _accept(self, message: Message) -> Event | None:
        """The event in `message`, if it is one the caller has not seen; raise on errors."""
        kind = message.get("type")
        if kind == "snapshot":
            self._apply_snapshot(Snapshot.model_validate(message))
            return None
        if kind == "error":
            raise error_of(message)
        if "seq" not in message:
            return None  # pong, unsubscribed, ...
        event = Event.model_validate(message)
        if event.thread_id not in self._threads:
            return None  # unsubscribed (or deleted) meanwhile
        if event.ephemeral:
            # Not deduplicated by `seq` (deltas share it) and no resume point; one that does
            # not follow the last durable event handed on is out of place.
            return event if event.seq == self.last_seq.get(event.thread_id) else None
        if event.seq <= self.last_seq.get(event.thread_id, -1):
            return None
        self.last_seq[event.thread_id] = event.seq
        if event.type == EventType.THREAD_DELETED:
            self._threads.discard(event.thread_id)
        return event

    def _apply_snapshot(self, snapshot: Snapshot) -> None:
        self.snapshots[snapshot.thread_id] = snapshot
        # A first subscription starts at the snapshot; a resumed one keeps its own position.
        self.last_seq.setdefault(snapshot.thread_id, snapshot.last_seq)

    @abstractmethod
    async def _connect(self) -> None:
        """Open the connection and subscribe every thread in `_threads` after `last_seq`."""

    @abstractmethod
    async def _receive(self) -> list[Message]:
        """The next message(s) from the server; `Dropped` if the connection ended."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Close the connection, if open; never raises."""


def error_of(message: Message, *, status: int | None = None) -> APIError:
    retry_after = message.get("retry_after")
    given_status = message.get("status")
    return APIError(
        str(message.get("message", "error")),
        code=str(message.get("code", "error")),
        status=status or (given_status if isinstance(given_status, int) else 400),
        retry_after=float(retry_after) if isinstance(retry_after, int | float) else None,
    )


def describe(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        return f"HTTP {exc.response.status_code}"
    return str(exc) or type(exc).__name__
