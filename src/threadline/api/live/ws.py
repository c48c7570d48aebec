"""The WebSocket endpoint `/v1/ws`: live events for several threads on one connection.

Auth: the first message `{"type": "auth", "token": "..."}`, or the subprotocols
`["threadline", "bearer.<token>"]` (the server answers with `threadline`). The token never
appears in a URL, so it never lands in access logs.

Client messages: `auth`, `subscribe {thread_id, after_seq?}`, `unsubscribe {thread_id}`,
`send_message {thread_id, content, agent?, multitask_strategy?}`, `cancel_run {thread_id, run_id}`,
`ping`. Server messages: events, `snapshot`, `unsubscribed`, `message_accepted`,
`run_cancel_requested`, `pong`, `error`; whatever is queued when the writer wakes (under load,
or a snapshot with its replay) goes out in `{"type": "batch", "events": [...]}` frames, in
order, each at most `_MAX_FRAME_BYTES` of JSON (a larger message goes alone, as itself).

A session is three tasks: the reader (which handles client messages one at a time, a
subscribe's whole replay included, so a `pong` always follows the replay before it), the
writer, and a watch on the connection's `overflow`. Whichever ends first ends the others.
A client that stops reading is let go: its queue overflows, or a send waits longer than
`_SEND_TIMEOUT_SECONDS`; the session then ends at once (subscriptions detached, the socket no
longer counted as active), and the endpoint tries, for as long again, to close it with
`CLOSE_RESUME` behind what was already on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Iterator

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from threadline.api.errors import status_for
from threadline.api.live.gateway import (
    CLOSE_UNAUTHENTICATED,
    OVERFLOW,
    Connection,
    Gateway,
    ThreadSubscription,
    WireMessage,
)
from threadline.api.live.streams import MAX_SEQ, run_wire, subscribe
from threadline.auth.revocation import RevocationUnavailableError
from threadline.auth.service_keys import ACT_AS_HEADER
from threadline.context import UserContext
from threadline.errors import AuthError, ForbiddenError, RateLimitedError, ThreadlineError
from threadline.runs.service import MultitaskStrategy, RunRequest
from threadline.runtime import Runtime
from threadline.store.messages import MessageRole, NewMessage

logger = logging.getLogger(__name__)
router = APIRouter()
_AUTH_TIMEOUT_SECONDS = 10.0
# A send waits for the client's TCP window; a client that reads nothing for this long is gone.
_SEND_TIMEOUT_SECONDS = 30.0
# The websockets client refuses frames over 1 MiB by default; 64 KiB keeps batches well clear
# and still carries dozens of typical events per frame.
_MAX_FRAME_BYTES = 64 * 1024
_BATCH_OPEN, _BATCH_CLOSE = '{"type":"batch","events":[', "]}"
_SUBPROTOCOL = "threadline"
# RFC 6455 "try again later": the token cannot be checked right now (Redis unreachable).
_CLOSE_TRY_AGAIN_LATER = 1013


class _Auth(BaseModel):
    type: str = "auth"
    token: str
    act_as: str | None = Field(default=None, max_length=64)
    """With a service key: the user it acts for (or the `X-Threadline-Act-As` header)."""


class _Subscribe(BaseModel):
    thread_id: str = Field(max_length=64)
    after_seq: int | None = Field(default=None, ge=0, le=MAX_SEQ)


class _SendMessage(BaseModel):
    thread_id: str = Field(max_length=64)
    content: str
    agent: str | None = Field(default=None, max_length=64)
    multitask_strategy: MultitaskStrategy = MultitaskStrategy.ENQUEUE


class _CancelRun(BaseModel):
    thread_id: str = Field(max_length=64)
    run_id: str = Field(max_length=64)


_ClientMessage = TypeAdapter(dict[str, object])


@router.websocket("/v1/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    services: Runtime = websocket.app.state.runtime
    gateway: Gateway = websocket.app.state.gateway
    offered = websocket.scope.get("subprotocols", [])
    header_token = next((p[len("bearer.") :] for p in offered if p.startswith("bearer.")), None)
    await websocket.accept(subprotocol=_SUBPROTOCOL if _SUBPROTOCOL in offered else None)
    authenticated = await _authenticate(websocket, services, header_token)
    if authenticated is None:
        return
    ctx, token_id = authenticated
    connection = Connection(
        user_id=ctx.user_id,
        connection_id=ctx.connection_id or "",
        queue_size=services.settings.socket_queue_size,
        metrics=services.metrics,
        token_id=token_id,
    )
    session = _Session(websocket, services, gateway, connection, ctx)
    services.metrics.sockets_active.inc()
    gateway.register(connection)
    try:
        await session.serve()
    finally:
        gateway.unregister(connection)
        services.metrics.sockets_active.dec()
        session.close_subscriptions()
    if connection.overflowed:
        await _close_dropped(websocket, connection)


async def _authenticate(
    websocket: WebSocket, services: Runtime, header_token: str | None
) -> tuple[UserContext, str] | None:
    try:
        token, act_as = header_token, websocket.headers.get(ACT_AS_HEADER)
        if token is None:
            async with asyncio.timeout(_AUTH_TIMEOUT_SECONDS):
                raw = await websocket.receive_text()
            message = _Auth.model_validate_json(raw)
            token, act_as = message.token, message.act_as or act_as
        claims = await services.auth.validate(token, act_as=act_as)
        ctx = UserContext.create(claims.user_id, connection_id=f"ws-{uuid.uuid4().hex[:16]}")
    except (AuthError, ForbiddenError, ValidationError, TimeoutError, ValueError) as exc:
        code = exc.code if isinstance(exc, ThreadlineError) else "not_authenticated"
        await _send_json(websocket, {"type": "error", "code": code, "message": "Not authenticated"})
        await websocket.close(CLOSE_UNAUTHENTICATED, code)
        return None
    except RevocationUnavailableError as exc:
        await _send_json(websocket, {"type": "error", "code": exc.code, "message": exc.message})
        await websocket.close(_CLOSE_TRY_AGAIN_LATER, exc.code)
        return None
    except WebSocketDisconnect:
        return None
    await _send_json(websocket, {"type": "authenticated", "user_id": ctx.user_id})
    return ctx, claims.jti


def _dumps(message: WireMessage) -> str:
    # ASCII-only (the default `ensure_ascii`): the length of the text is its size in bytes.
    return json.dumps(message, separators=(",", ":"), default=str)


async def _send_json(websocket: WebSocket, message: WireMessage) -> None:
    await websocket.send_text(_dumps(message))


def _frames(messages: list[WireMessage]) -> Iterator[tuple[str, int]]:
    """Each message serialized once; consecutive ones grouped into `batch` frames of at most
    `_MAX_FRAME_BYTES`, a lone one sent as itself. Yields (frame text, messages in it)."""
    group: list[str] = []
    size = len(_BATCH_OPEN) + len(_BATCH_CLOSE)
    for message in messages:
        text = _dumps(message)
        if group and size + len(text) + 1 > _MAX_FRAME_BYTES:
            yield _frame(group), len(group)
            group, size = [], len(_BATCH_OPEN) + len(_BATCH_CLOSE)
        group.append(text)
        size += len(text) + 1
    if group:
        yield _frame(group), len(group)


def _frame(texts: list[str]) -> str:
    return texts[0] if len(texts) == 1 else _BATCH_OPEN + ",".join(texts) + _BATCH_CLOSE


async def _close_dropped(websocket: WebSocket, connection: Connection) -> None:
    """Tell the client why (resume: `CLOSE_RESUME`; signed out: `CLOSE_SESSION_ENDED`),
    behind whatever it has not read yet; give up if it still reads nothing (the close then
    waits for its TCP window like any send)."""
    with contextlib.suppress(TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
        async with asyncio.timeout(_SEND_TIMEOUT_SECONDS):
            await websocket.close(connection.close_code, connection.close_reason)


class _Session:
    def __init__(
        self,
        websocket: WebSocket,
        services: Runtime,
        gateway: Gateway,
        connection: Connection,
        ctx: UserContext,
    ) -> None:
        self.websocket = websocket
        self.services = services
        self.gateway = gateway
        self.connection = connection
        self.ctx = ctx
        self.subscriptions: dict[str, ThreadSubscription] = {}

    async def serve(self) -> None:
        """Read, write and watch for overflow concurrently; whichever ends first (disconnect,
        overflow, a send that timed out) ends all three."""
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self._read_loop()),
                group.create_task(self._write_loop()),
                group.create_task(self._watch_overflow()),
            ]
            for task in tasks:
                task.add_done_callback(lambda _: [other.cancel() for other in tasks])

    async def _watch_overflow(self) -> None:
        # The writer may be stuck in a send to a client that reads nothing: it would never
        # reach the OVERFLOW marker, so the overflow itself ends the session.
        await self.connection.overflow.wait()

    def close_subscriptions(self) -> None:
        for subscription in self.subscriptions.values():
            self.gateway.detach(subscription)
        self.subscriptions.clear()

    async def _write_loop(self) -> None:
        try:
            await self._write_batches()
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the client went away mid-send; the reader sees the disconnect too

    async def _write_batches(self) -> None:
        """Send until the connection is dropped (OVERFLOW, anywhere in a batch, ends it)."""
        while True:
            batch = await self.connection.next_batch()
            end = next((i for i, m in enumerate(batch) if m is OVERFLOW), len(batch))
            if not await self._send_all(batch[:end]) or end < len(batch):
                return

    async def _send_all(self, messages: list[WireMessage]) -> bool:
        """Send `messages` in frames; False if the client stopped reading (then dropped)."""
        unsent = len(messages)
        try:
            for text, count in _frames(messages):
                if not await self._send(text):
                    self.connection.drop(unsent=unsent)
                    return False
                unsent -= count
                self.services.metrics.events_delivered.inc(count)
        except asyncio.CancelledError:
            if self.connection.overflowed:  # stopped mid-batch by the overflow watch
                self.services.metrics.events_dropped.inc(unsent)
            raise
        return True

    async def _send(self, text: str) -> bool:
        """Send one frame; False if the client took longer than `_SEND_TIMEOUT_SECONDS`."""
        try:
            async with asyncio.timeout(_SEND_TIMEOUT_SECONDS):
                await self.websocket.send_text(text)
        except TimeoutError:
            return False
        return True

    async def _read_loop(self) -> None:
        while True:
            try:
                raw = await self.websocket.receive_text()
            except WebSocketDisconnect:
                return
            except RuntimeError:  # receive after close
                return
            await self._handle(raw)

    async def _handle(self, raw: str) -> None:
        try:
            message = _ClientMessage.validate_json(raw)
            kind = message.get("type")
            handler = {
                "subscribe": self._subscribe,
                "unsubscribe": self._unsubscribe,
                "send_message": self._send_message,
                "cancel_run": self._cancel_run,
                "ping": self._ping,
            }.get(str(kind))
            if handler is None:
                self._error("unknown_message_type", f"Unknown message type {kind!r}")
                return
            await handler(message)
        except ValidationError as exc:
            self._error("validation_error", exc.errors()[0]["msg"] if exc.errors() else "invalid")
        except ThreadlineError as exc:
            extra: dict[str, object] = {"status": status_for(exc)}
            if isinstance(exc, RateLimitedError):
                extra["retry_after"] = exc.retry_after_seconds
            self._error(exc.code, exc.message, **extra)
        except Exception:
            logger.exception("WebSocket message handler failed")
            self._error("internal_error", "Internal server error")

    def _error(self, code: str, message: str, **extra: object) -> None:
        self.connection.offer({"type": "error", "code": code, "message": message, **extra})

    async def _ping(self, _message: dict[str, object]) -> None:
        self.connection.offer({"type": "pong"})

    async def _subscribe(self, message: dict[str, object]) -> None:
        request = _Subscribe.model_validate(message)
        previous = self.subscriptions.pop(request.thread_id, None)
        if previous is not None:
            self.gateway.detach(previous)
        subscribed = await subscribe(
            self.services,
            self.gateway,
            self.connection,
            self.ctx,
            request.thread_id,
            after_seq=request.after_seq,
        )
        self.subscriptions[request.thread_id] = subscribed.subscription

    async def _unsubscribe(self, message: dict[str, object]) -> None:
        thread_id = str(message.get("thread_id", ""))
        subscription = self.subscriptions.pop(thread_id, None)
        if subscription is not None:
            self.gateway.detach(subscription)
        self.connection.offer({"type": "unsubscribed", "thread_id": thread_id})

    async def _send_message(self, message: dict[str, object]) -> None:
        request = _SendMessage.model_validate(message)
        services = self.services
        await services.quotas.hit_message(
            self.ctx, legacy_limit=services.settings.messages_per_minute
        )
        run = (
            RunRequest(agent=request.agent, multitask_strategy=request.multitask_strategy)
            if request.agent
            else None
        )
        posted = await services.run_service.post(
            self.ctx,
            request.thread_id,
            message=NewMessage(role=MessageRole.USER, content=request.content),
            run=run,
        )
        self.connection.offer(
            {
                "type": "message_accepted",
                "thread_id": request.thread_id,
                "message_id": posted.message.id if posted.message else None,
                "run_id": posted.run.id if posted.run else None,
            }
        )

    async def _cancel_run(self, message: dict[str, object]) -> None:
        request = _CancelRun.model_validate(message)
        run = await self.services.run_service.cancel(self.ctx, request.thread_id, request.run_id)
        self.connection.offer({"type": "run_cancel_requested", "run": run_wire(run)})
