"""Live events of threads over the WebSocket (`/v1/ws`) or SSE, resumed across disconnects.

Model: a stream remembers, per thread, the highest sequence number it has handed to the caller
(`last_seq`). When the connection drops (the server restarts, the network fails, the server
closes with 4008 "resume" or sends an SSE `resume` event because the client read too slowly),
the stream reconnects with backoff and resubscribes every thread with `after_seq=last_seq`;
the server replays the stored events after it, then goes live.

Invariants:
- No event twice: an event at or below its thread's `last_seq` is dropped, so an overlap
  between the replay and what was already received never reaches the caller.
- No durable event skipped: the server replays everything stored after `after_seq`.
  `message_delta` events are not stored, so deltas sent while disconnected are lost; the full
  text arrives in `message_created` and `agent_completed`.
- Every network wait has a deadline: opening (`open_timeout`), SSE reads (the server sends a
  comment every 15 s; `_SSE_READ_TIMEOUT` is three of those), WebSocket reads (websockets'
  keep-alive pings; an unanswered ping drops the connection, which then resumes).

Giving up: reconnecting stops after `reconnect_timeout` seconds without a working connection
(`APIConnectionError`). An answer that retrying cannot change (401, 404, 422) raises
`APIError` at once; the first connection is tried once, so a wrong URL fails fast.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from threadline.client._errors import APIConnectionError, APIError
from threadline.client._models import Event, Snapshot
from threadline.events.types import EventType

logger = logging.getLogger(__name__)

Message = dict[str, object]
# Close codes that resuming cannot repair: the token was refused (4001), or revoked by a
# logout while the socket was open (4003). Every other close is resumed.
_CLOSE_UNAUTHENTICATED = 4001
_CLOSE_SESSION_ENDED = 4003
_FINAL_CLOSE_CODES = {
    _CLOSE_UNAUTHENTICATED: "not_authenticated",
    _CLOSE_SESSION_ENDED: "token_revoked",
}
_SSE_READ_TIMEOUT = 45.0
_PING_SECONDS = 15.0
_FIRST_BACKOFF, _MAX_BACKOFF = 0.1, 2.0


class _Dropped(Exception):
    """The connection ended in a way that resuming repairs."""


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
        except (_Dropped, OSError, TimeoutError, httpx.TransportError, InvalidHandshake) as exc:
            await self._disconnect()
            raise APIConnectionError(f"Cannot open the event stream: {_describe(exc)}") from exc
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
            except _Dropped as exc:
                logger.info("Event stream dropped (%s); resuming", _describe(exc))
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
            except (_Dropped, OSError, TimeoutError, httpx.TransportError, InvalidHandshake) as exc:
                await self._disconnect()
                failure = exc
            if loop.time() + delay >= deadline:
                raise APIConnectionError(
                    f"Lost the event stream and could not resume within "
                    f"{self._reconnect_timeout:g} s: {_describe(failure)}"
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
            raise _error_of(message)
        if "seq" not in message:
            return None  # pong, unsubscribed, ...
        event = Event.model_validate(message)
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
        """The next message(s) from the server; `_Dropped` if the connection ended."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Close the connection, if open; never raises."""


class WebSocketEvents(EventStream):
    """Events of any number of threads over one WebSocket (`client.socket()`)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        threads: tuple[str, ...] = (),
        after_seq: int | None = None,
        open_timeout: float,
        reconnect_timeout: float,
    ) -> None:
        super().__init__(open_timeout=open_timeout, reconnect_timeout=reconnect_timeout)
        self._url = url
        self._token = token
        self._ws: ClientConnection | None = None
        for thread_id in threads:
            self._threads.add(thread_id)
            if after_seq is not None:
                self.last_seq[thread_id] = after_seq
        self._subscribed_any = bool(threads)

    async def subscribe(self, thread_id: str, *, after_seq: int | None = None) -> Snapshot:
        """Add a thread (events after `after_seq`, or from now on). Raises `APIError`
        (`thread_not_found`) for a thread that is not the user's."""
        if after_seq is not None:
            self.last_seq[thread_id] = after_seq
        if not self._connected:
            self._threads.add(thread_id)
            self._subscribed_any = True
            await self.open()
            return self.snapshots[thread_id]
        snapshot = await self._subscribe(thread_id)
        self._threads.add(thread_id)
        self._subscribed_any = True
        return snapshot

    async def unsubscribe(self, thread_id: str) -> None:
        self._threads.discard(thread_id)
        if self._ws is not None:
            await self._send({"type": "unsubscribe", "thread_id": thread_id})

    async def _connect(self) -> None:
        self._ws = await connect(
            self._url,
            subprotocols=[Subprotocol("threadline"), Subprotocol(f"bearer.{self._token}")],
            open_timeout=self._open_timeout,
            close_timeout=self._open_timeout,
            ping_interval=_PING_SECONDS,
            ping_timeout=_PING_SECONDS,
            compression=None,
        )
        async with asyncio.timeout(self._open_timeout):
            welcome = await self._receive()
        if welcome and welcome[0].get("type") == "error":
            raise _error_of(welcome[0], status=401)
        for thread_id in sorted(self._threads):
            await self._subscribe(thread_id)

    async def _subscribe(self, thread_id: str) -> Snapshot:
        request: Message = {"type": "subscribe", "thread_id": thread_id}
        if thread_id in self.last_seq:
            request["after_seq"] = self.last_seq[thread_id]
        await self._send(request)
        # Everything before the snapshot (other threads' events) stays queued, in order.
        snapshot: Snapshot | None = None
        async with asyncio.timeout(self._open_timeout):
            while snapshot is None:
                for message in await self._receive():  # the whole frame: the replay follows
                    if message.get("type") == "error" and snapshot is None:
                        raise _error_of(message)
                    self._pending.append(message)
                    if message.get("type") == "snapshot" and message["thread_id"] == thread_id:
                        snapshot = Snapshot.model_validate(message)
                        self._apply_snapshot(snapshot)
        return snapshot

    async def _send(self, message: Message) -> None:
        if self._ws is None:
            raise _Dropped("not connected")
        try:
            async with asyncio.timeout(self._open_timeout):
                await self._ws.send(json.dumps(message))
        except ConnectionClosed as exc:
            raise _Dropped(str(exc)) from exc

    async def _receive(self) -> list[Message]:
        if self._ws is None:
            raise _Dropped("not connected")
        try:
            raw = await self._ws.recv()
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code in _FINAL_CLOSE_CODES:
                raise _final_close(exc.rcvd.code, exc.rcvd.reason) from exc
            raise _Dropped(str(exc)) from exc
        frame = json.loads(raw)
        if not isinstance(frame, dict):
            return []
        if frame.get("type") == "batch" and isinstance(frame.get("events"), list):
            return [m for m in frame["events"] if isinstance(m, dict)]
        return [frame]

    async def _disconnect(self) -> None:
        ws, self._ws = self._ws, None
        self._connected = False
        if ws is not None:
            try:
                async with asyncio.timeout(self._open_timeout):
                    await ws.close()
            except (TimeoutError, OSError, ConnectionClosed):
                pass


