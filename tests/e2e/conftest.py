"""Real `threadline` processes for the end-to-end tests.

`serve_process` starts `python -m threadline serve --port <free port>` in a directory of the
test's choosing with exactly the environment it is given (every inherited `THREADLINE_*`
variable removed first), waits (bounded) until `/healthz` answers, and at teardown stops every
process it started: SIGTERM, then SIGKILL if it has not exited in time. `run_cli` runs another
command (`migrate`) to completion, bounded. `dedicated_postgres` is a database of its own on the
session's PostgreSQL server, not migrated, dropped afterwards, with a Redis key prefix of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tests import services as test_services

# Generous: on a loaded two-core machine a cold start (imports, migrations) takes seconds.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
CLI_TIMEOUT = 60.0
# Settings that a developer's shell might carry and that would change what is tested.
_FOREIGN_VARIABLES = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environment(**variables: str) -> dict[str, str]:
    """This process's environment without any THREADLINE_* (or provider) variable, plus
    `variables`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("THREADLINE_") and key not in _FOREIGN_VARIABLES
    }
    env.update(variables)
    return env


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> int:
        """SIGTERM (graceful shutdown), then SIGKILL after STOP_TIMEOUT. The exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
                raise AssertionError(
                    f"the server ignored SIGTERM for {STOP_TIMEOUT} s:\n{self.output()[-3000:]}"
                ) from None
        return self.process.returncode


def _launch(
    args: list[str], *, cwd: Path, env: dict[str, str], port: int, log_dir: Path
) -> ServerProcess:
    # The log lives outside `cwd`: a test may check what the server created there.
    log_path = log_dir / f"server-{port}-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "threadline", *args],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return ServerProcess(process, port, log_path)


def _wait_healthy(server: ServerProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(
                f"the server exited with {server.process.returncode} before it was healthy:\n"
                f"{server.output()[-3000:]}"
            )
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no /healthz within {START_TIMEOUT} s:\n{server.output()[-3000:]}")


StartServer = Callable[..., ServerProcess]


@pytest.fixture
def serve_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """`serve_process(cwd, env, wait=True)`: a started `threadline serve` (healthy if `wait`)."""
    started: list[ServerProcess] = []
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(cwd: Path, env: dict[str, str], *, wait: bool = True) -> ServerProcess:
        port = free_port()
        server = _launch(
            ["serve", "--port", str(port)], cwd=cwd, env=env, port=port, log_dir=log_dir
        )
        started.append(server)
        if wait:
            _wait_healthy(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(timeout=STOP_TIMEOUT)


def run_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "threadline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


@dataclass(frozen=True)
class DedicatedPostgres:
    database_url: str
    redis_url: str
    redis_prefix: str


@pytest.fixture
def dedicated_postgres(postgres_admin_url: str, redis_url: str) -> Iterator[DedicatedPostgres]:
    name = test_services.unique_name("threadline_e2e")
    url = asyncio.run(test_services.create_database(postgres_admin_url, name))
    prefix = f"tle2e-{uuid.uuid4().hex[:10]}"
    try:
        yield DedicatedPostgres(url, redis_url, prefix)
    finally:
        asyncio.run(test_services.drop_database(postgres_admin_url, name))
        client = redis.Redis.from_url(redis_url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
