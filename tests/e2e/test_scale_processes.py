"""Two API processes and two workers on one PostgreSQL and one Redis, no sticky sessions.

Every run executes on a worker process (the API processes run none), so every event a socket
receives crossed processes through Redis. 20 users, half of their sockets on each API process,
each running several demo-agent runs: every run completes exactly once, every user receives all
and only their own events, in sequence order, and what they received live is exactly what the
database holds (read back through the other API process).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.scale_support import Cluster, cluster, replay
from tests.e2e.sockets_support import (
    JSON,
    TERMINAL,
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

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]
USERS = 20
RUNS_PER_USER = 3


@pytest.fixture
def two_by_two(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with cluster(request, tmp_path_factory.mktemp("scale")) as c:
        c.api()
        c.api()
        c.worker()
        c.worker()
        yield c


@dataclass
class Session:
    user: User
    thread_id: str
    api: ServerProcess
    start_seq: int
    messages: list[JSON]
    run_ids: list[str]


async def _chat(apis: list[ServerProcess], index: int) -> Session:
    api = apis[index % len(apis)]
    async with http_client(api) as http:
        user = await register(http)
        thread_id = await create_thread(http, user, title=f"user {index}")
    async with open_socket(api, user.token) as sock:
        start_seq = int((await sock.subscribe(thread_id))["last_seq"])
        run_ids = []
        for n in range(RUNS_PER_USER):
            await sock.send(
                {
                    "type": "send_message",
                    "thread_id": thread_id,
                    "content": f"question {n} from user {index}",
                    "agent": "demo",
                }
            )
            run_ids.append(str((await sock.until_type("message_accepted"))["run_id"]))

        def all_ended(_: JSON) -> bool:
            return sum(1 for e in sock.events if e["type"] in TERMINAL) >= RUNS_PER_USER

        await sock.until(all_ended, within=240)
        await sock.ping()  # anything late (a duplicate, say) would arrive before the pong
    return Session(user, thread_id, api, start_seq, sock.messages, run_ids)


async def test_many_users_over_two_api_processes_and_two_workers(two_by_two: Cluster) -> None:
    apis = two_by_two.apis
    try:
        async with asyncio.timeout(300):
            sessions = await asyncio.gather(*(_chat(apis, n) for n in range(USERS)))
    except BaseException:
        print(two_by_two.logs())
        raise
    assert {s.api.port for s in sessions} == {a.port for a in apis}  # spread over both
    async with asyncio.timeout(120):
        for session in sessions:
            await _check(session, other=next(a for a in apis if a is not session.api))


async def _check(session: Session, *, other: ServerProcess) -> None:
    own = session.thread_id
    foreign = [m for m in session.messages if m.get("thread_id") not in (None, own)]
    assert not foreign, f"another user's events reached this socket: {foreign[:3]}"
    events = [m for m in session.messages if "seq" in m]
    assert_strictly_increasing(events)
    assert all(int(e["seq"]) > session.start_seq for e in events)
    for run_id in session.run_ids:
        assert_run_lifecycle(events, run_id)
        ended = [e["type"] for e in events if e["run_id"] == run_id and e["type"] in TERMINAL]
        assert ended == ["agent_completed"], (run_id, ended)
    stored = await replay(other, session.user, own, session.start_seq)
    assert compact(durable(events)) == compact(stored)  # all of them, once, nothing else
    async with http_client(other) as http:
        runs = await http.get(f"/v1/threads/{own}/runs", headers=session.user.headers)
    assert runs.status_code == 200, runs.text
    by_id = {r["id"]: r for r in runs.json()["data"]}
    assert sorted(by_id) == sorted(session.run_ids)
    assert all(r["status"] == "completed" and r["attempt"] == 1 for r in by_id.values()), by_id
