"""`threadline serve` as a real process on a real socket (C2 continuity, C8 operations, C9).

(a) Zero configuration: an empty directory, no THREADLINE_* variable, and a user can sign up and
chat. (b) Continuity: after signing out and in, and after a restart of the server on the same
database, the thread and its whole history are there and the conversation continues; on SQLite
and on PostgreSQL + Redis (where `threadline migrate` must run first).
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import (
    DedicatedPostgres,
    ServerProcess,
    StartServer,
    clean_environment,
    run_cli,
)

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple"
TIMEOUT = httpx.Timeout(30.0)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _sign_in(http: httpx.Client, email: str) -> str:
    response = http.post("/v1/auth/token", json={"email": email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def _messages(http: httpx.Client, token: str, thread_id: str) -> list[dict[str, Any]]:
    response = http.get(
        f"/v1/threads/{thread_id}/messages", params={"limit": 200}, headers=_bearer(token)
    )
    assert response.status_code == 200, response.text
    assert response.json()["next_cursor"] is None
    messages: list[dict[str, Any]] = response.json()["data"]
    return messages


def _post(http: httpx.Client, token: str, thread_id: str, content: str) -> dict[str, Any]:
    response = http.post(
        f"/v1/threads/{thread_id}/messages", json={"content": content}, headers=_bearer(token)
    )
    assert response.status_code == 201, response.text
    message: dict[str, Any] = response.json()
    return message


def _user_messages(messages: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    """(position, id, content) of the user's own messages. An agent may answer in between (the
    embedded demo worker), so positions are checked on the user's messages as they stand."""
    return [(m["position"], m["id"], m["content"]) for m in messages if m["role"] == "user"]


def _stop_gracefully(server: ServerProcess) -> None:
    """SIGTERM ends the server by itself, after its shutdown ran (uvicorn re-raises the signal
    once it has shut down, so -SIGTERM is a normal exit status as well as 0)."""
    code = server.stop()
    output = server.output()
    assert code in (0, -signal.SIGTERM), f"exit code {code} after SIGTERM:\n{output[-3000:]}"
    assert "Application shutdown complete" in output, output[-3000:]


def test_zero_config_serve_in_an_empty_directory(tmp_path: Path, serve_process: StartServer):
    workdir = tmp_path / "empty"
    workdir.mkdir()
    server = serve_process(workdir, clean_environment())

    assert f"http://localhost:{server.port}" in server.output()
    assert (workdir / "threadline.db").is_file()
    assert (workdir / ".threadline" / "secret_key").is_file()  # the key persists for restarts

    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as http:
        email = f"zero-{uuid.uuid4().hex[:8]}@example.com"
        registered = http.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
        assert registered.status_code == 201, registered.text
        token = _sign_in(http, email)
        created = http.post("/v1/threads", json={}, headers=_bearer(token))
        assert created.status_code == 201, created.text
        thread_id = created.json()["id"]
        first = _post(http, token, thread_id, "Hello from a real socket")
        assert first["position"] == 1
        thread = http.get(f"/v1/threads/{thread_id}", headers=_bearer(token)).json()
        assert thread["title"] == "Hello from a real socket"
        assert "Hello from a real socket" in [
            m["content"] for m in _messages(http, token, thread_id)
        ]
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"

    _stop_gracefully(server)


