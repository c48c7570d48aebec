"""Serving a protocol view of a thread over SSE, from the same subscription as the WebSocket
and the plain SSE stream (`api/live/streams.py`): snapshot and stored events, then live ones.

The caller opens the subscription (so that a bad request is a JSON error before anything is
sent) and hands in a `Framing`: how one Threadline wire event becomes protocol frames, when the
stream is over, and how it ends on a slow consumer or a failure. A keep-alive comment goes out
after `KEEPALIVE_SECONDS` without a frame. The subscription is detached however the stream
ends; the run itself never depends on the stream (a client that leaves loses nothing: the
events are all in the thread's log).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from starlette.requests import Request

from threadline.api.live.gateway import OVERFLOW, Connection, Gateway, WireMessage
from threadline.api.live.streams import Opened, open_subscription, replay
from threadline.context import UserContext
from threadline.runtime import Runtime

logger = logging.getLogger(__name__)
KEEPALIVE_SECONDS = 15.0
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True, slots=True)
class Framing:
    encode: Callable[[WireMessage], str]
    """The frames (SSE text) of one Threadline wire event, possibly none."""
    done: Callable[[], bool]
    """True once the stream has said all it will (its run ended)."""
    on_overflow: Callable[[], str]
    """The closing frames when the client read too slowly and the connection was dropped."""
    on_error: Callable[[str], str]
    """The closing frames after an unexpected failure (the message is safe to show)."""
    closing: str = ""
    """Sent after the last frame when `done` (the AI SDK's `[DONE]`)."""
    caught_up: Callable[[], bool] | None = None
    """Given: once the replay is over, the stream ends as soon as this is true."""
    keepalive_seconds: float = KEEPALIVE_SECONDS


def sse_frame(data: str, *, seq: int | None) -> str:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}data: {data}\n\n"


async def open_protocol_subscription(
    services: Runtime, gateway: Gateway, ctx: UserContext, thread_id: str, *, after_seq: int | None
) -> Opened:
    connection = Connection(
        user_id=ctx.user_id,
        connection_id=f"proto-{uuid.uuid4().hex[:16]}",
        queue_size=services.settings.socket_queue_size,
        metrics=services.metrics,
    )
    return await open_subscription(
        services, gateway, connection, ctx, thread_id, after_seq=after_seq
    )


async def protocol_stream(
    services: Runtime,
    gateway: Gateway,
    ctx: UserContext,
    opened: Opened,
    request: Request,
    framing: Framing,
) -> AsyncIterator[str]:
    services.metrics.sockets_active.inc()
    try:
        async for chunk in _frames(services, ctx, opened, request, framing):
            yield chunk
    except Exception:
        logger.exception("Protocol stream failed")
        yield framing.on_error("The stream failed; reconnect to resume")
    finally:
        services.metrics.sockets_active.dec()
        gateway.detach(opened.subscription)


async def _frames(
    services: Runtime, ctx: UserContext, opened: Opened, request: Request, framing: Framing
) -> AsyncIterator[str]:
    async with aclosing(replay(services, ctx, opened)) as pages:
        async for page in pages:
            chunk = "".join(framing.encode(message) for message in page)
            if chunk:
                yield chunk
            if framing.done():
                yield framing.closing
                return
    connection = opened.subscription.connection
    while not await request.is_disconnected():
        if framing.caught_up is not None and framing.caught_up():
            return
        try:
            async with asyncio.timeout(framing.keepalive_seconds):
                batch = await connection.next_batch()
        except TimeoutError:
            yield ": keep-alive\n\n"
            continue
        end = next((i for i, m in enumerate(batch) if m is OVERFLOW), len(batch))
        chunk = "".join(framing.encode(message) for message in batch[:end])
        if chunk:
            yield chunk
        if framing.done():
            yield framing.closing
            return
        if end < len(batch):
            yield framing.on_overflow()
            return
