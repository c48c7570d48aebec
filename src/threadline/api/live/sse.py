"""Server-sent events for one thread: `GET /v1/threads/{thread_id}/events`.

Resume with `Last-Event-ID` (what browsers' EventSource sends on reconnect) or `?after_seq=<seq>`
(the WebSocket's name; `?after=` is kept as an alias). Each event is `id: <seq>`,
`event: <type>`, `data: <json>`. sse-starlette does the framing and sends a comment every
`_PING_SECONDS`, so proxies do not close an idle stream.

The subscription is opened before the response starts (a thread the user does not own is a
plain 404). The stream generator is its own writer: it yields the snapshot and the replay page
by page, so a long replay goes at the pace the client reads, then drains the connection's
queue of live events.

A stream ends cleanly (the chunked body is terminated, so the client sees an end, not a broken
transfer), with an `event: resume` telling the client to reconnect from its last id, when:
- its queue overflowed (a slow consumer), or
- the server shuts down: sse-starlette sets `shutdown` and the generator returns at once rather
  than holding up uvicorn's graceful shutdown (which would cancel it, with a traceback, after
  its timeout).
A stream also ends, after the event itself, on `thread_deleted`: nothing more can come; and
with an `event: session_ended` when the token it was opened with is revoked (a logout on any
process): the client signs in again rather than reconnecting with that token.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from threadline.api.deps import CurrentClaims, CurrentUser, GatewayDep, ServicesDep
from threadline.api.live.gateway import (
    OVERFLOW,
    Connection,
    Gateway,
    ThreadSubscription,
    WireMessage,
)
from threadline.api.live.streams import MAX_SEQ, Opened, open_subscription, replay
from threadline.api.schemas import ErrorOut
from threadline.context import UserContext
from threadline.events.types import EventType
from threadline.runtime import Runtime

router = APIRouter(tags=["events"])
LAST_EVENT_ID_PATTERN = r"^ *[0-9]* *$"
_PING_SECONDS = 15.0
# How long sse-starlette waits for the generator to return by itself on shutdown before it
# cancels it; the generator returns within one event-loop turn, this is only a bound.
_SHUTDOWN_GRACE_SECONDS = 2.0
# Browsers' EventSource reconnects after this many milliseconds once a stream ends.
_RETRY_MS = 1000


def _event(message: WireMessage) -> ServerSentEvent:
    seq = message.get("seq")
    return ServerSentEvent(
        data=json.dumps(message, separators=(",", ":"), default=str),
        event=str(message.get("type")),
        id=str(seq) if isinstance(seq, int) else None,
    )


def _resume(reason: str) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps({"reason": reason}), event="resume", retry=_RETRY_MS)


def _session_ended() -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps({"reason": "token revoked"}), event="session_ended")


def _resume_point(
    after_seq: int | None, after: int | None, last_event_id: str | None
) -> int | None:
    """`after_seq`, else its alias `after`, else `Last-Event-ID` (a reconnecting EventSource
    sends it by itself, so the query wins when a page gave both)."""
    chosen = after_seq if after_seq is not None else after
    if chosen is not None:
        return chosen
    if last_event_id is None or not last_event_id.strip():
        return None
    # Past the last possible seq: nothing to replay, as for the highest one.
    return min(int(last_event_id.strip()), MAX_SEQ)


@router.get(
    "/v1/threads/{thread_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Events as `id: <seq>`, `event: <type>`, `data: <json>`; "
            "ends with `event: resume` when the client should reconnect.",
        },
        404: {"model": ErrorOut},
    },
)
async def thread_events(
    thread_id: str,
    user: CurrentUser,
    claims: CurrentClaims,
    services: ServicesDep,
    gateway: GatewayDep,
    after_seq: Annotated[
        int | None,
        Query(ge=0, le=MAX_SEQ, description="Resume after this sequence number."),
    ] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_SEQ, deprecated=True, description="Alias of `after_seq`."),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(
            max_length=32,
            pattern=LAST_EVENT_ID_PATTERN,
            description="Resume after this sequence number (what EventSource sends).",
        ),
    ] = None,
) -> EventSourceResponse:
    connection = Connection(
        user_id=user.user_id,
        connection_id=f"sse-{uuid.uuid4().hex[:16]}",
        queue_size=services.settings.socket_queue_size,
        metrics=services.metrics,
        token_id=claims.jti,
    )
    # Subscribe before answering, so a thread the user does not own is a plain 404.
    opened = await open_subscription(
        services,
        gateway,
        connection,
        user,
        thread_id,
        after_seq=_resume_point(after_seq, after, last_event_id),
    )
    shutdown = anyio.Event()
    return EventSourceResponse(
        _stream(services, gateway, user, opened, shutdown),
        headers={"Cache-Control": "no-cache"},
        ping=_PING_SECONDS,
        shutdown_event=shutdown,
        shutdown_grace_period=_SHUTDOWN_GRACE_SECONDS,
        # The stream's own `finally` never runs if the client leaves before it starts; this
        # runs either way (detaching twice is harmless).
        background=BackgroundTask(_release, gateway, opened.subscription),
    )


def _release(gateway: Gateway, subscription: ThreadSubscription) -> None:
    gateway.unregister(subscription.connection)
    gateway.detach(subscription)


async def _stream(
    services: Runtime,
    gateway: Gateway,
    ctx: UserContext,
    opened: Opened,
    shutdown: anyio.Event,
) -> AsyncIterator[ServerSentEvent]:
    services.metrics.sockets_active.inc()
    gateway.register(opened.subscription.connection)
    try:
        yield ServerSentEvent(comment="connected")
        async with aclosing(replay(services, ctx, opened)) as pages:
            async for page in pages:
                for message in page:
                    yield _event(message)
                services.metrics.events_delivered.inc(len(page))
                if _ends_stream(page):
                    return
        async for event in _live(services, opened.subscription.connection, shutdown):
            yield event
    finally:
        services.metrics.sockets_active.dec()
        _release(gateway, opened.subscription)


def _ends_stream(messages: list[WireMessage]) -> bool:
    return any(message.get("type") == EventType.THREAD_DELETED for message in messages)


async def _live(
    services: Runtime, connection: Connection, shutdown: anyio.Event
) -> AsyncIterator[ServerSentEvent]:
    # Owned by this generator: cancelled in `finally` however the stream ends. (Not a
    # TaskGroup: a generator suspended at `yield` inside one would take its cancellation.)
    stopping = asyncio.ensure_future(shutdown.wait())
    try:
        while True:
            batch = await _next_batch(connection, stopping)
            if batch is None:
                yield _resume("server shutting down")
                return
            end = next((i for i, m in enumerate(batch) if m is OVERFLOW), len(batch))
            for message in batch[:end]:
                yield _event(message)
            services.metrics.events_delivered.inc(end)
            if end < len(batch):
                yield _session_ended() if connection.session_ended else _resume("slow consumer")
                return
            if _ends_stream(batch[:end]):
                return
    finally:
        stopping.cancel()


async def _next_batch(
    connection: Connection, stopping: asyncio.Task[None]
) -> list[WireMessage] | None:
    """The connection's next batch, or None once the server is shutting down."""
    if stopping.done():
        return None
    batch = asyncio.ensure_future(connection.next_batch())
    await asyncio.wait({batch, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if batch.done():
        return batch.result()
    batch.cancel()  # a `Queue.get` cancelled before it returns takes nothing
    await asyncio.wait({batch})
    if not batch.cancelled():
        return batch.result()
    return None
