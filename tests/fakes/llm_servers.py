"""Local HTTP servers that speak OpenAI's and Anthropic's streaming wire formats.

Provider tests point the real SDKs at these, so requests and responses cross a real socket in
the vendor's real format. Each server runs uvicorn in a background thread on 127.0.0.1 with an
ephemeral port; being in its own thread, it works the same under any event loop (or none).

Replies are scripted in advance with vendor-neutral steps and rendered in each vendor's format:

    server.script(Reply(Text("Hel"), Text("lo")), ErrorReply(status=429))

Replies are served first in, first out, one per request; a request with nothing scripted gets a
500 that says so. Every request is recorded in `server.requests` for assertions.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# --- the script ---


@dataclass(frozen=True)
class Text:
    """Answer text, sent as one delta."""

    text: str


@dataclass(frozen=True)
class Reasoning:
    """Reasoning text (`reasoning_content` for OpenAI servers, a thinking block for Anthropic)."""

    text: str


@dataclass(frozen=True)
class ToolUse:
    """A tool call whose JSON arguments are sent as `argument_chunks`, in that order."""

    call_id: str
    name: str
    argument_chunks: tuple[str, ...]

    @classmethod
    def split(
        cls, call_id: str, name: str, arguments: Mapping[str, object], pieces: int = 3
    ) -> ToolUse:
        """The call with `arguments` encoded as JSON and cut into `pieces` fragments."""
        text = json.dumps(arguments)
        size = max(1, -(-len(text) // pieces))
        return cls(call_id, name, tuple(text[i : i + size] for i in range(0, len(text), size)))


@dataclass(frozen=True)
class Pause:
    """Stall the stream, e.g. to exercise a client's idle timeout."""

    seconds: float


@dataclass(frozen=True)
class StreamError:
    """An error event inside a stream that started with 200 OK; nothing follows it."""

    error_type: str = "overloaded_error"
    message: str = "Scripted mid-stream failure"


Step = Text | Reasoning | ToolUse | Pause | StreamError


@dataclass(frozen=True)
class Reply:
    """A successful streamed response.

    `stop_reason` is in the vendor's vocabulary; by default it is derived from the steps.
    `finish=False` cuts the stream before its finishing events, like a dropped connection.
    """

    steps: tuple[Step, ...]
    input_tokens: int = 11
    output_tokens: int = 7
    stop_reason: str | None = None
    finish: bool = True

    def __init__(
        self,
        *steps: Step | str,
        input_tokens: int = 11,
        output_tokens: int = 7,
        stop_reason: str | None = None,
        finish: bool = True,
    ) -> None:
        normalized = tuple(Text(step) if isinstance(step, str) else step for step in steps)
        object.__setattr__(self, "steps", normalized)
        object.__setattr__(self, "input_tokens", input_tokens)
        object.__setattr__(self, "output_tokens", output_tokens)
        object.__setattr__(self, "stop_reason", stop_reason)
        object.__setattr__(self, "finish", finish)

    @property
    def has_tool_use(self) -> bool:
        return any(isinstance(step, ToolUse) for step in self.steps)


@dataclass(frozen=True)
class ErrorReply:
    """An HTTP error status with the vendor's JSON error body."""

    status: int
    message: str = "Scripted failure"
    error_type: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RawReply:
    """Bytes sent exactly as given, for malformed or hand-built streams."""

    body: bytes
    status: int = 200
    content_type: str = "text/event-stream"


Scripted = Reply | ErrorReply | RawReply


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: Mapping[str, str]
    json: dict[str, object]


# --- the server ---


