"""Logout closes that token's open WebSockets and SSE streams on every API process at once
(WebSocket close code 4003, SSE `session_ended`), and nothing opened with another token."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.scale_support import Cluster, cluster
from tests.e2e.sockets_support import (
    PASSWORD,
    create_thread,
    http_client,
    open_socket,
    open_sse,
    register,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
CLOSE_SESSION_ENDED = 4003


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
