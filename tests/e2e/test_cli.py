"""The first hour with the `threadline` command, as a new user meets it: real processes, a
temporary directory, the console script itself (not `python -m`, which would put the working
directory on the import path by itself).

Every mistake a user can fix ends in one line naming what to change, exit status 2, no
traceback and nothing created; a misspelled variable is warned about; logs have one format.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.e2e.conftest import clean_environment, free_port

pytestmark = pytest.mark.e2e

THREADLINE = str(Path(sys.executable).parent / "threadline")
TIMEOUT = 60.0
PASSWORD = "correct horse battery staple"


def run(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [THREADLINE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status 2 and a single line on stderr (warnings aside) containing every needle."""
    lines = [line for line in result.stderr.splitlines() if not line.startswith("Warning:")]
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


class Server:
    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str], port: int) -> None:
        self.port = port
        self.log = cwd.parent / f"serve-{uuid.uuid4().hex[:6]}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [THREADLINE, "serve", "--port", str(port), *args],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not healthy within {TIMEOUT} s:\n{self.output()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(TIMEOUT)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(TIMEOUT)


def _workdir(tmp_path: Path) -> Path:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return workdir


# ----------------------------------------------------------------- item 2: --agents mypkg.agents


AGENTS_MODULE = '''
from threadline import Agent, RunContext, tool


@tool
async def lookup_order(ctx: RunContext[None], order_id: str) -> str:
    """Find an order by its id.

    Args:
        order_id: The order number, e.g. "A-1042".
    """
    return f"Order {order_id}: shipped"


agents = [Agent(name="support", instructions="Help with orders.", model="demo",
                tools=(lookup_order,))]
'''


def test_serve_agents_imports_a_package_from_the_working_directory(
    tmp_path: Path, servers: list[Server]
):
    workdir = _workdir(tmp_path)
    (workdir / "mypkg").mkdir()
    (workdir / "mypkg" / "__init__.py").write_text("")
    (workdir / "mypkg" / "agents.py").write_text(AGENTS_MODULE)
    server = Server(
        ["--agents", "mypkg.agents"], cwd=workdir, env=clean_environment(), port=free_port()
    )
    servers.append(server)
    server.wait_healthy()
    email = f"a-{uuid.uuid4().hex[:8]}@example.com"
    with httpx.Client(base_url=server.url, timeout=30) as http:
        http.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
        token = http.post("/v1/auth/token", json={"email": email, "password": PASSWORD})
        listed = http.get(
            "/v1/agents", headers={"Authorization": f"Bearer {token.json()['access_token']}"}
        )
    assert listed.status_code == 200, listed.text
    names = {agent["name"] for agent in listed.json()["data"]}
    assert "support" in names, listed.json()


def test_app_dir_names_another_directory(tmp_path: Path):
    workdir, elsewhere = _workdir(tmp_path), tmp_path / "src"
    (elsewhere / "otherpkg").mkdir(parents=True)
    (elsewhere / "otherpkg" / "__init__.py").write_text("")
    (elsewhere / "otherpkg" / "agents.py").write_text(AGENTS_MODULE)
    # A port in use makes serve stop right after the agents loaded: a quick, honest probe.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        found = run(
            "serve",
            "--port",
            port,
            "--agents",
            "otherpkg.agents",
            "--app-dir",
            str(elsewhere),
            cwd=workdir,
            env=clean_environment(),
        )
        missing = run(
            "serve",
            "--port",
            port,
            "--agents",
            "otherpkg.agents",
            cwd=workdir,
            env=clean_environment(),
        )
    assert_one_line_failure(found, "already in use")
    assert_one_line_failure(missing, "Configuration error", "otherpkg")


# ----------------------------------------------------------------- item 3: settings


def test_a_bad_log_level_is_a_one_line_configuration_error(tmp_path: Path):
    result = run(
        "serve", cwd=_workdir(tmp_path), env=clean_environment(THREADLINE_LOG_LEVEL="verbose")
    )
    assert_one_line_failure(result, "Configuration error", "THREADLINE_LOG_LEVEL", "'verbose'")


def test_a_nonsense_cors_origin_is_refused(tmp_path: Path):
    result = run(
        "serve",
        cwd=_workdir(tmp_path),
        env=clean_environment(THREADLINE_CORS_ORIGINS="https://ok.example,localhost:3000"),
    )
    assert_one_line_failure(result, "THREADLINE_CORS_ORIGINS", "'localhost:3000'")