class FakeLLMServer:
    """A scripted streaming server; subclasses supply the vendor's wire format."""

    path: ClassVar[str]
    base_path: ClassVar[str]

    def __init__(self) -> None:
        self._replies: deque[Scripted] = deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # scripting and inspection, called from the test's thread

    def script(self, *replies: Scripted) -> None:
        with self._lock:
            self._replies.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self._replies.clear()
            self._requests.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def pending_replies(self) -> int:
        with self._lock:
            return len(self._replies)

    @property
    def base_url(self) -> str:
        """What to pass as the SDK's `base_url`."""
        if self._port is None:
            raise RuntimeError("the server is not running")
        return f"http://127.0.0.1:{self._port}{self.base_path}"

    # lifecycle

    def start(self, *, startup_timeout: float = 10) -> None:
        app = Starlette(routes=[Route(self.path, self._handle, methods=["POST"])])
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            http="h11",
            ws="none",
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=type(self).__name__)
        self._thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{type(self).__name__} did not start")
            time.sleep(0.01)
        self._port = self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self, *, shutdown_timeout: float = 10) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(shutdown_timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"{type(self).__name__} did not stop")
        self._server = self._thread = self._port = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # request handling, on the server's thread

    async def _handle(self, request: Request) -> Response:
        body = await request.json()
        recorded = RecordedRequest(request.method, request.url.path, dict(request.headers), body)
        with self._lock:
            self._requests.append(recorded)
            scripted = self._replies.popleft() if self._replies else None
        if scripted is None:
            return self._error_response(ErrorReply(500, "No reply was scripted for this request"))
        if isinstance(scripted, ErrorReply):
            return self._error_response(scripted)
        if isinstance(scripted, RawReply):
            return Response(scripted.body, scripted.status, media_type=scripted.content_type)
        return StreamingResponse(
            self._frames(scripted, body),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    async def _frames(self, reply: Reply, body: dict[str, object]) -> AsyncIterator[bytes]:
        for item in self.render(reply, body):
            if isinstance(item, Pause):
                await asyncio.sleep(item.seconds)
            else:
                yield item

    def _error_response(self, error: ErrorReply) -> Response:
        return JSONResponse(self.error_body(error), error.status, headers=dict(error.headers))

    # the wire format

    def render(self, reply: Reply, body: dict[str, object]) -> Iterator[bytes | Pause]:
        raise NotImplementedError

    def error_body(self, error: ErrorReply) -> dict[str, object]:
        raise NotImplementedError


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


class FakeOpenAIServer(FakeLLMServer):
    """`POST /v1/chat/completions` streaming `data: {chunk}` lines ending in `data: [DONE]`."""

    path = "/v1/chat/completions"
    base_path = "/v1"

    _ERROR_TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        403: "permission_error",
        404: "invalid_request_error",
        429: "rate_limit_exceeded",
    }

    def error_body(self, error: ErrorReply) -> dict[str, object]:
        default_type = "server_error" if error.status >= 500 else "invalid_request_error"
        error_type = error.error_type or self._ERROR_TYPES.get(error.status, default_type)
        return {
            "error": {"message": error.message, "type": error_type, "param": None, "code": None}
        }

    def render(self, reply: Reply, body: dict[str, object]) -> Iterator[bytes | Pause]:
        model = str(body.get("model", "unknown"))
        yield self._chunk(model, {"role": "assistant", "content": ""})
        tool_index = 0
        for step in reply.steps:
            if isinstance(step, StreamError):
                error = {"message": step.message, "type": step.error_type, "code": None}
                yield f"data: {_json({'error': error})}\n\n".encode()
                return
            if isinstance(step, ToolUse):
                yield from self._tool_call(model, tool_index, step)
                tool_index += 1
            elif isinstance(step, Pause):
                yield step
            elif isinstance(step, Reasoning):
                yield self._chunk(model, {"reasoning_content": step.text})
            else:
                yield self._chunk(model, {"content": step.text})
        if not reply.finish:
            return
        finish_reason = reply.stop_reason or ("tool_calls" if reply.has_tool_use else "stop")
        yield self._chunk(model, {}, finish_reason=finish_reason)
        stream_options = body.get("stream_options")
        if isinstance(stream_options, dict) and stream_options.get("include_usage"):
            yield self._usage_chunk(model, reply)
        yield b"data: [DONE]\n\n"

    def _tool_call(self, model: str, index: int, step: ToolUse) -> Iterator[bytes]:
        start = {"index": index, "id": step.call_id, "type": "function"}
        start["function"] = {"name": step.name, "arguments": ""}
        yield self._chunk(model, {"tool_calls": [start]})
        for fragment in step.argument_chunks:
            piece = {"index": index, "function": {"arguments": fragment}}
            yield self._chunk(model, {"tool_calls": [piece]})

    @staticmethod
    def _chunk(model: str, delta: dict[str, object], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _openai_frame(model, choices=[choice])

    @staticmethod
    def _usage_chunk(model: str, reply: Reply) -> bytes:
        usage = {
            "prompt_tokens": reply.input_tokens,
            "completion_tokens": reply.output_tokens,
            "total_tokens": reply.input_tokens + reply.output_tokens,
        }
        return _openai_frame(model, choices=[], usage=usage)


def _openai_frame(model: str, **fields: object) -> bytes:
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        **fields,
    }
    return f"data: {_json(chunk)}\n\n".encode()


