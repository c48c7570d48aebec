"""Helpers of the live-event end-to-end tests (`tests/e2e/test_sockets_*.py`).

Everything here talks to a real `threadline serve` process over real sockets:

- `threadline_server` (a fixture factory) starts `python -m threadline serve --port <free port>`
  in a temporary directory with `THREADLINE_*` variables, on the backend of the test: SQLite
  (the embedded default) or PostgreSQL + Redis (a dedicated database created with
  `tests.services.create_database` and migrated with `python -m threadline migrate`). It stops
  the process, drops the database and deletes the Redis keys afterwards.
- `EventSocket` is a WebSocket client (the `websockets` library) that keeps every frame and
  every message it received, with `batch` frames flattened, so a test can wait for a message
  and check ordering afterwards. `SSEStream` does the same for `GET /v1/threads/{id}/events`.
- Small HTTP shortcuts (register, thread, message, metrics) and order checks.

Every wait is bounded; no helper sleeps for a fixed time to let something happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests import services as test_services
from tests.live_order import assert_ordered

# Generous: a loaded two-core machine starts a server (imports, migrations) in several seconds.
SERVER_START_TIMEOUT = 90.0
SERVER_STOP_TIMEOUT = 30.0
WAIT = 30.0
"""Default bound of one wait for a message or a condition."""
PASSWORD = "correct horse battery staple"
TERMINAL = frozenset({"agent_completed", "agent_failed", "run_cancelled"})
EPHEMERAL = frozenset({"message_delta"})
RUN_ORDER = (
    "run_queued",
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "message_delta",
    "agent_completed",
)
JSON = dict[str, Any]
T = TypeVar("T")


# --------------------------------------------------------------------------- server process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A running `threadline serve`."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    workdir: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                self.process.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(SERVER_STOP_TIMEOUT)


_FOREIGN_VARIABLES = frozenset(
    {"OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"}
)


def _clean_environment() -> dict[str, str]:
    """This process's environment without THREADLINE_* or provider variables (they would
    configure the server under test behind the test's back)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("THREADLINE_") and k not in _FOREIGN_VARIABLES
    }


def _wait_ready(server: ServerProcess) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    with httpx.Client(base_url=server.base_url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"threadline serve exited with {server.process.returncode}:\n"
                    f"{server.log_tail()}"
                )
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # polling a process we do not control; bounded by the deadline
    server.stop()
    raise RuntimeError(f"threadline serve did not become ready:\n{server.log_tail()}")


def start_server(workdir: Path, env: dict[str, str]) -> ServerProcess:
    """Start `threadline serve` on a free port and wait until `/readyz` answers 200."""
    workdir.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for attempt in range(3):  # a free port can be taken by someone else before we bind it
        port = free_port()
        log_path = workdir / f"server-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "threadline", "serve", "--port", str(port)],
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = ServerProcess(process, port, log_path, workdir)
        try:
            _wait_ready(server)
        except RuntimeError as exc:
            server.stop()
            last_error = exc
            if "address already in use" in server.log_tail().lower() and attempt < 2:
                continue
            raise
        return server
    raise RuntimeError(f"could not start threadline serve: {last_error}")


@dataclass
class Backend:
    name: str
    env: dict[str, str]
    database_url: str


