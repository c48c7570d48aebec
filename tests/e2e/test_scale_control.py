"""Control messages cross processes through Redis at once:

- logout closes that token's open WebSockets and SSE streams on every API process (WebSocket
  close code 4003, SSE `session_ended`), and nothing opened with another token;
- a cancel posted to one API process stops the run on the worker executing it well before the
  worker's next heartbeat (the fallback that would notice the cancel in the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.scale_support import Cluster, cluster
from tests.e2e.sockets_support import (
    PASSWORD,
    TERMINAL,
    ServerProcess,
    create_thread,
    http_client,
    open_socket,
    open_sse,
    register,
    server_factory,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
CLOSE_SESSION_ENDED = 4003
# The worker heartbeats every lease/4: with this lease, 15 s. A cancel seen sooner came by Redis.
LEASE_SECONDS = 60


@pytest.fixture
def two_apis(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with cluster(request, tmp_path_factory.mktemp("sessions")) as c:
        c.api()
        c.api()
        yield c


async def test_logout_closes_the_tokens_sockets_and_streams_on_every_process(
    two_apis: Cluster,
) -> None:
    a, b = two_apis.apis
    async with asyncio.timeout(60), http_client(a) as http_a, http_client(b) as http_b:
        user = await register(http_a)
        thread_id = await create_thread(http_a, user)
        other = await http_b.post(
            "/v1/auth/token", json={"email": user.email, "password": PASSWORD}
        )
        other_token = other.json()["access_token"]
        async with contextlib.AsyncExitStack() as stack:
            on_a = await stack.enter_async_context(open_socket(a, user.token))
            on_b = await stack.enter_async_context(open_socket(b, user.token))
            kept = await stack.enter_async_context(open_socket(b, other_token))
            sse_b = await stack.enter_async_context(open_sse(http_b, user, thread_id))
            for sock in (on_a, on_b, kept):
                await sock.subscribe(thread_id)
            await sse_b.until(lambda f: f["event"] == "snapshot")

            started = time.monotonic()
            logout = await http_a.post("/v1/auth/logout", headers=user.headers)
            assert logout.status_code == 204, logout.text
            for sock in (on_a, on_b):
                closed = await sock.drain_until_closed(within=5)
                assert isinstance(closed, ConnectionClosed)
                assert closed.rcvd is not None and closed.rcvd.code == CLOSE_SESSION_ENDED
            ended = await sse_b.until(lambda f: f["event"] == "session_ended", within=5)
            assert ended["data"] == {"reason": "token revoked"}
            assert time.monotonic() - started < 5

            await kept.ping()  # the other token's socket is untouched
            refused = await http_b.get("/v1/auth/me", headers=user.headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "token_revoked"


@pytest.fixture
def api_and_worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with cluster(request, tmp_path_factory.mktemp("cancel")) as c:
        c.api(run_lease_seconds=LEASE_SECONDS)
        c.api(run_lease_seconds=LEASE_SECONDS)
        c.worker(run_lease_seconds=LEASE_SECONDS, demo_delay_seconds=0.2)
        yield c


async def test_a_cancel_reaches_the_worker_at_once(api_and_worker: Cluster) -> None:
    a, b = api_and_worker.apis
    question = " ".join(f"word{n}" for n in range(100))  # 20 s of streaming at 0.2 s a word
    async with asyncio.timeout(60), http_client(a) as http_a, http_client(b) as http_b:
        user = await register(http_a)
        thread_id = await create_thread(http_a, user)
        async with open_socket(a, user.token) as sock:
            await sock.subscribe(thread_id)
            await sock.send(
                {
                    "type": "send_message",
                    "thread_id": thread_id,
                    "content": question,
                    "agent": "demo",
                }
            )
            run_id = (await sock.until_type("message_accepted"))["run_id"]
            await sock.until_type("message_delta", run_id=run_id, within=30)
            asked = time.monotonic()
            cancel = await http_b.post(
                f"/v1/threads/{thread_id}/runs/{run_id}/cancel", headers=user.headers
            )
            assert cancel.status_code == 200, cancel.text
            ended = await sock.until(
                lambda m: m.get("run_id") == run_id and m.get("type") in TERMINAL, within=30
            )
            took = time.monotonic() - asked
    assert ended["type"] == "run_cancelled" and ended["data"] == {"reason": "user"}, ended
    assert took < 2.0, f"the cancel took {took:.2f} s: it waited for a heartbeat"


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    with server_factory("sqlite", request, tmp_path) as start:
        yield start()


async def test_logout_closes_sockets_on_the_embedded_server_too(embedded: ServerProcess) -> None:
    """One process, SQLite, the in-process bus: the same promise, the same close code."""
    async with asyncio.timeout(60), http_client(embedded) as http:
        user = await register(http)
        async with open_socket(embedded, user.token) as sock:
            await sock.ping()
            assert (await http.post("/v1/auth/logout", headers=user.headers)).status_code == 204
            closed = await sock.drain_until_closed(within=5)
    assert closed.rcvd is not None and closed.rcvd.code == CLOSE_SESSION_ENDED
