"""The AI SDK UI message stream (`useChat`'s `DefaultChatTransport`, protocol v1):
`POST /v1/ai-sdk/chat`, `GET /v1/ai-sdk/chat/{chat_id}/stream` (resume),
`POST /v1/ai-sdk/chat/{chat_id}/stop` (docs/protocols.md).

A chat is a thread (`chats`); a response is one run, as one assistant message (its id is the
run id). The stream's SSE `id:` is Threadline's seq. Errors that can be known before the
stream starts are JSON errors; a failure after it started is an `error` part.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, JsonValue
from starlette.background import BackgroundTask

from threadline.api.deps import CurrentUser, GatewayDep, MessageRateLimit, ServicesDep
from threadline.api.live.gateway import Gateway, WireMessage
from threadline.api.live.streams import Opened
from threadline.api.protocols import aisdk, chats
from threadline.api.protocols.stream import (
    Framing,
    open_protocol_subscription,
    protocol_stream,
    sse_frame,
)
from threadline.api.schemas import TEXT_PATTERN, ErrorOut, RunOut
from threadline.context import UserContext
from threadline.errors import InvalidInputError
from threadline.runs.service import MultitaskStrategy
from threadline.runtime import Runtime

router = APIRouter(prefix="/v1/ai-sdk/chat", tags=["ai-sdk"])
DEFAULT_AGENT = "demo"
_STREAM: dict[int | str, dict[str, object]] = {200: {"content": {"text/event-stream": {}}}}
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut},
    404: {"model": ErrorOut},
    422: {"model": ErrorOut},
}


# Stated in the schema only: `chats.check_client_id` checks it, with its own error code.
_CLIENT_ID: dict[str, JsonValue] = {"pattern": chats.CLIENT_ID_PATTERN}


# What the server checks of a user message's parts, stated in its schema: a text part's `text`
# is a string without NUL, and the message (stored as the join of its text parts) has some text
# besides whitespace (`MessageStore.check`). Other roles' messages are not read.
_TEXT_PART: dict[str, JsonValue] = {"properties": {"type": {"const": "text"}}, "required": ["type"]}
_MESSAGE_PARTS: dict[str, JsonValue] = {
    "if": {"properties": {"role": {"const": "user"}}, "required": ["role"]},
    "then": {
        "properties": {
            "parts": {
                "items": {
                    "if": _TEXT_PART,
                    "then": {"properties": {"text": {"type": "string", "pattern": "^[^\\x00]*$"}}},
                },
                "contains": {
                    "properties": {
                        "type": {"const": "text"},
                        "text": {"type": "string", "pattern": TEXT_PATTERN},
                    },
                    "required": ["type", "text"],
                },
            }
        },
        "required": ["parts"],
    },
}


class UIMessageIn(BaseModel):
    """A `UIMessage` as `useChat` sends it; only user messages' text parts are read."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_MESSAGE_PARTS)
    id: str = Field(min_length=1, max_length=200, json_schema_extra=_CLIENT_ID)
    role: Literal["system", "user", "assistant"]
    parts: list[dict[str, object]] = Field(default_factory=list, max_length=1000)

    def text(self) -> str:
        texts = [part.get("text", "") for part in self.parts if part.get("type") == "text"]
        if not all(isinstance(text, str) for text in texts):
            raise InvalidInputError(
                "a text part's text must be a string", code="invalid_part", field="messages.parts"
            )
        return "".join(str(text) for text in texts)


