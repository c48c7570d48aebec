"""Server-sent events for one thread: `GET /v1/threads/{thread_id}/events`.

Resume with `Last-Event-ID` (what browsers' EventSource sends on reconnect) or `?after=<seq>`.
Each event is `id: <seq>`, `event: <type>`, `data: <json>`; a comment line every
`_HEARTBEAT_SECONDS` keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from threadline.api.deps import CurrentUser, ServicesDep
from threadline.api.gateway import OVERFLOW, Connection, WireMessage
from threadline.api.schemas import ErrorOut
from threadline.api.streams import MAX_SEQ, subscribe
from threadline.errors import InvalidInputError

router = APIRouter(tags=["events"])
_HEARTBEAT_SECONDS = 15.0


def _frame(message: WireMessage) -> str:
    data = json.dumps(message, separators=(",", ":"), default=str)
    seq = message.get("seq")
    head = f"id: {seq}\n" if isinstance(seq, int) else ""
    return f"{head}event: {message.get('type')}\ndata: {data}\n\n"


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
    services: ServicesDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ)] = None,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> StreamingResponse:
    connection = Connection(
        user_id=user.user_id,
        connection_id=f"sse-{uuid.uuid4().hex[:16]}",
        queue_size=services.settings.socket_queue_size,
        metrics=services.metrics,
    )
    # Subscribe before answering, so a thread the user does not own is a plain 404.
    subscribed = await subscribe(
        services,
        services.gateway,
        connection,
        user,
        thread_id,
        after_seq=_resume_point(after, last_event_id),
    )

    async def stream() -> AsyncIterator[str]:
        services.metrics.sockets_active.inc()
        try:
            yield ": connected\n\n"
            while not await request.is_disconnected():
                try:
                    async with asyncio.timeout(_HEARTBEAT_SECONDS):
                        batch = await connection.next_batch()
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if batch[-1] is OVERFLOW:
                    yield 'event: resume\ndata: {"reason":"slow consumer"}\n\n'
                    return
                yield "".join(_frame(message) for message in batch)
                services.metrics.events_delivered.inc(len(batch))
        finally:
            services.metrics.sockets_active.dec()
            services.gateway.detach(subscribed.subscription)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