def openai_sse(*chunks: Mapping[str, object], done: bool = True) -> bytes:
    """Hand-built OpenAI stream: each mapping becomes one `data:` line (for `RawReply`)."""
    frames = [f"data: {_json(dict(chunk))}\n\n" for chunk in chunks]
    if done:
        frames.append("data: [DONE]\n\n")
    return "".join(frames).encode()


class FakeAnthropicServer(FakeLLMServer):
    """`POST /v1/messages` streaming `event: <type>` / `data: {...}` server-sent events."""

    path = "/v1/messages"
    base_path = ""

    _ERROR_TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }

    def error_body(self, error: ErrorReply) -> dict[str, object]:
        default_type = "api_error" if error.status >= 500 else "invalid_request_error"
        error_type = error.error_type or self._ERROR_TYPES.get(error.status, default_type)
        return {"type": "error", "error": {"type": error_type, "message": error.message}}

    def render(self, reply: Reply, body: dict[str, object]) -> Iterator[bytes | Pause]:
        yield self._message_start(str(body.get("model", "unknown")), reply)
        yield _anthropic_event("ping", {"type": "ping"})
        blocks = _BlockWriter()
        for step in reply.steps:
            if isinstance(step, StreamError):
                error = {"type": step.error_type, "message": step.message}
                yield _anthropic_event("error", {"type": "error", "error": error})
                return
            if isinstance(step, Pause):
                yield step
            else:
                yield from blocks.write(step)
        yield from blocks.close()
        if not reply.finish:
            return
        stop_reason = reply.stop_reason or ("tool_use" if reply.has_tool_use else "end_turn")
        delta = {"stop_reason": stop_reason, "stop_sequence": None}
        usage = {"output_tokens": reply.output_tokens}
        yield _anthropic_event("message_delta", {"delta": delta, "usage": usage})
        yield _anthropic_event("message_stop", {})

    @staticmethod
    def _message_start(model: str, reply: Reply) -> bytes:
        message: dict[str, object] = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": 1},
        }
        return _anthropic_event("message_start", {"message": message})


class _BlockWriter:
    """Opens, fills and closes content blocks; consecutive text or reasoning share a block."""

    def __init__(self) -> None:
        self._index = -1
        self._open_kind: str | None = None

    def write(self, step: Text | Reasoning | ToolUse) -> Iterator[bytes]:
        if isinstance(step, ToolUse):
            yield from self.close()
            yield from self._open("tool_use", {"id": step.call_id, "name": step.name, "input": {}})
            for fragment in step.argument_chunks:
                yield self._delta({"type": "input_json_delta", "partial_json": fragment})
            yield from self.close()
        elif isinstance(step, Reasoning):
            if self._open_kind != "thinking":
                yield from self.close()
                yield from self._open("thinking", {"thinking": "", "signature": ""})
            yield self._delta({"type": "thinking_delta", "thinking": step.text})
        else:
            if self._open_kind != "text":
                yield from self.close()
                yield from self._open("text", {"text": ""})
            yield self._delta({"type": "text_delta", "text": step.text})

    def close(self) -> Iterator[bytes]:
        if self._open_kind is None:
            return
        if self._open_kind == "thinking":
            yield self._delta({"type": "signature_delta", "signature": "fake-signature"})
        self._open_kind = None
        yield _anthropic_event("content_block_stop", {"index": self._index})

    def _open(self, kind: str, fields: dict[str, object]) -> Iterator[bytes]:
        self._index += 1
        self._open_kind = kind
        block = {"type": kind, **fields}
        yield _anthropic_event(
            "content_block_start", {"index": self._index, "content_block": block}
        )

    def _delta(self, delta: dict[str, object]) -> bytes:
        return _anthropic_event("content_block_delta", {"index": self._index, "delta": delta})


def _anthropic_event(event_type: str, data: Mapping[str, object]) -> bytes:
    payload = {"type": event_type, **data}
    return f"event: {event_type}\ndata: {_json(payload)}\n\n".encode()


def anthropic_sse(*events: Mapping[str, object]) -> bytes:
    """Hand-built Anthropic stream: each mapping (with its `type`) becomes one event."""
    return b"".join(_anthropic_event(str(event["type"]), event) for event in events)