class ChatRequest(BaseModel):
    """`useChat`'s request body, plus Threadline's `agent` and `multitask_strategy` (set
    them with the transport's `body` option)."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=200, json_schema_extra=_CLIENT_ID)
    messages: list[UIMessageIn] = Field(default_factory=list, max_length=10_000)
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    message_id: str | None = Field(default=None, alias="messageId")
    agent: str | None = Field(default=None, max_length=200)
    multitask_strategy: MultitaskStrategy = MultitaskStrategy.ENQUEUE


class ChatStopOut(BaseModel):
    run: RunOut | None
    """The cancelled run, or null when the chat had no active run."""


@router.post(
    "",
    response_class=StreamingResponse,
    dependencies=[MessageRateLimit],
    responses={**_STREAM, **_ERRORS, 409: {"model": ErrorOut}, 429: {"model": ErrorOut}},
)
async def send_messages(
    body: ChatRequest,
    request: Request,
    user: CurrentUser,
    services: ServicesDep,
    gateway: GatewayDep,
    agent: Annotated[str | None, Query(max_length=200)] = None,
) -> StreamingResponse:
    """Store the chat's new user messages and stream the agent's answer. With
    `trigger: regenerate-message` nothing is stored and the agent answers again."""
    name = agent or body.agent or DEFAULT_AGENT
    # The query names the agent when both do, but a body naming an unknown one is refused
    # all the same: nothing in a request is silently ignored.
    for named in (name, body.agent):
        if named is not None:
            chats.check_agent(services, named)
    chats.check_client_id(body.id, field="id")
    for message in body.messages:
        chats.check_client_id(message.id, field="messages.id")
    users = [
        chats.ClientMessage(id=m.id, content=m.text()) for m in body.messages if m.role == "user"
    ]
    chats.check_messages(services, users)
    messages = users if body.trigger == "submit-message" else []
    thread = await chats.open_thread(services, user, body.id)
    opened = await open_protocol_subscription(services, gateway, user, thread.id, after_seq=None)
    try:
        run = await chats.start_run(
            services, user, thread, messages, agent=name, strategy=body.multitask_strategy
        )
    except BaseException:
        gateway.detach(opened.subscription)
        raise
    return _response(services, gateway, user, opened, request, run.id)


@router.get(
    "/{chat_id}/stream",
    response_class=StreamingResponse,
    responses={**_STREAM, 204: {"description": "No active run"}, **_ERRORS},
)
async def resume_stream(
    chat_id: str, request: Request, user: CurrentUser, services: ServicesDep, gateway: GatewayDep
) -> Response:
    """The chat's active run from its start, then live (`useChat({resume: true})`); 204 when
    no run is active."""
    thread = await chats.find_thread(services, user, chat_id)
    run = await chats.active_run(services, user, thread.id) if thread else None
    if thread is None or run is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    after = await chats.run_start_seq(services, user, thread.id, run.id)
    opened = await open_protocol_subscription(services, gateway, user, thread.id, after_seq=after)
    return _response(services, gateway, user, opened, request, run.id)


@router.post("/{chat_id}/stop", responses=_ERRORS)
async def stop(chat_id: str, user: CurrentUser, services: ServicesDep) -> ChatStopOut:
    """Cancel the chat's active run (with resume on, the client's own stop only
    disconnects)."""
    thread = await chats.require_thread(services, user, chat_id)
    run = await chats.active_run(services, user, thread.id)
    if run is None:
        return ChatStopOut(run=None)
    return ChatStopOut(run=RunOut.of(await services.run_service.cancel(user, thread.id, run.id)))


def _response(
    services: Runtime,
    gateway: Gateway,
    user: UserContext,
    opened: Opened,
    request: Request,
    run_id: str,
) -> StreamingResponse:
    translator = aisdk.UIMessageTranslator(run_id=run_id)

    def encode(message: WireMessage) -> str:
        seq = message.get("seq")
        return _encode(translator.translate(message), seq if isinstance(seq, int) else None)

    def failed(reason: str) -> str:
        translator.finished = True
        return _encode(aisdk.error_parts(reason)) + _DONE

    framing = Framing(
        encode=encode,
        done=lambda: translator.finished,
        on_overflow=lambda: failed("The client read too slowly; reconnect to resume"),
        on_error=failed,
        closing=_DONE,
    )
    return StreamingResponse(
        protocol_stream(services, gateway, user, opened, request, framing),
        media_type="text/event-stream",
        headers=aisdk.HEADERS,
        background=BackgroundTask(gateway.detach, opened.subscription),
    )


_DONE = "data: [DONE]\n\n"


def _encode(parts: list[aisdk.Part], seq: int | None = None) -> str:
    frames = [sse_frame(json.dumps(part, separators=(",", ":")), seq=None) for part in parts]
    if frames and seq is not None:
        frames[-1] = f"id: {seq}\n{frames[-1]}"
    return "".join(frames)
