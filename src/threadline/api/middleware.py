"""Plain ASGI middleware: request ids, request-size limits, lone surrogates refused."""

from __future__ import annotations

import json
import re
import uuid
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from threadline.ids import IdPrefix, is_valid_id
from threadline.logs import set_request_id

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_PATH_IDS = re.compile(r"/v1/threads/([^/]+)(?:/runs/([^/]+))?")


def _path_ids(path: str) -> dict[str, str]:
    """The well-formed thread and run ids a path names, for the request's log lines."""
    match = _PATH_IDS.match(path)
    if match is None:
        return {}
    ids = {}
    thread_id, run_id = match.groups()
    if is_valid_id(thread_id, IdPrefix.THREAD):
        ids["thread_id"] = thread_id
    if run_id is not None and is_valid_id(run_id, IdPrefix.RUN):
        ids["run_id"] = run_id
    return ids


class RequestIdMiddleware:
    """Takes a sane `X-Request-ID` from the client or makes one, and echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        set_request_id(request_id, **_path_ids(scope.get("path", "")))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodySizeLimitMiddleware:
    """Answers 413 to a body larger than `max_bytes`, declared up front or streamed."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises an HTTPException from body reading (any other error
                    # becomes a 400), and the error handlers turn it into the JSON 413.
                    raise HTTPException(413, f"The request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": {
                    "code": "payload_too_large",
                    "message": f"The request body exceeds {self.max_bytes} bytes",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# A JSON `\uXXXX` escape of a UTF-16 surrogate: the only way one reaches a parsed string
# (raw surrogate bytes are invalid UTF-8 and fail decoding first). Checked before parsing, so a
# request without one pays a byte scan only.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(value: object) -> bool:
    """Whether any string in a parsed JSON value, object keys included, holds a lone UTF-16
    surrogate (a valid pair was already joined into one character by the parser)."""
    if isinstance(value, str):
        return _LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_lone_surrogate(item) for item in value)
    return False


def _json_has_lone_surrogate(raw: bytes) -> bool:
    if _SURROGATE_ESCAPE.search(raw) is None:
        return False
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        return False  # not JSON: the route refuses it as such
    return has_lone_surrogate(parsed)


class LoneSurrogateMiddleware:
    """Answers 400 `invalid_unicode` to a JSON body, or a JSON query value (`metadata=`), that
    holds a lone UTF-16 surrogate anywhere, keys included: such a string cannot be stored or
    sent on as UTF-8, and would otherwise fail deep inside (a 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._query_has_lone_surrogate(scope.get("query_string", b"")):
            await _reject_unicode(send, "a query parameter")
            return
        content_type = dict(scope["headers"]).get(b"content-type", b"").lower()
        if b"json" not in content_type:
            await self.app(scope, receive, send)
            return
        try:
            body, messages = await _read_body(receive)
        except HTTPException as exc:  # BodySizeLimitMiddleware: the body streamed past its limit
            await _send_error(send, exc.status_code, "payload_too_large", str(exc.detail))
            return
        if _json_has_lone_surrogate(body):
            await _reject_unicode(send, "the request body")
            return
        await self.app(scope, _replay(messages, receive), send)

    @staticmethod
    def _query_has_lone_surrogate(query_string: bytes) -> bool:
        if b"%5C" not in query_string.upper() and b"\\" not in query_string:
            return False
        return any(
            _json_has_lone_surrogate(value.encode("utf-8", "surrogatepass"))
            for _, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
        )


async def _read_body(receive: Receive) -> tuple[bytes, list[Message]]:
    messages: list[Message] = []
    chunks: list[bytes] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks), messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replaying_receive() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replaying_receive


async def _reject_unicode(send: Send, where: str) -> None:
    await _send_error(
        send,
        400,
        "invalid_unicode",
        f"{where.capitalize()} holds a lone UTF-16 surrogate (such as \\ud800), "
        "which is not valid Unicode",
    )


async def _send_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
