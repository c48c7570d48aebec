"""AG-UI 1.0: `POST /v1/agui/{agent}` runs an agent, `GET /v1/agui/threads/{thread_id}/events`
replays and follows a thread (docs/protocols.md).

Frames are the `ag-ui-protocol` package's events encoded by its `EventEncoder`; the SSE `id:`
of the last frame of each Threadline event is that event's seq, so `Last-Event-ID` resumes.
Everything that can be refused (token, rate limit, input, agent, thread ownership) is refused
with a JSON error before the stream starts; a failure after it started is a RUN_ERROR.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from ag_ui.core import BaseEvent, RunAgentInput, RunErrorEvent, TextPart, UserMessage
from ag_ui.encoder import EventEncoder
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from threadline.api.deps import CurrentUser, GatewayDep, MessageRateLimit, ServicesDep
from threadline.api.live.gateway import Gateway, WireMessage
from threadline.api.live.streams import MAX_SEQ, Opened
from threadline.api.protocols import chats
from threadline.api.protocols.agui import AguiTranslator
from threadline.api.protocols.stream import (
    STREAM_HEADERS,
    Framing,
    open_protocol_subscription,
    protocol_stream,
)
from threadline.api.schemas import ErrorOut
from threadline.context import UserContext
from threadline.errors import InvalidInputError
from threadline.runs.service import MultitaskStrategy
from threadline.runtime import Runtime

router = APIRouter(tags=["ag-ui"])
SEQ_KEY = "threadline_seq"
_STREAM: dict[int | str, dict[str, object]] = {200: {"content": {"text/event-stream": {}}}}
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut},
    404: {"model": ErrorOut},
    422: {"model": ErrorOut},
}


@router.post(
    "/v1/agui/{agent}",
    response_class=StreamingResponse,
    dependencies=[MessageRateLimit],
    responses={**_STREAM, **_ERRORS, 409: {"model": ErrorOut}, 429: {"model": ErrorOut}},
)
async def run_agent(
    agent: str,
    body: RunAgentInput,
    request: Request,
    user: CurrentUser,
    services: ServicesDep,
    gateway: GatewayDep,
) -> StreamingResponse:
    """Run `agent` on the thread `threadId` names (created on first use), with the input's
    new user messages; stream the run as AG-UI events."""
    client_thread = chats.check_client_id(body.thread_id, field="threadId")
    for message in body.messages:
        chats.check_client_id(message.id, field="messages.id")
    chats.check_agent(services, agent)
    messages = _user_messages(body)
    chats.check_messages(services, messages)
    thread = await chats.open_thread(services, user, client_thread)
    opened = await open_protocol_subscription(services, gateway, user, thread.id, after_seq=None)
    try:
        run = await chats.start_run(
            services, user, thread, messages, agent=agent, strategy=_strategy(body)
        )
    except BaseException:
        gateway.detach(opened.subscription)
        raise
    translator = AguiTranslator(thread_id=client_thread, only_run=run.id, run_alias=body.run_id)
    return _response(services, gateway, user, opened, request, translator)


@router.get(
    "/v1/agui/threads/{thread_id}/events",
    response_class=StreamingResponse,
    responses={**_STREAM, **_ERRORS},
)
async def thread_events(
    thread_id: str,
    request: Request,
    user: CurrentUser,
    services: ServicesDep,
    gateway: GatewayDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ)] = None,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
    follow: bool = True,
) -> StreamingResponse:
    """The thread in AG-UI form, every run from the start (or after `Last-Event-ID` /
    `?after=`), then live: a reloaded page or a second device catches up. With
    `follow=false` the stream ends once it has caught up and no run is open (what an
    AG-UI client's `connectAgent` waits for)."""
    thread = await chats.require_thread(services, user, thread_id)
    after_seq = _resume_point(after, last_event_id)
    open_run = None
    if after_seq:
        active = await chats.active_run(services, user, thread.id)
        if active and await chats.run_start_seq(services, user, thread.id, active.id) < after_seq:
            open_run = active.id  # the client saw it start before it lost the stream
    opened = await open_protocol_subscription(
        services, gateway, user, thread.id, after_seq=after_seq
    )
    translator = AguiTranslator(thread_id=thread_id, include_user_messages=True, open_run=open_run)
    caught_up = None if follow else (lambda: translator.open_run is None)
    return _response(services, gateway, user, opened, request, translator, caught_up=caught_up)


def _response(
    services: Runtime,
    gateway: Gateway,
    user: UserContext,
    opened: Opened,
    request: Request,
    translator: AguiTranslator,
    *,
    caught_up: Callable[[], bool] | None = None,
) -> StreamingResponse:
    encoder = EventEncoder()

    def encode(message: WireMessage) -> str:
        return _encode(encoder, translator.translate(message), message.get("seq"))

    def failed(reason: str, code: str) -> str:
        return _encode(encoder, [*translator.close(), RunErrorEvent(message=reason, code=code)])

    framing = Framing(
        encode=encode,
        done=lambda: translator.finished,
        on_overflow=lambda: failed(
            "The client read too slowly; resume from Last-Event-ID", "resume"
        ),
        on_error=lambda message: failed(message, "stream_failed"),
        caught_up=caught_up,
    )
    return StreamingResponse(
        protocol_stream(services, gateway, user, opened, request, framing),
        media_type=encoder.get_content_type(),
        headers=STREAM_HEADERS,
        background=BackgroundTask(gateway.detach, opened.subscription),
    )


def _encode(encoder: EventEncoder, events: list[BaseEvent], seq: object = None) -> str:
    """The events' frames. The last one carries the seq twice: as the SSE `id:` (browsers and
    `Last-Event-ID`) and as `metadata.threadline_seq` (AG-UI clients drop SSE ids, so an app
    reads the cursor it resumes from off the events themselves)."""
    if events and isinstance(seq, int):
        last = events[-1]
        events = [*events[:-1], last.model_copy(update={"metadata": {SEQ_KEY: seq}})]
    frames = [encoder.encode(event) for event in events]
    if frames and isinstance(seq, int):
        frames[-1] = f"id: {seq}\n{frames[-1]}"
    return "".join(frames)


def _user_messages(body: RunAgentInput) -> list[chats.ClientMessage]:
    out: list[chats.ClientMessage] = []
    for message in body.messages:
        if not isinstance(message, UserMessage):
            continue
        content = message.content
        if not isinstance(content, str):
            content = "\n".join(part.text for part in content if isinstance(part, TextPart))
        out.append(chats.ClientMessage(id=message.id, content=content))
    return out


def _strategy(body: RunAgentInput) -> MultitaskStrategy:
    props = body.forwarded_props if isinstance(body.forwarded_props, dict) else {}
    value = props.get("multitask_strategy", MultitaskStrategy.ENQUEUE.value)
    try:
        return MultitaskStrategy(value)
    except ValueError:
        raise InvalidInputError(
            "forwardedProps.multitask_strategy must be reject, enqueue or interrupt",
            code="invalid_multitask_strategy",
            field="forwardedProps.multitask_strategy",
        ) from None


def _resume_point(after: int | None, last_event_id: str | None) -> int:
    if after is not None:
        return after
    text = (last_event_id or "").strip()
    if not text:
        return 0
    if not text.isdigit() or int(text) > MAX_SEQ:
        raise InvalidInputError("Last-Event-ID must be a sequence number", code="invalid_cursor")
    return int(text)
