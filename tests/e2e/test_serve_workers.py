"""`threadline serve --workers 2` and `threadline worker --processes 2` (issue 11 item 4): real
processes on one PostgreSQL database and one Redis.

- Two API processes, children of the one `serve`, accept on its one port: which child holds a
  connection is read from the children's own sockets (psutil), and each child's /metrics is
  read over a connection that child accepted.
- Users whose sockets are on either child receive all and only their own events, of runs
  executed by either child's embedded worker (one run at a time each, so both must work).
- SIGINT to the supervisor closes every socket with 1012 (resume elsewhere), stops both
  children (a running run is handed back, or finished by the other child as it stops: never
  lost), exits 130 as a lone server does, prints no traceback and leaves no child behind.
- On SQLite, or without Redis, `--workers 2` is one line and exit status 2, nothing started.
- A worker process that dies is reported and the supervisor stops the others and exits 1.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import clean_environment, run_cli
from tests.e2e.scale_support import Cluster, cluster, replay
from tests.e2e.sockets_support import (
    TERMINAL,
    EventSocket,
    ServerProcess,
    User,
    assert_run_lifecycle,
    assert_strictly_increasing,
    compact,
    create_thread,
    durable,
    free_port,
    http_client,
    open_socket,
    register,
)
from threadline.settings import Settings
from threadline.store.db import create_engine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
START_TIMEOUT = 90.0
STOP_WITHIN_SECONDS = 15.0
MAX_USERS = 40


def _children(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return psutil.Process(process.pid).children(recursive=True)


def _wait(predicate: object, *, seconds: float, what: str) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()  # type: ignore[operator]
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def _owner(children: list[psutil.Process], client_port: int) -> int | None:
    """The pid of the child holding the server end of the client's connection, if accepted."""
    for child in children:
        for conn in child.net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == client_port:
                return child.pid
    return None


def _metrics_of(port: int, children: list[psutil.Process], pid: int) -> dict[str, float]:
    """/metrics of the child `pid`, over a connection that child accepted."""
    for _ in range(MAX_USERS):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            local = conn.getsockname()[1]
            owner = _wait(
                lambda local=local: _owner(children, local), seconds=10, what="the accept"
            )
            if owner != pid:
                continue
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := conn.recv(65536):
                raw += chunk
        body = raw.decode().split("\r\n\r\n", 1)[1]
        samples = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples
    raise AssertionError(f"no connection reached pid {pid}")


@pytest.fixture
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    with cluster(request, tmp_path) as c:
        yield c


def _serve(c: Cluster, *args: str, **settings: object) -> ServerProcess:
    port = free_port()
    env = {**c.env, "THREADLINE_LOG_LEVEL": "INFO"}
    env.update({f"THREADLINE_{k.upper()}": str(v) for k, v in settings.items()})
    log_path = c.workdir / f"serve-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "threadline", "serve", "--port", str(port), *args],
            cwd=c.workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = ServerProcess(process, port, log_path, c.workdir)
    c.stack.callback(server.stop)

    def both_ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}:\n{server.log_tail()}")
        return log_path.read_text().count("Application startup complete") == 2

    _wait(both_ready, seconds=START_TIMEOUT, what="both API processes")
    return server


async def _users_on_both(
    server: ServerProcess, children: list[psutil.Process], stack: AsyncExitStack
) -> list[tuple[User, str, EventSocket, int]]:
    """Users (with a thread and a subscribed socket) until each child holds at least two."""
    sessions: list[tuple[User, str, EventSocket, int]] = []
    async with http_client(server) as http:
        while len(sessions) < MAX_USERS:
            user = await register(http)
            thread_id = await create_thread(http, user)
            sock = await stack.enter_async_context(open_socket(server, user.token))
            local_port = sock.ws.local_address[1]
            owner = await asyncio.to_thread(
                _wait,
                lambda port=local_port: _owner(children, port),
                seconds=10,
                what="the socket's owner",
            )
            await sock.subscribe(thread_id, after_seq=0)
            sessions.append((user, thread_id, sock, int(str(owner))))
            per_child = [sum(1 for s in sessions if s[3] == c.pid) for c in children]
            if min(per_child) >= 2:
                return sessions
    raise AssertionError(f"{MAX_USERS} sockets did not reach both API processes")


async def _run_and_check(server: ServerProcess, session: tuple[User, str, EventSocket, int]) -> str:
    user, thread_id, sock, _ = session
    start = len(sock.messages)
    await sock.send(
        {
            "type": "send_message",
            "thread_id": thread_id,
            "content": "what is 12*7?",
            "agent": "demo",
        }
    )
    run_id = str((await sock.until_type("message_accepted"))["run_id"])
    await sock.until(lambda m: m.get("run_id") == run_id and m.get("type") in TERMINAL, 120)
    await sock.ping()  # anything late (a duplicate, a foreign event) arrives before the pong
    received = [m for m in sock.messages[start:] if "seq" in m]
    assert {m["thread_id"] for m in received} == {thread_id}, "another thread's events"
    assert_strictly_increasing(received)
    assert_run_lifecycle(received, run_id)
    ended = [m["type"] for m in received if m["run_id"] == run_id and m["type"] in TERMINAL]
    assert ended == ["agent_completed"], ended
    stored = await replay(server, user, thread_id, int(received[0]["seq"]) - 1)
    assert compact(durable(received)) == compact(stored)  # all of them, once, nothing else
    return run_id