def _postgres_backend(
    request: pytest.FixtureRequest, stack: contextlib.ExitStack, workdir: Path
) -> Backend:
    admin_url = request.getfixturevalue("postgres_admin_url")
    redis_url = request.getfixturevalue("redis_url")
    name = test_services.unique_name("threadline_e2e_sockets")
    url = asyncio.run(test_services.create_database(admin_url, name))
    stack.callback(lambda: asyncio.run(test_services.drop_database(admin_url, name)))
    prefix = f"tle2e-{uuid.uuid4().hex[:10]}"
    stack.callback(_delete_redis_prefix, redis_url, prefix)
    env = {
        "THREADLINE_DATABASE_URL": url,
        "THREADLINE_REDIS_URL": redis_url,
        "THREADLINE_REDIS_PREFIX": prefix,
    }
    migrate = subprocess.run(
        [sys.executable, "-m", "threadline", "migrate"],
        cwd=workdir,
        env={**_clean_environment(), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    return Backend("postgres", env, url)


def _delete_redis_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


ServerFactory = Callable[..., ServerProcess]


@contextlib.contextmanager
def server_factory(
    backend_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[ServerFactory]:
    """Yield `start(**settings)`: a new server on this backend; `settings` become
    `THREADLINE_<NAME>` variables (`socket_queue_size=8` -> `THREADLINE_SOCKET_QUEUE_SIZE=8`).
    Every server started is stopped on exit, before its database is dropped."""
    with contextlib.ExitStack() as stack:
        workdir = tmp_path / "server"
        workdir.mkdir(parents=True, exist_ok=True)
        if backend_name == "postgres":
            backend = _postgres_backend(request, stack, workdir)
        else:
            url = f"sqlite:///{workdir / 'threadline.db'}"
            backend = Backend("sqlite", {"THREADLINE_DATABASE_URL": url}, url)

        def start(**settings: object) -> ServerProcess:
            env = {
                **_clean_environment(),
                "THREADLINE_ENVIRONMENT": "test",
                "THREADLINE_SECRET_KEY": secrets.token_urlsafe(48),
                "THREADLINE_LOG_LEVEL": "WARNING",
                **backend.env,
            }
            env.update({f"THREADLINE_{k.upper()}": str(v) for k, v in settings.items()})
            server = start_server(workdir, env)
            stack.callback(server.stop)
            return server

        yield start


# --------------------------------------------------------------------------- HTTP shortcuts


@dataclass(frozen=True)
class User:
    id: str
    email: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def http_client(server: ServerProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.base_url, timeout=httpx.Timeout(60.0))


async def register(http: httpx.AsyncClient) -> User:
    email = f"sock-{uuid.uuid4().hex[:12]}@example.com"
    credentials = {"email": email, "password": PASSWORD}
    created = await http.post("/v1/auth/register", json=credentials)
    assert created.status_code == 201, created.text
    token = await http.post("/v1/auth/token", json=credentials)
    assert token.status_code == 200, token.text
    return User(created.json()["id"], email, token.json()["access_token"])


async def create_thread(http: httpx.AsyncClient, user: User, title: str = "sockets") -> str:
    response = await http.post("/v1/threads", json={"title": title}, headers=user.headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def post_message(
    http: httpx.AsyncClient,
    user: User,
    thread_id: str,
    content: str,
    *,
    agent: str | None = None,
    strategy: str = "enqueue",
) -> JSON:
    body: JSON = {"content": content}
    if agent is not None:
        body["run"] = {"agent": agent, "multitask_strategy": strategy}
    response = await http.post(f"/v1/threads/{thread_id}/messages", json=body, headers=user.headers)
    assert response.status_code == 201, response.text
    posted: JSON = response.json()
    return posted


async def messages_of(http: httpx.AsyncClient, user: User, thread_id: str) -> list[JSON]:
    response = await http.get(
        f"/v1/threads/{thread_id}/messages", params={"limit": 100}, headers=user.headers
    )
    assert response.status_code == 200, response.text
    data: list[JSON] = response.json()["data"]
    return data


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$")


async def metrics(http: httpx.AsyncClient) -> dict[str, float]:
    """The server's Prometheus samples: `name` or `name{labels}` -> value."""
    response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    samples: dict[str, float] = {}
    for line in response.text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match and not line.startswith("#"):
            samples[match.group(1)] = float(match.group(2))
    return samples


async def wait_for_metrics(
    http: httpx.AsyncClient,
    condition: Callable[[dict[str, float]], bool],
    *,
    within: float = WAIT,
    interval: float = 0.1,
) -> dict[str, float]:
    """Poll /metrics until `condition` holds (the server has nothing to subscribe to)."""
    samples: dict[str, float] = {}
    try:
        async with asyncio.timeout(within):
            while True:
                samples = await metrics(http)
                if condition(samples):
                    return samples
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"metrics condition not met within {within} s: {samples}") from None


# --------------------------------------------------------------------------- WebSocket client


class EventSocket:
    """A WebSocket to `/v1/ws` that records what it receives.

    `frames` are the decoded frames as sent; `messages` the same with every `batch` frame
    replaced by its events, in order. `next()` returns the messages one by one.
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[JSON] = []
        self.messages: list[JSON] = []
        self._read = 0  # index in `messages` of the next one `next()` returns

    @property
    def events(self) -> list[JSON]:
        """Every event (a message with a `seq`) received so far."""
        return [m for m in self.messages if "seq" in m]

    async def send(self, message: JSON) -> None:
        async with asyncio.timeout(WAIT):
            await self.ws.send(json.dumps(message))

    async def _receive_frame(self) -> None:
        raw = await self.ws.recv()
        frame = json.loads(raw)
        assert isinstance(frame, dict), frame
        self.frames.append(frame)
        if frame.get("type") == "batch":
            events = frame["events"]
            assert isinstance(events, list) and len(events) > 1, frame
            self.messages.extend(events)
        else:
            self.messages.append(frame)

    async def next(self, within: float = WAIT) -> JSON:
        async with asyncio.timeout(within):
            while self._read >= len(self.messages):
                await self._receive_frame()
        message = self.messages[self._read]
        self._read += 1
        return message

    async def until(self, predicate: Callable[[JSON], bool], within: float = WAIT) -> JSON:
        """Read until a message matches `predicate`; return it (earlier ones stay recorded)."""
        try:
            async with asyncio.timeout(within):
                while True:
                    message = await self.next(within=within)
                    if predicate(message):
                        return message
        except TimeoutError:
            tail = self.messages[-5:]
            raise AssertionError(f"no matching message within {within} s; last: {tail}") from None

    async def until_type(self, kind: str, within: float = WAIT, **fields: object) -> JSON:
        return await self.until(
            lambda m: m.get("type") == kind and all(m.get(k) == v for k, v in fields.items()),
            within,
        )

    async def subscribe(self, thread_id: str, after_seq: int | None = None) -> JSON:
        message: JSON = {"type": "subscribe", "thread_id": thread_id}
        if after_seq is not None:
            message["after_seq"] = after_seq
        await self.send(message)
        return await self.until_type("snapshot", thread_id=thread_id)

    async def ping(self) -> None:
        """Round trip: everything the server queued before the pong has been received."""
        await self.send({"type": "ping"})
        await self.until_type("pong")

    async def drain_until_closed(self, within: float = WAIT) -> ConnectionClosed:
        """Read everything left until the server closes; return the close exception."""
        try:
            async with asyncio.timeout(within):
                while True:
                    await self._receive_frame()
        except ConnectionClosed as closed:
            return closed

    def abort(self) -> None:
        """Drop the connection abruptly: no close frame, the TCP connection is just cut."""
        transport = self.ws.transport
        assert transport is not None
        transport.abort()


@asynccontextmanager
async def open_socket(
    server: ServerProcess,
    token: str,
    *,
    auth: str = "subprotocol",
    **options: Any,
) -> AsyncIterator[EventSocket]:
    """An authenticated `EventSocket`. `auth` is `subprotocol` (the token in
    `Sec-WebSocket-Protocol`) or `message` (the token in a first `auth` message)."""
    subprotocols = ["threadline", f"bearer.{token}"] if auth == "subprotocol" else ["threadline"]
    options.setdefault("open_timeout", WAIT)
    options.setdefault("close_timeout", 10)
    async with asyncio.timeout(WAIT):
        ws = await connect(server.ws_url, subprotocols=subprotocols, **options)  # type: ignore[arg-type]
    try:
        sock = EventSocket(ws)
        if auth == "message":
            await sock.send({"type": "auth", "token": token})
        welcome = await sock.next()
        assert welcome["type"] == "authenticated", welcome
        yield sock
    finally:
        async with asyncio.timeout(WAIT):
            await ws.close()


@asynccontextmanager
async def open_stalling_socket(
    server: ServerProcess, token: str, **options: Any
) -> AsyncIterator[EventSocket]:
    """A socket whose reads can stall: whatever it is not reading backs up to the server."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    try:
        async with asyncio.timeout(30):
            await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", server.port))
    except BaseException:
        raw.close()
        raise
    options = {"compression": None, "max_queue": 1, **options}
    async with open_socket(server, token, sock=raw, **options) as sock:
        yield sock


@asynccontextmanager
async def in_background(coroutine: Coroutine[Any, Any, T]) -> AsyncIterator[asyncio.Task[T]]:
    """Run `coroutine` as a task for the block; cancel it if it is still running at the end
    (a failing test never leaves a reader behind)."""
    task = asyncio.create_task(coroutine)
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the block already saw it, or failed for another reason


# --------------------------------------------------------------------------- SSE client


class _StreamEnded(AssertionError):
    """The server ended the event stream."""


@dataclass
class SSEStream:
    """The frames of one `GET /v1/threads/{id}/events` response, parsed."""

    response: httpx.Response
    frames: list[JSON] = field(default_factory=list)
    _lines: AsyncIterator[str] | None = None

    @property
    def events(self) -> list[JSON]:
        """The `data` of every frame that has an `id` (the sequenced events)."""
        return [f["data"] for f in self.frames if f.get("id") is not None]

    async def next(self, within: float = WAIT) -> JSON:
        """The next frame: `{"id": str | None, "event": str, "data": JSON}`."""
        if self._lines is None:
            self._lines = self.response.aiter_lines()
        frame: JSON = {"id": None}
        data: list[str] = []
        async with asyncio.timeout(within):
            async for line in self._lines:
                if not line:
                    if data or "event" in frame:
                        frame["data"] = json.loads("\n".join(data)) if data else None
                        self.frames.append(frame)
                        return frame
                    continue
                if line.startswith(":"):
                    continue  # a comment: `: connected`, `: keep-alive`
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                elif name in ("id", "event"):
                    frame[name] = value
        raise _StreamEnded("the event stream ended")

    async def rest(self, within: float = WAIT) -> list[JSON]:
        """Every frame until the server ends the stream (which must happen `within`)."""
        frames: list[JSON] = []
        with contextlib.suppress(_StreamEnded):
            while True:
                frames.append(await self.next(within=within))
        return frames

    async def until(self, predicate: Callable[[JSON], bool], within: float = WAIT) -> JSON:
        try:
            async with asyncio.timeout(within):
                while True:
                    frame = await self.next(within=within)
                    if predicate(frame):
                        return frame
        except TimeoutError:
            raise AssertionError(f"no matching SSE frame within {within} s") from None


@asynccontextmanager
async def open_sse(
    http: httpx.AsyncClient,
    user: User,
    thread_id: str,
    *,
    last_event_id: int | None = None,
    after: int | None = None,
    after_seq: int | None = None,
) -> AsyncIterator[SSEStream]:
    headers = dict(user.headers)
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    params = {"after": after} if after is not None else {}
    if after_seq is not None:
        params["after_seq"] = after_seq
    async with asyncio.timeout(WAIT):
        request = http.build_request(
            "GET", f"/v1/threads/{thread_id}/events", headers=headers, params=params
        )
        response = await http.send(request, stream=True)
    stream = SSEStream(response)
    try:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield stream
    finally:
        async with asyncio.timeout(WAIT):
            await response.aclose()
            if stream._lines is not None:
                await stream._lines.aclose()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- checks


def durable(events: list[JSON]) -> list[JSON]:
    return [e for e in events if e["type"] not in EPHEMERAL]


def assert_strictly_increasing(messages: list[JSON], *, after_seq: int | None = None) -> None:
    """Within each thread, the durable events' seq numbers only go up (no reorder, no
    duplicate; above `after_seq` if given), and each delta carries the seq of the durable
    event right before it (`tests/live_order.py`)."""
    by_thread: dict[str, list[JSON]] = defaultdict(list)
    for message in messages:
        if "seq" in message:
            by_thread[str(message["thread_id"])].append(message)
    for thread_id, events in by_thread.items():
        try:
            assert_ordered(events, after_seq=after_seq)
        except AssertionError as exc:
            raise AssertionError(f"thread {thread_id}: {exc} in {compact(events)}") from exc


def assert_run_lifecycle(events: list[JSON], run_id: str) -> None:
    """The run's events come in the documented order and it ends exactly once."""
    kinds = [e["type"] for e in events if e.get("run_id") == run_id]
    terminal = [k for k in kinds if k in TERMINAL]
    assert len(terminal) == 1, f"run {run_id}: terminal events {terminal} in {kinds}"
    assert kinds[-1] in TERMINAL, f"run {run_id}: events after the terminal one: {kinds}"
    if kinds[0] == "run_queued":
        kinds = kinds[1:]
    assert kinds[0] == "agent_started", f"run {run_id}: {kinds}"


def compact(events: list[JSON]) -> list[tuple[int, str, str | None]]:
    return [(int(e["seq"]), str(e["type"]), e.get("run_id")) for e in events]
