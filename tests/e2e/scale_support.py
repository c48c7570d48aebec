"""Several real processes on one PostgreSQL database and one Redis: the scale-out set-up.

`cluster(request, tmp_path)` yields a `Cluster` whose `api(**settings)` starts
`threadline serve` with the embedded worker off (waits for `/readyz`) and whose
`worker(**settings)` starts `threadline worker`; settings become `THREADLINE_<NAME>` variables,
so a test can point every process at a private Redis (`redis_url=...`). Every process is
stopped on exit (SIGTERM, then SIGKILL), before the database is dropped; a test may SIGKILL
one itself by its pid (`kill`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.sockets_support import (
    JSON,
    SERVER_STOP_TIMEOUT,
    EventSocket,
    ServerProcess,
    User,
    _clean_environment,
    _postgres_backend,
    open_socket,
    start_server,
)


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(SERVER_STOP_TIMEOUT)


def kill(process: ServerProcess | WorkerProcess) -> None:
    """SIGKILL by pid: no shutdown, no goodbye to clients or to the database."""
    os.kill(process.pid, signal.SIGKILL)
    process.process.wait(SERVER_STOP_TIMEOUT)


@dataclass
class Cluster:
    env: dict[str, str]
    workdir: Path
    stack: contextlib.ExitStack
    apis: list[ServerProcess] = field(default_factory=list)
    workers: list[WorkerProcess] = field(default_factory=list)

    def _env(self, settings: dict[str, object]) -> dict[str, str]:
        env = dict(self.env)
        env.update({f"THREADLINE_{k.upper()}": str(v) for k, v in settings.items()})
        return env

    def api(self, **settings: object) -> ServerProcess:
        server = start_server(self.workdir, self._env({"embedded_worker": "false", **settings}))
        self.stack.callback(server.stop)
        self.apis.append(server)
        return server

    def worker(self, **settings: object) -> WorkerProcess:
        log_path = self.workdir / f"worker-{uuid.uuid4().hex[:6]}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "threadline", "worker"],
                cwd=self.workdir,
                env=self._env(settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        worker = WorkerProcess(process, log_path)
        self.stack.callback(worker.stop)
        self.workers.append(worker)
        return worker

    def logs(self) -> str:
        parts = [f"--- api {s.port}\n{s.log_tail()}" for s in self.apis]
        parts += [f"--- worker {w.pid}\n{w.log_tail()}" for w in self.workers]
        return "\n".join(parts)


@contextlib.contextmanager
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    with contextlib.ExitStack() as stack:
        workdir = tmp_path / "cluster"
        workdir.mkdir(parents=True, exist_ok=True)
        backend = _postgres_backend(request, stack, workdir)
        env = {
            **_clean_environment(),
            "THREADLINE_ENVIRONMENT": "test",
            "THREADLINE_SECRET_KEY": secrets.token_urlsafe(48),
            "THREADLINE_LOG_LEVEL": "WARNING",
            "THREADLINE_PASSWORD_TIME_COST": "1",
            "THREADLINE_PASSWORD_MEMORY_KIB": "64",
            **backend.env,
        }
        yield Cluster(env, workdir, stack)


async def replay(server: ServerProcess, user: User, thread_id: str, after_seq: int) -> list[JSON]:
    """The stored events of the thread after `after_seq`, read through `server` (a subscribe's
    replay, closed by the pong of a ping sent after it)."""
    async with open_socket(server, user.token) as sock:
        return await replay_on(sock, thread_id, after_seq)


async def replay_on(sock: EventSocket, thread_id: str, after_seq: int) -> list[JSON]:
    start = len(sock.messages)
    await sock.subscribe(thread_id, after_seq=after_seq)
    await sock.ping()
    return [m for m in sock.messages[start:] if m.get("thread_id") == thread_id and "seq" in m]