async def test_two_api_processes_share_the_port_and_every_user_gets_their_own_events(
    deployment: Cluster,
) -> None:
    server = _serve(
        deployment,
        "--workers",
        "2",
        worker_concurrency=1,
        demo_delay_seconds=0.5,
        shutdown_grace_seconds=0,
    )
    children = _children(server.process)
    assert len({c.pid for c in children}) == 2, children
    async with AsyncExitStack() as stack:
        async with asyncio.timeout(240):
            sessions = await _users_on_both(server, children, stack)
            await asyncio.gather(*(_run_and_check(server, s) for s in sessions))
        started = [
            _metrics_of(server.port, children, c.pid)["threadline_runs_started_total"]
            for c in children
        ]
        # One run at a time per process and a run per user at once: both executed some.
        assert sum(started) == len(sessions) and min(started) >= 1, started

        user, thread_id, sock, _ = sessions[0]
        async with http_client(server) as http:
            posted = await http.post(
                f"/v1/threads/{thread_id}/messages",
                headers=user.headers,
                json={"content": "what is 6*7?", "run": {"agent": "demo"}},
            )
        run_id = posted.json()["run"]["id"]
        await sock.until_type("agent_started", run_id=run_id)

        server.process.send_signal(signal.SIGINT)
        async with asyncio.timeout(STOP_WITHIN_SECONDS):
            for _, _, each, _ in sessions:
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await each.ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        code = await asyncio.to_thread(server.process.wait, STOP_WITHIN_SECONDS)
    output = server.log_path.read_text()
    assert code == 130, output[-3000:]  # what a lone `serve` exits with on SIGINT
    assert "Traceback" not in output and "ERROR" not in output, output[-4000:]
    assert output.count("Application shutdown complete") == 2, output[-3000:]
    assert not [c.pid for c in children if c.is_running() and c.status() != "zombie"]
    # Handed back to the queue by the process executing it; the other process, stopping at the
    # same moment, may still claim and finish it. Never lost, never failed.
    assert await _run_status(deployment, run_id) in ("queued", "completed"), output[-6000:]


async def _run_status(c: Cluster, run_id: str) -> str:
    url = Settings(database_url=c.env["THREADLINE_DATABASE_URL"]).database_url
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            query = sa.text("SELECT status FROM runs WHERE id = :id")
            return str((await conn.execute(query, {"id": run_id})).scalar_one())
    finally:
        await engine.dispose()


def _one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_workers_above_one_are_refused_on_sqlite_and_without_redis(tmp_path: Path) -> None:
    workdir = tmp_path / "empty"
    workdir.mkdir()
    result = run_cli("serve", "--workers", "2", cwd=workdir, env=clean_environment())
    line = _one_line_failure(result, "--workers 2", "SQLite", "one writer", "event bus")
    assert line.startswith("Configuration error: THREADLINE_WORKERS"), line
    assert list(workdir.iterdir()) == []  # no database, no secret key: nothing started

    env = clean_environment(THREADLINE_DATABASE_URL="postgresql://u@127.0.0.1:1/none")
    result = run_cli("serve", "--workers", "2", cwd=workdir, env=env)
    _one_line_failure(result, "--workers 2", "THREADLINE_REDIS_URL")
    result = run_cli("worker", "--processes", "2", cwd=workdir, env=clean_environment())
    _one_line_failure(result, "--processes 2", "SQLite")
    assert list(workdir.iterdir()) == []


def test_worker_processes_stop_together_and_a_dead_one_is_reported(deployment: Cluster) -> None:
    def start() -> tuple[subprocess.Popen[bytes], Path]:
        log_path = deployment.workdir / f"workers-{time.monotonic_ns()}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "threadline", "worker", "--processes", "2"],
                cwd=deployment.workdir,
                env={**deployment.env, "THREADLINE_LOG_LEVEL": "INFO"},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deployment.stack.callback(lambda: process.poll() is None and process.kill())
        _wait(
            lambda: log_path.read_text().count(" ready") >= 2,
            seconds=START_TIMEOUT,
            what="both workers",
        )
        return process, log_path

    process, log_path = start()
    children = _children(process)
    assert len(children) == 2
    process.send_signal(signal.SIGTERM)
    assert process.wait(STOP_WITHIN_SECONDS) == 0  # as a lone worker
    assert "Traceback" not in log_path.read_text()
    assert not [c.pid for c in children if c.is_running() and c.status() != "zombie"]

    process, log_path = start()
    first, second = _children(process)
    first.kill()
    assert process.wait(STOP_WITHIN_SECONDS) == 1
    output = log_path.read_text()
    assert (
        f"Worker process 1 of 2 (pid {first.pid}) exited with status -9; stopping the others"
        in output
    ), output
    assert "Traceback" not in output
    _wait(
        lambda: not second.is_running() or second.status() == "zombie",
        seconds=5,
        what="the other worker to stop",
    )
