"""Faults in the scale-out set-up, with real processes killed by pid:

- an API process SIGKILLed while its clients stream: they reconnect to the other API process,
  resume from the last seq they saw, and end with every durable event exactly once;
- Redis (a private redis-server, never the shared one) SIGKILLed and restarted mid-run: open
  sockets get what was published meanwhile from the database by themselves, no durable event is
  lost or repeated, and while Redis is down sign-in works and signed-in requests answer 503
  `revocation_unavailable` (docs/deployment.md, "When Redis is down").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.scale_support import Cluster, cluster, kill, replay
from tests.e2e.sockets_support import (
    JSON,
    PASSWORD,
    EventSocket,
    ServerProcess,
    User,
    assert_run_lifecycle,
    assert_strictly_increasing,
    compact,
    create_thread,
    durable,
    http_client,
    open_socket,
    register,
)
from tests.private_redis import PrivateRedis, private_redis

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
DELAY = 0.05
# The demo model echoes this back word by word (DELAY apart): a run that streams for seconds.
LONG_QUESTION = " ".join(f"word{n}" for n in range(60))
USERS = 4


def _deltas(sock: EventSocket, run_id: str) -> int:
    return sum(1 for e in sock.events if e["type"] == "message_delta" and e["run_id"] == run_id)


async def _start_run(sock: EventSocket, thread_id: str) -> str:
    await sock.send(
        {"type": "send_message", "thread_id": thread_id, "content": LONG_QUESTION, "agent": "demo"}
    )
    return str((await sock.until_type("message_accepted"))["run_id"])


async def _users(api: ServerProcess, count: int) -> list[tuple[User, str]]:
    async with http_client(api) as http:
        users = [await register(http) for _ in range(count)]
        return [(user, await create_thread(http, user)) for user in users]


def _assert_exactly_the_log(received: list[JSON], log: list[JSON], run_id: str) -> None:
    assert_strictly_increasing(received)
    assert compact(durable(received)) == compact(log)
    assert [e["data"] for e in durable(received)] == [e["data"] for e in log]
    assert_run_lifecycle(log, run_id)
    assert log[-1]["type"] == "agent_completed"


# ------------------------------------------------------------------ an API process dies


@pytest.fixture
def two_apis(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with cluster(request, tmp_path_factory.mktemp("api-kill")) as c:
        c.api()
        c.api()
        c.worker(demo_delay_seconds=DELAY)
        yield c


async def _stream_until_cut(
    victim: ServerProcess, user: User, thread_id: str, started: asyncio.Event
) -> tuple[int, str, list[JSON]]:
    """Subscribe on `victim`, start a run, stream until the connection dies under us."""
    sock_events: list[JSON] = []
    async with open_socket(victim, user.token) as sock:
        start_seq = int((await sock.subscribe(thread_id))["last_seq"])
        run_id = await _start_run(sock, thread_id)
        await sock.until(lambda _: _deltas(sock, run_id) >= 2)
        started.set()
        closed = await sock.drain_until_closed(within=60)  # the process dies under us
        assert isinstance(closed, ConnectionClosed)
        sock_events = sock.events
    return start_seq, run_id, sock_events


async def test_clients_of_a_killed_api_process_resume_on_the_other(two_apis: Cluster) -> None:
    victim, survivor = two_apis.apis
    pairs = await _users(survivor, USERS)
    flags = [asyncio.Event() for _ in pairs]
    try:
        async with asyncio.timeout(200):
            streams = [
                asyncio.create_task(_stream_until_cut(victim, u, t, f))
                for (u, t), f in zip(pairs, flags, strict=True)
            ]
            await asyncio.gather(*(f.wait() for f in flags))
            kill(victim)  # mid-run, every client mid-stream
            cut = await asyncio.gather(*streams)
            for (user, thread_id), (start_seq, run_id, before) in zip(pairs, cut, strict=True):
                last_seq = max(int(e["seq"]) for e in before)
                async with open_socket(survivor, user.token) as sock:
                    await sock.subscribe(thread_id, after_seq=last_seq)
                    await sock.until_type("agent_completed", run_id=run_id, within=120)
                    after = sock.events
                assert_strictly_increasing(after, after_seq=last_seq)
                log = await replay(survivor, user, thread_id, start_seq)
                _assert_exactly_the_log([*before, *after], log, run_id)
    except BaseException:
        print(two_apis.logs())
        raise


# ------------------------------------------------------------------ Redis restarts


@pytest.fixture
def on_private_redis(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, PrivateRedis]]:
    workdir = tmp_path_factory.mktemp("redis-restart")
    with private_redis(Path(workdir)) as redis_server, cluster(request, workdir) as c:
        c.api(redis_url=redis_server.url)
        c.api(redis_url=redis_server.url)
        c.worker(redis_url=redis_server.url, demo_delay_seconds=DELAY)
        yield c, redis_server


async def _while_redis_is_down(apis: list[ServerProcess], user: User) -> None:
    for api in apis:
        async with http_client(api) as http:
            me = await http.get("/v1/auth/me", headers=user.headers)
            assert me.status_code == 503, me.text
            assert me.json()["error"]["code"] == "revocation_unavailable"
            assert "Retry-After" in me.headers
            signed_in = await http.post(
                "/v1/auth/token", json={"email": user.email, "password": PASSWORD}
            )
            assert signed_in.status_code == 200, signed_in.text
            ready = await http.get("/readyz")
            assert ready.status_code == 503, ready.text


async def _until_ok(http: httpx.AsyncClient, user: User) -> None:
    async with asyncio.timeout(30):
        while True:
            if (await http.get("/v1/auth/me", headers=user.headers)).status_code == 200:
                return
            await asyncio.sleep(0.1)  # Redis is coming back; bounded by the timeout


async def test_redis_restart_mid_run_loses_no_durable_event(
    on_private_redis: tuple[Cluster, PrivateRedis],
) -> None:
    c, redis_server = on_private_redis
    apis = c.apis
    pairs = await _users(apis[0], USERS)
    try:
        async with asyncio.timeout(200), contextlib.AsyncExitStack() as stack:
            socks = [  # half the sockets on each API process
                await stack.enter_async_context(open_socket(apis[n % 2], user.token))
                for n, (user, _) in enumerate(pairs)
            ]
            starts, runs = [], []
            for sock, (_, thread_id) in zip(socks, pairs, strict=True):
                starts.append(int((await sock.subscribe(thread_id))["last_seq"]))
                runs.append(await _start_run(sock, thread_id))
            for sock, run_id in zip(socks, runs, strict=True):
                await sock.until(lambda _, s=sock, r=run_id: _deltas(s, r) >= 2)
            redis_server.stop()  # SIGKILL, and every stream with it
            await _while_redis_is_down(apis, pairs[0][0])
            redis_server.start()  # same port, empty
            for sock, run_id in zip(socks, runs, strict=True):
                await sock.until_type("agent_completed", run_id=run_id, within=120)
            # The worker did publish into the outage: those events reached the sockets from
            # the database.
            assert "Cannot publish to Redis" in c.workers[0].log_tail(400)
            async with http_client(apis[1]) as http:
                await _until_ok(http, pairs[0][0])
            # Live again: a second run streams to the same, never reconnected, sockets.
            second = [
                await _start_run(sock, thread_id)
                for sock, (_, thread_id) in zip(socks, pairs, strict=True)
            ]
            for sock, run_id in zip(socks, second, strict=True):
                await sock.until_type("agent_completed", run_id=run_id, within=120)
                await sock.ping()
            for sock, (user, thread_id), start, run_id in zip(
                socks, pairs, starts, runs, strict=True
            ):
                log = await replay(apis[1], user, thread_id, start)
                _assert_exactly_the_log(sock.events, log, second[runs.index(run_id)])
                assert_run_lifecycle(log, run_id)
    except BaseException:
        print(c.logs())
        raise
