"""`SSEEvents`: the events of one thread over Server-Sent Events
(`GET /v1/threads/{thread_id}/events`), resumed with `Last-Event-ID`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx

from threadline.client._errors import APIError
from threadline.client._models import Snapshot
from threadline.client._streams import Dropped, EventStream, Message, describe

# The server sends a keep-alive comment every 15 s: three missed ones mean a dead stream.
_SSE_READ_TIMEOUT = 45.0


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
            raise Dropped("not connected")
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
                    raise Dropped("the server asked to resume (slow reader)")
                if data:
                    message = json.loads("\n".join(data))
                    return [message] if isinstance(message, dict) else []
                kind = "message"
        except httpx.TransportError as exc:  # ReadTimeout included
            raise Dropped(describe(exc)) from exc
        raise Dropped("the server ended the stream")

    async def _disconnect(self) -> None:
        response, self._response, self._lines = self._response, None, None
        self._connected = False
        if response is not None:
            try:
                async with asyncio.timeout(self._open_timeout):
                    await response.aclose()
            except (TimeoutError, httpx.TransportError):
                pass