class SSEEvents(EventStream):
    """Events of one thread over `GET /v1/threads/{thread_id}/events` (Server-Sent Events),
    resumed with `Last-Event-ID`."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        thread_id: str,
        *,
        headers: dict[str, str],
        after_seq: int | None = None,
        open_timeout: float,
        reconnect_timeout: float,
    ) -> None:
        super().__init__(open_timeout=open_timeout, reconnect_timeout=reconnect_timeout)
        self._http = http
        self._thread_id = thread_id
        self._headers = headers
        self._threads.add(thread_id)
        self._subscribed_any = True
        if after_seq is not None:
            self.last_seq[thread_id] = after_seq
        self._response: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None

    async def _connect(self) -> None:
        headers = dict(self._headers)
        if self._thread_id in self.last_seq:
            headers["Last-Event-ID"] = str(self.last_seq[self._thread_id])
        request = self._http.build_request(
            "GET",
            f"/v1/threads/{self._thread_id}/events",
            headers=headers,
            timeout=httpx.Timeout(self._open_timeout, read=_SSE_READ_TIMEOUT),
        )
        response = await self._http.send(request, stream=True)
        self._response = response
        if response.status_code != 200:
            await response.aread()
            raise APIError.from_response(response)
        self._lines = response.aiter_lines()
        async with asyncio.timeout(self._open_timeout):
            while True:
                messages = await self._receive()
                self._pending.extend(messages)
                snapshot = next((m for m in messages if m.get("type") == "snapshot"), None)
                if snapshot is not None:
                    self._apply_snapshot(Snapshot.model_validate(snapshot))
                    return

    async def _receive(self) -> list[Message]:
        if self._lines is None:
            raise _Dropped("not connected")
        kind, data = "message", []
        try:
            async for line in self._lines:
                if line.startswith(":"):
                    continue  # `: connected`, `: keep-alive`
                if line:
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "event":
                        kind = value
                    elif name == "data":
                        data.append(value)
                    continue
                if kind == "resume":
                    raise _Dropped("the server asked to resume (slow reader)")
                if data:
                    message = json.loads("\n".join(data))
                    return [message] if isinstance(message, dict) else []
                kind = "message"
        except httpx.TransportError as exc:  # ReadTimeout included
            raise _Dropped(_describe(exc)) from exc
        raise _Dropped("the server ended the stream")

    async def _disconnect(self) -> None:
        response, self._response, self._lines = self._response, None, None
        self._connected = False
        if response is not None:
            try:
                async with asyncio.timeout(self._open_timeout):
                    await response.aclose()
            except (TimeoutError, httpx.TransportError):
                pass


def _final_close(code: int, reason: str) -> APIError:
    # A 4001 close gives the error code as its reason ("token_expired"); 4003 a sentence.
    error_code = _FINAL_CLOSE_CODES[code]
    if code == _CLOSE_UNAUTHENTICATED and reason:
        error_code = reason
    return APIError(
        f"The server closed the socket: {reason or error_code}", code=error_code, status=401
    )


def _error_of(message: Message, *, status: int | None = None) -> APIError:
    retry_after = message.get("retry_after")
    given_status = message.get("status")
    return APIError(
        str(message.get("message", "error")),
        code=str(message.get("code", "error")),
        status=status or (given_status if isinstance(given_status, int) else 400),
        retry_after=float(retry_after) if isinstance(retry_after, int | float) else None,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        return f"HTTP {exc.response.status_code}"
    return str(exc) or type(exc).__name__