def _continuity(tmp_path: Path, serve_process: StartServer, env: dict[str, str]) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    email = f"cont-{uuid.uuid4().hex[:8]}@example.com"

    first_server = serve_process(workdir, env)
    with httpx.Client(base_url=first_server.base_url, timeout=TIMEOUT) as http:
        assert (
            http.post("/v1/auth/register", json={"email": email, "password": PASSWORD}).status_code
            == 201
        )
        token = _sign_in(http, email)
        thread_id = http.post(
            "/v1/threads",
            json={"title": "Trip planning", "metadata": {"trip": "lisbon"}},
            headers=_bearer(token),
        ).json()["id"]
        for text in ("Day one: Alfama", "Day two: Belem", "Day three: Sintra"):
            _post(http, token, thread_id, text)
        history = _user_messages(_messages(http, token, thread_id))
        assert [content for _, _, content in history] == [
            "Day one: Alfama",
            "Day two: Belem",
            "Day three: Sintra",
        ]

        # Sign out: that token is refused from now on. Sign in again: everything is there.
        assert http.post("/v1/auth/logout", headers=_bearer(token)).status_code == 204
        refused = http.get("/v1/auth/me", headers=_bearer(token))
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "token_revoked"
        second_token = _sign_in(http, email)
        listed = http.get("/v1/threads", headers=_bearer(second_token)).json()["data"]
        assert [t["id"] for t in listed] == [thread_id]
        assert listed[0]["title"] == "Trip planning"
        assert listed[0]["metadata"] == {"trip": "lisbon"}
        assert _user_messages(_messages(http, second_token, thread_id)) == history
    _stop_gracefully(first_server)

    # A new process on the same database and data directory (same signing key).
    second_server = serve_process(workdir, env)
    with httpx.Client(base_url=second_server.base_url, timeout=TIMEOUT) as http:
        me = http.get("/v1/auth/me", headers=_bearer(second_token))
        assert me.status_code == 200, me.text  # a restart does not sign anyone out
        still_refused = http.get("/v1/auth/me", headers=_bearer(token))
        assert still_refused.status_code == 401  # nor does it forget a sign-out
        assert still_refused.json()["error"]["code"] == "token_revoked"

        third_token = _sign_in(http, email)
        thread = http.get(f"/v1/threads/{thread_id}", headers=_bearer(third_token))
        assert thread.status_code == 200, thread.text
        assert thread.json()["title"] == "Trip planning"
        before = _messages(http, third_token, thread_id)
        assert _user_messages(before) == history

        # The conversation continues where it was.
        latest = _post(http, third_token, thread_id, "Day four: Cascais")
        assert latest["position"] == max(m["position"] for m in before) + 1
        after = _messages(http, third_token, thread_id)
        assert [m["position"] for m in after] == list(range(1, len(after) + 1))
        assert _user_messages(after)[-1][2] == "Day four: Cascais"
    _stop_gracefully(second_server)


def test_continuity_across_sign_in_and_restart_on_sqlite(
    tmp_path: Path, serve_process: StartServer
):
    env = clean_environment(
        THREADLINE_DATABASE_URL=f"sqlite:///{tmp_path / 'db' / 'threadline.db'}",
        THREADLINE_DATA_DIR=str(tmp_path / "data"),
    )
    _continuity(tmp_path, serve_process, env)


def test_continuity_across_sign_in_and_restart_on_postgres(
    tmp_path: Path, dedicated_postgres: DedicatedPostgres, serve_process: StartServer
):
    env = clean_environment(
        THREADLINE_DATABASE_URL=dedicated_postgres.database_url,
        THREADLINE_REDIS_URL=dedicated_postgres.redis_url,
        THREADLINE_REDIS_PREFIX=dedicated_postgres.redis_prefix,
        THREADLINE_DATA_DIR=str(tmp_path / "data"),
    )
    workdir = tmp_path / "work"
    workdir.mkdir()

    # Not migrated yet: serve refuses to start and says what to run.
    unmigrated = serve_process(workdir, env, wait=False)
    code = unmigrated.wait_exit(timeout=60)
    assert code != 0
    assert "threadline migrate" in unmigrated.output(), unmigrated.output()[-3000:]

    migrated = run_cli("migrate", cwd=workdir, env=env)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "Migrated" in migrated.stdout + migrated.stderr
    # Migrating twice is harmless.
    assert run_cli("migrate", cwd=workdir, env=env).returncode == 0

    _continuity(tmp_path, serve_process, env)


def test_serve_on_an_unmigrated_postgres_fails_with_a_one_line_explanation(
    tmp_path: Path, dedicated_postgres: DedicatedPostgres, serve_process: StartServer
):
    """An operator who forgot `threadline migrate` gets told so plainly: a non-zero exit, the
    command to run, and no Python traceback to dig it out of (nor a "Threadline on http://..."
    banner for a server that never started)."""
    env = clean_environment(
        THREADLINE_DATABASE_URL=dedicated_postgres.database_url,
        THREADLINE_DATA_DIR=str(tmp_path / "data"),
    )
    server = serve_process(tmp_path, env, wait=False)
    code = server.wait_exit(timeout=60)
    output = server.output()
    assert code != 0
    assert "threadline migrate" in output
    assert "Traceback" not in output, output[-3000:]
    assert "Threadline on http://" not in output, output[-3000:]
