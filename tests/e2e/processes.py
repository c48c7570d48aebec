"""A small deployment of real processes for the worker and fault tests: `threadline serve` (its
embedded worker off) and `threadline worker` processes on one dedicated PostgreSQL database
and one Redis key prefix, with the same signing key, offering `tests.e2e.process_agents`.

`cluster` (a fixture) migrates the database and yields a `Cluster`; every process it started
is stopped at teardown (SIGTERM, then SIGKILL after a bounded wait), before the database is
dropped. Every wait here is bounded and polls a condition.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.e2e.conftest import DedicatedPostgres, clean_environment, free_port, run_cli
from tests.e2e.process_agents import TOOL_LOG_VARIABLE
from threadline.settings import Settings
from threadline.store.db import create_engine

REPOSITORY = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def wait_for(predicate: Callable[[], object], *, seconds: float, what: str) -> object:
    """Poll `predicate` until it returns something truthy, and return that."""
    deadline = time.monotonic() + seconds
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}; last: {last!r}")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running(self) -> bool:
        return self.popen.poll() is None

    def terminate(self, *, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait for the exit code (SIGKILL and fail if it takes longer)."""
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=STOP_TIMEOUT)
            raise AssertionError(f"{self.name} ignored SIGTERM:\n{self.log()[-3000:]}") from None

    def kill(self) -> None:
        """SIGKILL: the process dies at once, releasing nothing."""
        self.popen.kill()
        self.popen.wait(timeout=STOP_TIMEOUT)


@dataclass
class Cluster:
    database: DedicatedPostgres
    workdir: Path
    tool_log: Path
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    started: list[Process] = field(default_factory=list)
    clients: list[Api] = field(default_factory=list)

    def env(self, **settings: object) -> dict[str, str]:
        env = clean_environment(
            THREADLINE_ENVIRONMENT="test",
            THREADLINE_DATABASE_URL=self.database.database_url,
            THREADLINE_REDIS_URL=self.database.redis_url,
            THREADLINE_REDIS_PREFIX=self.database.redis_prefix,
            THREADLINE_SECRET_KEY=self.secret,
            THREADLINE_AGENTS="tests.e2e.process_agents",
            THREADLINE_LOG_LEVEL="INFO",
            PYTHONPATH=str(REPOSITORY),
        )
        env[TOOL_LOG_VARIABLE] = str(self.tool_log)
        env.update({f"THREADLINE_{k.upper()}": str(v) for k, v in settings.items()})
        return env

    def _launch(self, name: str, args: list[str], env: dict[str, str], port: int | None) -> Process:
        log_path = self.workdir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "threadline", *args],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        process = Process(name, popen, log_path, port)
        self.started.append(process)
        return process

    def api(self, **settings: object) -> Process:
        """A `threadline serve` that executes no runs (its embedded worker is off), ready."""
        port = free_port()
        env = self.env(embedded_worker="false", **settings)
        process = self._launch("api", ["serve", "--port", str(port)], env, port)

        def ready() -> bool:
            if not process.running():
                raise AssertionError(f"serve exited early:\n{process.log()[-3000:]}")
            try:
                return httpx.get(f"{process.base_url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, seconds=START_TIMEOUT, what="the API process to be ready")
        return process

    def worker(self, *, wait: bool = True, **settings: object) -> Process:
        """A `threadline worker`, ready (its runtime open) unless `wait` is false."""
        process = self._launch("worker", ["worker"], self.env(**settings), None)
        if wait:

            def ready() -> bool:
                if not process.running():
                    raise AssertionError(f"worker exited early:\n{process.log()[-3000:]}")
                return "ready" in process.log()

            wait_for(ready, seconds=START_TIMEOUT, what="the worker to be ready")
        return process

    def query(self, sql: str, **params: object) -> list[dict[str, object]]:
        """Rows of a read-only query on the deployment's database, as the test sees it."""

        async def run() -> list[dict[str, object]]:
            engine = create_engine(Settings(database_url=self.database.database_url).database_url)
            try:
                async with engine.connect() as conn:
                    result = await conn.execute(sa.text(sql), params)
                    return [dict(row._mapping) for row in result]
            finally:
                await engine.dispose()

        return asyncio.run(run())

    def tool_executions(self) -> list[str]:
        """The run id of every tool execution so far, by any process."""
        return self.tool_log.read_text().split() if self.tool_log.exists() else []

    def client(self, process: Process) -> Api:
        """HTTP shortcuts against `process`, closed at teardown."""
        api = Api(process)
        self.clients.append(api)
        return api

    def stop_all(self) -> None:
        for api in self.clients:
            api.http.close()
        for process in self.started:
            if process.running():
                process.popen.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait(timeout=STOP_TIMEOUT)


@pytest.fixture
def cluster(dedicated_postgres: DedicatedPostgres, tmp_path: Path) -> Iterator[Cluster]:
    workdir = tmp_path / "cluster"
    workdir.mkdir()
    deployment = Cluster(dedicated_postgres, workdir, tmp_path / "tool-executions.log")
    migrated = run_cli("migrate", cwd=workdir, env=deployment.env())
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    try:
        yield deployment
    finally:
        deployment.stop_all()


class Api:
    """Synchronous HTTP shortcuts against one API process."""

    def __init__(self, process: Process) -> None:
        self.http = httpx.Client(base_url=process.base_url, timeout=10)

    def user(self) -> dict[str, str]:
        email = f"user-{uuid.uuid4().hex[:12]}@example.com"
        body = {"email": email, "password": "correct horse battery"}
        created = self.http.post("/v1/auth/register", json=body)
        assert created.status_code == 201, created.text
        token = self.http.post("/v1/auth/token", json=body)
        assert token.status_code == 200, token.text
        return {"Authorization": f"Bearer {token.json()['access_token']}"}

    def thread(self, headers: dict[str, str]) -> str:
        response = self.http.post("/v1/threads", json={"title": "processes"}, headers=headers)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def start(self, headers: dict[str, str], thread: str, content: str, agent: str) -> str:
        response = self.http.post(
            f"/v1/threads/{thread}/messages",
            json={"content": content, "run": {"agent": agent}},
            headers=headers,
        )
        assert response.status_code == 201, response.text
        return str(response.json()["run"]["id"])

    def run(self, headers: dict[str, str], thread: str, run_id: str) -> dict[str, object]:
        response = self.http.get(f"/v1/threads/{thread}/runs/{run_id}", headers=headers)
        assert response.status_code == 200, response.text
        run: dict[str, object] = response.json()
        return run

    def wait_run(
        self, headers: dict[str, str], thread: str, run_id: str, statuses: set[str], seconds: float
    ) -> dict[str, object]:
        def reached() -> dict[str, object] | None:
            run = self.run(headers, thread, run_id)
            return run if run["status"] in statuses else None

        result = wait_for(reached, seconds=seconds, what=f"run {run_id} to reach {statuses}")
        assert isinstance(result, dict)
        return result

    def messages(self, headers: dict[str, str], thread: str) -> list[dict[str, object]]:
        response = self.http.get(
            f"/v1/threads/{thread}/messages", params={"limit": 100}, headers=headers
        )
        assert response.status_code == 200, response.text
        data: list[dict[str, object]] = response.json()["data"]
        return data
