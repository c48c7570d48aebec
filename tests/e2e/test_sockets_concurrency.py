"""Many users at once on one real server: each user's events reach only that user's sockets,
in order, every run ends exactly once, and the server lets go of every socket afterwards.

Runs on SQLite (the embedded default) and on PostgreSQL + Redis.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]
import pytest

from tests.e2e.sockets_support import (
    JSON,
    TERMINAL,
    EventSocket,
    ServerFactory,
    ServerProcess,
    User,
    assert_run_lifecycle,
    assert_strictly_increasing,
    create_thread,
    durable,
    http_client,
    metrics,
    open_socket,
    post_message,
    register,
    server_factory,
    wait_for_metrics,
)

pytestmark = pytest.mark.e2e

USERS = 20
TWO_SOCKET_USERS = 8  # users 0..7 watch with two sockets each
TWO_THREAD_EVERY = 3  # users 0, 3, 6, ... own a second thread, watched on the same socket
RUNS_PER_USER = 3


@pytest.fixture(params=["sqlite", "postgres"])
def start_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerFactory]:
    with server_factory(request.param, request, tmp_path) as start:
        yield start


@dataclass
class Member:
    index: int
    user: User
    threads: list[str]
    sockets: list[EventSocket] = field(default_factory=list)
    snapshots: dict[tuple[int, str], int] = field(default_factory=dict)
    """(socket number, thread) -> last_seq of the subscription's snapshot."""
    expected: dict[str, str] = field(default_factory=dict)
    """run id (or question, until its run id is known) -> the answer it asks for."""


async def _send_all(http: httpx.AsyncClient, member: Member) -> None:
    """Post RUNS_PER_USER questions at once (enqueued on the threads in turn), every other
    user over the socket and the others over HTTP."""
    over_socket = member.index % 2 == 0
    for k in range(RUNS_PER_USER):
        thread_id = member.threads[k % len(member.threads)]
        a, b = member.index + 2, k + 3
        question, answer = f"what is {a}*{b}?", f"{a}*{b} = {a * b}."
        if over_socket:
            await member.sockets[0].send(
                {
                    "type": "send_message",
                    "thread_id": thread_id,
                    "content": question,
                    "agent": "demo",
                    "multitask_strategy": "enqueue",
                }
            )
            # The accepted reply is read by the socket's reader; match it by content below.
            member.expected[question] = answer
        else:
            posted = await post_message(http, member.user, thread_id, question, agent="demo")
            member.expected[posted["run"]["id"]] = answer


def _terminal_count(sock: EventSocket) -> int:
    return sum(1 for m in sock.messages if m.get("type") in TERMINAL)


def _fail_on_error(message: JSON) -> None:
    assert message.get("type") != "error", message


async def _watch(sock: EventSocket) -> None:
    """Read until this socket has seen every run of its user end."""

    def done(message: JSON) -> bool:
        _fail_on_error(message)
        return _terminal_count(sock) >= RUNS_PER_USER

    await sock.until(done, within=90)


def _resolve_expected(member: Member) -> dict[str, str]:
    """run id -> answer, with socket-sent questions matched through their user message."""
    by_run: dict[str, str] = {}
    questions = {
        e["data"]["message_id"]: e["data"]["content"]
        for e in member.sockets[0].events
        if e["type"] == "message_created" and e["data"].get("role") == "user"
    }
    for message in member.sockets[0].messages:
        if message.get("type") == "message_accepted":
            question = questions[message["message_id"]]
            by_run[message["run_id"]] = member.expected[question]
    by_run.update({k: v for k, v in member.expected.items() if k.startswith("run_")})
    return by_run


async def _replay(sock: EventSocket, thread_id: str, after_seq: int) -> list[JSON]:
    """The stored events of a thread after `after_seq`, read back over the same socket: the
    replay is queued right behind the snapshot, so the pong closes it."""
    start = len(sock.messages)
    await sock.subscribe(thread_id, after_seq=after_seq)
    await sock.ping()
    return [m for m in sock.messages[start:] if m.get("thread_id") == thread_id and "seq" in m]