def test_a_misspelled_variable_is_warned_about_with_the_closest_real_one(tmp_path: Path):
    # `migrate` on the default SQLite file: a command that runs to completion.
    result = run("migrate", cwd=_workdir(tmp_path), env=clean_environment(THREADLINE_PORTT="9000"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == [
        "Warning: THREADLINE_PORTT is not a Threadline setting and is ignored; "
        "did you mean THREADLINE_PORT?"
    ]


# ----------------------------------------------------------------- item 4: database errors


@pytest.fixture
def silent_postgres() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (a hung PostgreSQL, a
    firewall that lets the SYN through, the wrong service behind a load balancer)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_a_database_that_never_answers_fails_within_the_connect_timeout(
    tmp_path: Path, silent_postgres: int, command: str
):
    env = clean_environment(
        THREADLINE_DATABASE_URL=f"postgresql://app:pw@127.0.0.1:{silent_postgres}/threadline",
        THREADLINE_DATABASE_CONNECT_TIMEOUT_SECONDS="1",
    )
    workdir = _workdir(tmp_path)
    started = time.monotonic()
    result = run(command, cwd=workdir, env=env)
    took = time.monotonic() - started
    line = assert_one_line_failure(
        result, f"127.0.0.1:{silent_postgres}/threadline", "no answer within 1 s"
    )
    assert "pw" not in line
    assert took < 15, took  # a 1 s timeout (doubled for the query) plus start-up
    assert list(workdir.iterdir()) == []


def test_migrate_against_an_unreachable_database_is_one_line(tmp_path: Path):
    port = free_port()  # nothing listens there
    env = clean_environment(THREADLINE_DATABASE_URL=f"postgresql://app@127.0.0.1:{port}/db")
    result = run("migrate", cwd=_workdir(tmp_path), env=env)
    assert_one_line_failure(
        result, "Database error", f"127.0.0.1:{port}/db", "THREADLINE_DATABASE_URL"
    )


# ----------------------------------------------------------------- item 5: port in use


def test_a_port_in_use_fails_in_one_line_and_creates_nothing(tmp_path: Path):
    workdir = _workdir(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", "--port", str(port), cwd=workdir, env=clean_environment())
    assert_one_line_failure(result, f"127.0.0.1:{port} is already in use", "--port")
    assert "Threadline on" not in result.stdout + result.stderr
    assert list(workdir.iterdir()) == []  # no database, no secret key


# ----------------------------------------------------------------- item 10: the command itself


def test_version_and_help(tmp_path: Path):
    from importlib.metadata import version

    env = clean_environment(COLUMNS="60")
    shown = run("--version", cwd=tmp_path, env=env)
    assert shown.returncode == 0 and shown.stdout.strip() == f"threadline {version('threadline')}"
    help_text = run("serve", "--help", cwd=tmp_path, env=env).stdout
    assert "<bool>" not in help_text and "<str>" not in help_text
    for option, default in (
        ("--host", "127.0.0.1"),
        ("--port", "8000"),
        ("--agents", "none"),
        ("--app-dir", "."),
        ("--workers", "THREADLINE_WORKERS, else 1"),
    ):
        entry = help_text[help_text.index(option) :]
        entry = entry[: entry.index("\n  --", 1)] if "\n  --" in entry[1:] else entry
        assert "[default:" in entry and default in entry, entry


def test_configuration_errors_are_not_wrapped_on_a_narrow_terminal(tmp_path: Path):
    env = clean_environment(COLUMNS="40", THREADLINE_DATABASE_URL="mysql://db/app")
    result = run("serve", cwd=_workdir(tmp_path), env=env)
    line = assert_one_line_failure(result, "THREADLINE_DATABASE_URL", "unsupported database")
    assert line.endswith("use postgresql://... or sqlite:///path"), line


# ----------------------------------------------------------------- item 11: one log format


def _traffic(server: Server) -> tuple[str, str]:
    """Sign up, use the token over HTTP and a WebSocket, hit a thread; (token, thread id)."""
    email = f"log-{uuid.uuid4().hex[:8]}@example.com"
    with httpx.Client(base_url=server.url, timeout=30) as http:
        http.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
        token = http.post("/v1/auth/token", json={"email": email, "password": PASSWORD}).json()[
            "access_token"
        ]
        headers = {"Authorization": f"Bearer {token}"}
        thread_id = http.post("/v1/threads", json={}, headers=headers).json()["id"]
        assert http.get(f"/v1/threads/{thread_id}", headers=headers).status_code == 200
        http.get("/v1/threads", params={"token": token}, headers=headers)  # a careless client
    with connect(
        server.url.replace("http", "ws") + "/v1/ws",
        subprotocols=["threadline", f"bearer.{token}"],  # type: ignore[list-item]
    ) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "authenticated"
    return token, thread_id


def test_development_logs_are_text_lines_with_ids_and_no_token(
    tmp_path: Path, servers: list[Server]
):
    server = Server([], cwd=_workdir(tmp_path), env=clean_environment(), port=free_port())
    servers.append(server)
    server.wait_healthy()
    token, thread_id = _traffic(server)
    server.stop()
    output = server.output()
    assert token not in output and token.split(".")[2] not in output
    access = [line for line in output.splitlines() if f'"GET /v1/threads/{thread_id} ' in line]
    assert len(access) == 1, output
    assert " INFO    uvicorn.access: " in access[0]
    assert f"thread_id={thread_id}" in access[0] and "user_id=usr_" in access[0]
    assert "request_id=" in access[0]
    assert not any(line.startswith("{") for line in output.splitlines()), output


def test_production_logs_are_json_on_every_line(tmp_path: Path, servers: list[Server]):
    env = clean_environment(
        THREADLINE_ENVIRONMENT="production",
        THREADLINE_SECRET_KEY="a-long-random-production-secret-0123456789abcdef",
    )
    server = Server([], cwd=_workdir(tmp_path), env=env, port=free_port())
    servers.append(server)
    server.wait_healthy()
    token, thread_id = _traffic(server)
    server.stop()
    output = server.output()
    assert token not in output and token.split(".")[2] not in output
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    loggers = {record["logger"] for record in records}
    assert {"uvicorn.access", "uvicorn.error", "threadline.cli"} <= loggers, loggers
    access = [r for r in records if f"/v1/threads/{thread_id} " in r["message"]]
    assert len(access) == 1 and access[0]["thread_id"] == thread_id, access
    assert access[0]["user_id"].startswith("usr_") and access[0]["request_id"]
