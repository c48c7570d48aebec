"""`WebSocketEvents`: the events of any number of threads over one WebSocket (`/v1/ws`),
authenticated by the `bearer.<token>` subprotocol (the token never goes in the URL)."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from threadline.client._errors import APIError
from threadline.client._models import Snapshot
from threadline.client._streams import Dropped, EventStream, Message, error_of

# Close codes that resuming cannot repair: the token was refused (4001), or revoked by a
# logout while the socket was open (4003). Every other close is resumed.
_CLOSE_UNAUTHENTICATED = 4001
_CLOSE_SESSION_ENDED = 4003
_FINAL_CLOSE_CODES = {
    _CLOSE_UNAUTHENTICATED: "not_authenticated",
    _CLOSE_SESSION_ENDED: "token_revoked",
}
# Keep-alive pings: a peer that stops answering for this long is dropped (and resumed).
_PING_SECONDS = 15.0


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
        try:
            snapshot = await self._subscribe(thread_id)
        except Dropped as exc:
            self._threads.add(thread_id)  # resuming subscribes it with the others
            try:
                await self._recover(exc)
            except APIError:
                self._threads.discard(thread_id)
                raise
            snapshot = self.snapshots[thread_id]
        self._threads.add(thread_id)
        self._subscribed_any = True
        return snapshot

    async def unsubscribe(self, thread_id: str) -> None:
        """Stop following a thread; once this returns, none of its events is yielded."""
        self._threads.discard(thread_id)
        if self._ws is None:
            return
        try:
            await self._send({"type": "unsubscribe", "thread_id": thread_id})
            async with asyncio.timeout(self._open_timeout):
                while True:
                    messages = await self._receive()
                    self._pending.extend(messages)
                    if any(m.get("type") == "unsubscribed" for m in messages):
                        return
        except Dropped:
            return  # the next read resumes, without this thread

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
            raise error_of(welcome[0], status=401)
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
                        raise error_of(message)
                    self._pending.append(message)
                    if message.get("type") == "snapshot" and message["thread_id"] == thread_id:
                        snapshot = Snapshot.model_validate(message)
                        self._apply_snapshot(snapshot)
        return snapshot

    async def _send(self, message: Message) -> None:
        if self._ws is None:
            raise Dropped("not connected")
        try:
            async with asyncio.timeout(self._open_timeout):
                await self._ws.send(json.dumps(message))
        except ConnectionClosed as exc:
            raise Dropped(str(exc)) from exc

    async def _receive(self) -> list[Message]:
        if self._ws is None:
            raise Dropped("not connected")
        try:
            raw = await self._ws.recv()
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code in _FINAL_CLOSE_CODES:
                raise _final_close(exc.rcvd.code, exc.rcvd.reason) from exc
            raise Dropped(str(exc)) from exc
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


def _final_close(code: int, reason: str) -> APIError:
    # A 4001 close gives the error code as its reason ("token_expired"); 4003 a sentence.
    error_code = _FINAL_CLOSE_CODES[code]
    if code == _CLOSE_UNAUTHENTICATED and reason:
        error_code = reason
    return APIError(
        f"The server closed the socket: {reason or error_code}", code=error_code, status=401
    )