async def _check_member(member: Member, others: set[str]) -> None:
    runs = _resolve_expected(member)
    assert len(runs) == RUNS_PER_USER, runs
    mine = set(member.threads)
    for number, sock in enumerate(member.sockets):
        events = sock.events
        # Nothing of anyone else: every event is on this user's threads, of this user's runs.
        assert {e["thread_id"] for e in events} <= mine, {e["thread_id"] for e in events} - mine
        assert not {e["thread_id"] for e in events} & others
        assert {e["run_id"] for e in events if e["run_id"]} == set(runs)
        # Per thread order, including inside batch frames (`messages` flattens them in order).
        assert_strictly_increasing(events)
        answers = []
        for run_id in runs:
            assert_run_lifecycle(events, run_id)
            completed = [e for e in events if e["run_id"] == run_id and e["type"] in TERMINAL]
            assert completed[0]["type"] == "agent_completed", completed
            answers.append(completed[0]["data"]["text"])
        # Every arithmetic answer is one of this user's own questions (the numbers identify
        # the user). An enqueued run may answer a later question of its thread, or none: see
        # test_enqueued_runs_each_answer_their_own_message.
        arithmetic = [a for a in answers if "*" in a]
        assert arithmetic and set(arithmetic) <= set(runs.values()), (answers, runs)
        # No gap: every stored event since the subscription reached this socket.
        for thread_id in member.threads:
            since = member.snapshots[(number, thread_id)]
            seen = [e for e in durable(events) if e["thread_id"] == thread_id]
            stored = await _replay(sock, thread_id, since)
            assert [(e["seq"], e["type"]) for e in seen] == [(e["seq"], e["type"]) for e in stored]


async def _load(server: ServerProcess, http: httpx.AsyncClient, members: list[Member]) -> None:
    """Every member's sockets subscribe, every member posts at once, every socket reads its
    user's runs to the end; then the checks, then every socket closes."""
    async with AsyncExitStack() as stack:
        for member in members:
            count = 2 if member.index < TWO_SOCKET_USERS else 1
            for number in range(count):
                auth = "message" if (member.index + number) % 2 else "subprotocol"
                sock = await stack.enter_async_context(
                    open_socket(server, member.user.token, auth=auth)
                )
                member.sockets.append(sock)
                for thread_id in member.threads:
                    snapshot = await sock.subscribe(thread_id)
                    member.snapshots[(number, thread_id)] = int(snapshot["last_seq"])
        # Someone else's thread is refused, as if it did not exist.
        for member in members[:4]:
            neighbour = members[(member.index + 1) % len(members)]
            await member.sockets[0].send({"type": "subscribe", "thread_id": neighbour.threads[0]})
            refused = await member.sockets[0].until_type("error")
            assert refused["code"] == "thread_not_found", refused

        samples = await metrics(http)
        sockets = sum(len(m.sockets) for m in members)
        assert samples["threadline_sockets_active"] == sockets

        watchers = [_watch(sock) for member in members for sock in member.sockets]
        senders = [_send_all(http, member) for member in members]
        await asyncio.gather(*senders, *watchers)

        everyone = {t for m in members for t in m.threads}
        for member in members:
            await _check_member(member, everyone - set(member.threads))
    # Every socket closed: the server holds none, and no run is left executing or queued.
    await wait_for_metrics(
        http,
        lambda s: (
            s["threadline_sockets_active"] == 0
            and s["threadline_runs_active"] == 0
            and s['threadline_runs{status="running"}'] == 0
            and s['threadline_runs{status="queued"}'] == 0
        ),
    )


def _resources(pid: int) -> tuple[int, int]:
    process = psutil.Process(pid)
    return process.num_fds(), process.num_threads()


# The baseline is taken after a burst of concurrent requests has grown the server's pools
# (database, Redis) to their working size; the slack covers what else a server may keep. A leak
# of one descriptor per socket (USERS + TWO_SOCKET_USERS of them) would exceed it.
FDS_SLACK, THREADS_SLACK = 10, 5


async def _settled(pid: int, baseline: tuple[int, int]) -> tuple[int, int]:
    """Wait (bounded) until the server's descriptors and threads are back near `baseline`."""
    current = _resources(pid)
    try:
        async with asyncio.timeout(20):
            while current[0] > baseline[0] + FDS_SLACK or current[1] > baseline[1] + THREADS_SLACK:
                await asyncio.sleep(0.2)
                current = _resources(pid)
    except TimeoutError:
        pass
    return current


