"""Helpers of the Python client's end-to-end tests (`tests/e2e/test_client_*.py`).

- `CuttableProxy`: a TCP forwarder between the client and a real server that the test can
  cut (every open connection aborted, no close frame, as when a network drops) and take down
  (new connections are aborted at once) and bring back, so the client's reconnect and resume
  run for real, deterministically. `threaded_proxy` runs one on a thread of its own.
- `new_user`: a registered, signed-in `AsyncThreadline` of a fresh user.
- `RestartableServer`: a `threadline serve` that can be stopped and started again on the same
  port and database, for a client that must resume across the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.e2e.client_agents import GATES_VARIABLE
from tests.e2e.sockets_support import (
    ServerProcess,
    _clean_environment,
    _wait_ready,
    free_port,
)
from tests.live_order import assert_ordered
from threadline.client import AsyncThreadline, Event

PASSWORD = "correct horse battery staple"
REPO = Path(__file__).resolve().parents[2]
WAIT = 30.0


def new_email(tag: str = "client") -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}@example.com"


@asynccontextmanager
async def new_user(base_url: str, **options: float) -> AsyncIterator[AsyncThreadline]:
    async with AsyncThreadline(base_url, **options) as client:
        email = new_email()
        await client.register(email, PASSWORD)
        await client.login(email, PASSWORD)
        yield client


class CuttableProxy:
    """Forwards 127.0.0.1:`port` to the server's port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self.refused = 0
        self._up = True
        self._refusal = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            async with asyncio.timeout(WAIT):
                await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=WAIT)

    def cut(self) -> None:
        """Abort every open connection (both sides see a reset, no close handshake)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def down(self) -> None:
        self._up = False
        self._refusal.clear()
        self.cut()

    def up(self) -> None:
        self._up = True

    async def refused_one(self, within: float = WAIT) -> None:
        """Wait until a connection attempt has been refused since `down()`."""
        async with asyncio.timeout(within):
            await self._refusal.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up:
            self.refused += 1
            self._refusal.set()
            writer.transport.abort()
            return
        self.accepted += 1
        try:
            async with asyncio.timeout(WAIT):
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def seqs(events: list[Event]) -> list[int]:
    return [event.seq for event in events]


def assert_no_duplicate_or_reorder(events: list[Event]) -> None:
    """Durable seqs only go up, each once; each delta right after the durable event it
    follows (`tests/live_order.py`)."""
    wire = [{"type": e.type, "seq": e.seq, "ephemeral": e.ephemeral} for e in events]
    try:
        assert_ordered(wire)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {[(e.seq, e.type) for e in events]}") from exc


class RestartableServer:
    """`threadline serve` on a fixed port and SQLite file; `start()` again after `stop()`.

    It serves the `gated` agent of `tests.e2e.client_agents` besides `demo`: `open_gate()`
    lets a run of that agent on the thread go on.
    """

    def __init__(self, workdir: Path, **settings: object) -> None:
        self.workdir = workdir
        self.gates = workdir / "gates"
        self.gates.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = {
            **_clean_environment(),
            "THREADLINE_ENVIRONMENT": "test",
            "THREADLINE_SECRET_KEY": secrets.token_urlsafe(48),  # tokens outlive a restart
            "THREADLINE_LOG_LEVEL": "WARNING",
            "THREADLINE_DATABASE_URL": f"sqlite:///{workdir / 'threadline.db'}",
            "THREADLINE_AGENTS": "tests.e2e.client_agents",
            # Cheap password hashing: every test registers users; the behaviour is the same.
            "THREADLINE_PASSWORD_TIME_COST": "1",
            "THREADLINE_PASSWORD_MEMORY_KIB": "64",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            GATES_VARIABLE: str(self.gates),
            **{f"THREADLINE_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.process: ServerProcess | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log_path = self.workdir / f"server-{self.starts}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "threadline", "serve", "--port", str(self.port)],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.process = ServerProcess(process, self.port, log_path, self.workdir)
        _wait_ready(self.process)

    def stop(self) -> None:
        """SIGTERM and wait for the process to exit (graceful shutdown, bounded)."""
        if self.process is not None:
            self.process.stop()
            self.process = None

    def open_gate(self, thread_id: str) -> None:
        (self.gates / thread_id).touch()


@contextlib.contextmanager
def running_server(workdir: Path, **settings: object) -> Iterator[RestartableServer]:
    server = RestartableServer(workdir, **settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class ThreadedProxy:
    """A `CuttableProxy` on an event loop of its own thread, for sync tests (and for clients
    in other processes): `cut()`, `down()` and `up()` may be called from any thread."""

    def __init__(self, proxy: CuttableProxy, loop: asyncio.AbstractEventLoop) -> None:
        self.proxy = proxy
        self._loop = loop

    @property
    def url(self) -> str:
        return self.proxy.url

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self.proxy.cut)

    def down(self) -> None:
        self._loop.call_soon_threadsafe(self.proxy.down)

    def up(self) -> None:
        self._loop.call_soon_threadsafe(self.proxy.up)

    def refused_one(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.refused_one(), self._loop).result(WAIT + 5)


@contextlib.contextmanager
def threaded_proxy(target_port: int) -> Iterator[ThreadedProxy]:
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="proxy", daemon=True)
    runner.start()
    proxy = CuttableProxy(target_port)
    try:
        asyncio.run_coroutine_threadsafe(proxy.__aenter__(), loop).result(WAIT)
        yield ThreadedProxy(proxy, loop)
    finally:
        asyncio.run_coroutine_threadsafe(proxy.__aexit__(), loop).result(WAIT)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(WAIT)
        loop.close()
