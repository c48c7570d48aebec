"""Server-sent events for one thread: `GET /v1/threads/{thread_id}/events`.

Resume with `Last-Event-ID` (what browsers' EventSource sends on reconnect) or `?after=<seq>`.
Each event is `id: <seq>`, `event: <type>`, `data: <json>`; a comment line every
`_HEARTBEAT_SECONDS` keeps proxies from closing an idle stream.

The subscription is opened before the response starts (a thread the user does not own is a
plain 404). The stream generator is its own writer: it yields the snapshot and the replay page
by page, so a long replay goes at the pace the client reads, then drains the connection's
queue of live events. If that queue overflows, the stream ends with a `resume` event; if the
token it was opened with is revoked (a logout on any process), with a `session_ended` event.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from threadline.api.deps import CurrentClaims, CurrentUser, GatewayDep, ServicesDep
from threadline.api.gateway import OVERFLOW, Connection, Gateway, ThreadSubscription, WireMessage
from threadline.api.schemas import ErrorOut
from threadline.api.streams import MAX_SEQ, Opened, open_subscription, replay
from threadline.context import UserContext
from threadline.errors import InvalidInputError
from threadline.runtime import Runtime

router = APIRouter(tags=["events"])
_HEARTBEAT_SECONDS = 15.0


def _frame(message: WireMessage) -> str:
    data = json.dumps(message, separators=(",", ":"), default=str)
    seq = message.get("seq")
    head = f"id: {seq}\n" if isinstance(seq, int) else ""
    return f"{head}event: {message.get('type')}\ndata: {data}\n\n"


def _frames(messages: list[WireMessage]) -> str:
    return "".join(_frame(message) for message in messages)


def _resume_point(after: int | None, last_event_id: str | None) -> int | None:
    if after is not None:
        return after
    if last_event_id is None or not last_event_id.strip():
        return None
    if not last_event_id.strip().isdigit() or int(last_event_id.strip()) > MAX_SEQ:
        raise InvalidInputError("Last-Event-ID must be a sequence number", code="invalid_cursor")
    return int(last_event_id.strip())


@router.get(
    "/v1/threads/{thread_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        401: {"model": ErrorOut},
        404: {"model": ErrorOut},
    },
)
async def thread_events(
    thread_id: str,
    request: Request,
    user: CurrentUser,
    claims: CurrentClaims,
    services: ServicesDep,
    gateway: GatewayDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ)] = None,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> StreamingResponse:
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
        after_seq=_resume_point(after, last_event_id),
    )
    return StreamingResponse(
        _stream(services, gateway, user, opened, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        # The stream's own `finally` never runs if the client leaves before it starts; this
        # runs either way (detaching twice is harmless).
        background=BackgroundTask(_release, gateway, opened.subscription),
    )


def _release(gateway: Gateway, subscription: ThreadSubscription) -> None:
    gateway.unregister(subscription.connection)
    gateway.detach(subscription)


async def _stream(
    services: Runtime, gateway: Gateway, ctx: UserContext, opened: Opened, request: Request
) -> AsyncIterator[str]:
    services.metrics.sockets_active.inc()
    gateway.register(opened.subscription.connection)
    try:
        yield ": connected\n\n"
        async with aclosing(replay(services, ctx, opened)) as pages:
            async for page in pages:
                yield _frames(page)
                services.metrics.events_delivered.inc(len(page))
        async for chunk in _live(services, opened.subscription.connection, request):
            yield chunk
    finally:
        services.metrics.sockets_active.dec()
        _release(gateway, opened.subscription)


async def _live(services: Runtime, connection: Connection, request: Request) -> AsyncIterator[str]:
    while not await request.is_disconnected():
        try:
            async with asyncio.timeout(_HEARTBEAT_SECONDS):
                batch = await connection.next_batch()
        except TimeoutError:
            yield ": keep-alive\n\n"
            continue
        end = next((i for i, m in enumerate(batch) if m is OVERFLOW), len(batch))
        if end:
            yield _frames(batch[:end])
            services.metrics.events_delivered.inc(end)
        if end < len(batch):
            if connection.session_ended:
                yield 'event: session_ended\ndata: {"reason":"token revoked"}\n\n'
            else:
                yield 'event: resume\ndata: {"reason":"slow consumer"}\n\n'
            return