async def test_many_users_at_once_get_only_their_own_events_in_order(
    start_server: ServerFactory,
) -> None:
    server = start_server()
    async with asyncio.timeout(110), http_client(server) as http:
        users = await asyncio.gather(*(register(http) for _ in range(USERS)))
        members = []
        for index, user in enumerate(users):
            count = 2 if index % TWO_THREAD_EVERY == 0 else 1
            threads = [await create_thread(http, user, f"u{index}-t{n}") for n in range(count)]
            members.append(Member(index, user, threads))
        # Warm up: concurrent requests grow the connection pools as the load will.
        responses = await asyncio.gather(
            *(http.get("/v1/threads", headers=m.user.headers) for m in members for _ in range(3))
        )
        assert {r.status_code for r in responses} == {200}
        baseline = _resources(server.pid)

        await _load(server, http, members)

        fd_count, thread_count = await _settled(server.pid, baseline)
        assert fd_count <= baseline[0] + FDS_SLACK, (baseline, fd_count)
        assert thread_count <= baseline[1] + THREADS_SLACK, (baseline, thread_count)
        finished = await metrics(http)
        total = USERS * RUNS_PER_USER
        assert finished['threadline_runs_finished_total{status="completed"}'] == total
        assert finished['threadline_runs{status="completed"}'] == total
        statuses = Counter(k for k, v in finished.items() if k.startswith("threadline_runs{") and v)
        assert set(statuses) == {'threadline_runs{status="completed"}'}, finished


@pytest.fixture(scope="module")
def paced_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """SQLite, with model latency so that a run is still going when the next messages come."""
    with server_factory("sqlite", request, tmp_path_factory.mktemp("paced")) as start:
        yield start(demo_delay_seconds=0.05)


LONG_ECHO = "tell me a story about sockets and queues " * 2


async def _race_on_one_thread(server: ServerProcess) -> tuple[EventSocket, dict[str, str]]:
    """While a slow run is busy on a thread, two sockets of its user each enqueue a question
    at the same moment. Returns the first socket and run id -> question."""
    async with http_client(server) as http:
        user = await register(http)
        thread_id = await create_thread(http, user)
    async with (
        open_socket(server, user.token) as first,
        open_socket(server, user.token, auth="message") as second,
    ):
        for sock in (first, second):
            await sock.subscribe(thread_id)
        await first.send(
            {"type": "send_message", "thread_id": thread_id, "content": LONG_ECHO, "agent": "demo"}
        )
        busy = (await first.until_type("message_accepted"))["run_id"]
        # Its first streamed words: the model is answering, so the run has read its history.
        await first.until_type("message_delta", run_id=busy)
        questions = {first: "what is 6*7?", second: "what is 8*9?"}
        await asyncio.gather(
            *(
                sock.send(
                    {
                        "type": "send_message",
                        "thread_id": thread_id,
                        "content": question,
                        "agent": "demo",
                        "multitask_strategy": "enqueue",
                    }
                )
                for sock, question in questions.items()
            )
        )
        runs = {busy: LONG_ECHO}
        for sock, question in questions.items():
            accepted = await sock.until_type("message_accepted")
            runs[accepted["run_id"]] = question
        for sock in (first, second):

            def all_done(message: JSON, sock: EventSocket = sock) -> bool:
                _fail_on_error(message)
                return _terminal_count(sock) >= len(runs)

            await sock.until(all_done, within=60)
        for sock in (first, second):
            assert_strictly_increasing(sock.events)
            assert compact_types(sock) == compact_types(first)
    return first, runs


def compact_types(sock: EventSocket) -> list[tuple[int, str]]:
    return [(e["seq"], e["type"]) for e in durable(sock.events)]


_RACES: dict[tuple[int, int], tuple[list[JSON], dict[str, str]]] = {}


async def _race(server: ServerProcess) -> tuple[list[JSON], dict[str, str]]:
    """The two tests below look at the same race: run it once per server. Returns the events
    the first socket received and run id -> question."""
    key = (server.pid, server.port)
    if key not in _RACES:
        sock, runs = await _race_on_one_thread(server)
        _RACES[key] = (sock.events, runs)
    return _RACES[key]


async def test_runs_raced_onto_one_thread_take_turns(paced_server: ServerProcess) -> None:
    async with asyncio.timeout(90):
        events, runs = await _race(paced_server)
    for run_id in runs:
        assert_run_lifecycle(events, run_id)
    # At most one active run per thread: each run starts after the previous one ended.
    order = [(e["type"], e["run_id"]) for e in events if e["type"] in TERMINAL | {"agent_started"}]
    started = [run for kind, run in order if kind == "agent_started"]
    assert len(started) == len(runs) == 3
    for kind_run, following in zip(order, order[1:], strict=False):
        if kind_run[0] == "agent_started":
            assert following == ("agent_completed", kind_run[1]), order


async def test_enqueued_runs_each_answer_their_own_message(paced_server: ServerProcess) -> None:
    async with asyncio.timeout(90):
        events, runs = await _race(paced_server)
    answers = {e["run_id"]: e["data"]["text"] for e in events if e["type"] == "agent_completed"}
    expected = {"what is 6*7?": "6*7 = 42.", "what is 8*9?": "8*9 = 72."}
    for run_id, question in runs.items():
        if question in expected:
            assert answers[run_id] == expected[question], (question, answers)
