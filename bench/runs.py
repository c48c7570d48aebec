"""End-to-end run benchmark: agent runs through a real `threadline serve` process, watched live
on real WebSockets.

    python bench/runs.py --backend sqlite|postgres|both --out bench/results/runs.json \
        [--topology serve,serve-workers-2,api1-worker1] [--users 1,32] [--runs-per-user N] \
        [--idle-sockets 1000] [--past-runs N] [--profile DIR] [--server-env THREADLINE_X=V]

Each simulated user has its own account, thread and WebSocket (authenticated with the first
message, subscribed to its thread). It posts "what is 12*7?" with `"run": {"agent": "demo"}`
(HTTP `POST /v1/threads/{id}/messages` by default, or the socket's `send_message` with
`--send ws`) and posts the next message only after `agent_completed` arrived on its socket. The
demo model answers at once (delay 0): one calculator tool call, then a short streamed answer.

`--past-runs N` gives each user N finished runs on its thread before the first level, written
straight into the database (no messages): a user with a history, as in production, where what
a run costs must not grow with the runs before it (the fair claim once did).

Topologies (`--topology`, comma-separated; SQLite runs only `serve`, the one process it can
have):
- `serve` (the default): one `threadline serve` process, its embedded worker executing the runs;
- `serve-workers-2`: `threadline serve --workers 2`, a supervisor and two API processes on one
  port, each with its embedded worker (the benchmark waits until both accept connections, so
  the users' sockets and HTTP connections spread over both);
- `api1-worker1`: one `threadline serve` with its embedded worker off and one
  `threadline worker`: HTTP and sockets in one process, runs in the other.

Measured per backend, topology and number of concurrent users, after a warm-up:
- runs per second: completed runs / wall time of the measured phase;
- from just before posting to (a) the first event of that run on the socket, of any kind: the
  user's `message_created` (no run id; matched by message id) or `run_queued` normally come
  first; (b) `agent_started`; (c) `agent_completed`; and to the HTTP answer (or
  `message_accepted`);
- emit-to-socket latency: client receive time - the event's `ts` (the server's clock when it was
  emitted; same machine, same clock). `ts` is truncated to the millisecond, so a measured value
  is 0-1 ms above the true one (0.5 ms on average);
- server CPU (user + system, psutil) over the measured phase, per completed run, summed over
  every server process (a supervisor and its children, API and worker processes), each one's
  share beside it;
- the whole machine's CPU per run over the same phase (every core's busy time, whoever used
  it), what of it was neither the server's nor the client's, and of that the local PostgreSQL
  and Redis processes' share; and how many cores were busy on average. With every core busy,
  cores ÷ machine CPU per run is the most runs per second this machine can do, whatever the
  topology (with `--profile`, py-spy's own CPU is in the machine's figure too);
- database transactions and round trips per completed run, counted (`--count-statements`, on
  by default): the server's counting hook (THREADLINE_DEBUG_COUNT_STATEMENTS) summed over every
  server process, on both backends, and on PostgreSQL also `pg_stat_database`'s xact_commit and
  xact_rollback of the benchmark's own database (see bench/_counting.py for how and when);
- the machine's load average after each level (the machine is shared: read the numbers beside
  it), and how the client's connections spread over the server processes;
- server RSS (summed over the processes) before and after `--idle-sockets` authenticated,
  subscribed, idle sockets (each on a thread of its own), per socket.

`--profile DIR` records every process that does the work (not an idle supervisor) with py-spy
attached by pid (`--gil`, 200 Hz, raw collapsed stacks), one file per process and level, named
`<backend>-<topology>-<users>u-<pid>.txt`, over the measured runs only (not the set-up, the
warm-up or the idle sockets), so that it shows the same work as the CPU figure.

The server is a subprocess on a free loopback port: SQLite in a temporary directory, or a fresh
PostgreSQL database (dropped afterwards) plus Redis under a unique key prefix (deleted
afterwards). Every wait is bounded and the server is always stopped. The client shares the
machine (and its cores) with the server; its own CPU time is reported beside the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
from _counting import Counts, idle_rate, per_run
from _support import (
    DEFAULT_POSTGRES_URL,
    DEFAULT_REDIS_URL,
    HTTP_TIMEOUT,
    ROOT,
    BenchError,
    BenchUser,
    MachineMeter,
    Server,
    _asyncpg_dsn,
    create_thread,
    delete_redis_prefix,
    expect,
    machine_info,
    migrate,
    postgres_database,
    postgres_version,
    print_machine_cpu,
    process_cpu_seconds,
    process_tree,
    py_spy_record,
    redis_version,
    register_many,
    report_failures,
    require_loopback,
    server_env,
    server_process,
    summarize,
    wait_all_accepting,
    worker_process,
    write_results,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from threadline.settings import Settings, normalize_database_url
from threadline.store.db import create_engine
from threadline.store.tables import runs as runs_table

QUESTION = "what is 12*7?"
RUN_TIMEOUT = 60.0  # one run, posting to agent_completed
LEVEL_TIMEOUT = 600.0  # warm-up plus measured phase of one concurrency level
CONNECT_TIMEOUT = 15.0
SETTLE_SECONDS = 1.0
# Subscribing without `after_seq` fails on PostgreSQL (streams.py passes 2**62 to an INTEGER
# column). The threads here are fresh, so replaying from 0 costs one stored event and is what a
# client that has seen nothing yet may send anyway.
SUBSCRIBE_AFTER_SEQ = 0
TERMINAL = frozenset({"agent_completed", "agent_failed", "run_cancelled"})
# Issue 11's targets, at 32 users on this 2-core machine.
TARGETS = {
    "postgres": {"runs_per_second_at_32": 90.0, "server_cpu_ms_per_run": 10.0},
    "sqlite": {"runs_per_second_at_32": 60.0, "server_cpu_ms_per_run": 15.0},
    "transactions_per_run": 6.0,
    "round_trips_per_run": 40.0,
    "first_event_p99_ms": 50.0,
    "completed_p99_ms": 400.0,
}
# The figure issue 11 was written against: the reference peer's dev server (in memory, nothing
# durable) on the machine of that day. Machines differ by up to 2x: for ratios, measure the
# peer in the same sitting with bench/peer/ (README there) and compare with bench/peer/compare.py.
REFERENCE_PEER = {"runs_per_second": 30.0, "server_cpu_ms_per_run": 28.0}
TOPOLOGIES = ("serve", "serve-workers-2", "api1-worker1")
SQLITE_TOPOLOGIES = ("serve",)  # SQLite refuses several processes (one writer, in-process bus)
PROFILE_STOP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Options:
    backends: tuple[str, ...]
    out: Path
    postgres_url: str
    redis_url: str
    users: tuple[int, ...]
    runs_per_user: int | None
    warmup: int
    idle_sockets: int
    send: str
    ws_compression: bool
    count_statements: bool
    topologies: tuple[str, ...]
    profile: Path | None
    past_runs: int = 0
    server_env: tuple[tuple[str, str], ...] = ()

    def runs_for(self, users: int) -> int:
        # Enough runs at one user for a p99, and ~640 runs at 32 users: a few seconds each.
        return self.runs_per_user or max(20, math.ceil(200 / users))


@dataclass(frozen=True, slots=True)
class Received:
    type: str
    run_id: str | None
    message_id: str | None
    ts: float  # server emit time, epoch seconds (millisecond resolution)
    recv_perf: float
    recv_wall: float


@dataclass(frozen=True, slots=True)
class RunSample:
    post_ms: float
    first_event_ms: float
    first_event_type: str
    agent_started_ms: float | None
    completed_ms: float
    emit_ms: list[tuple[str, float]]


# --- The server processes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    server: Server
    """Where clients connect (with `--workers 2`, the supervisor's pid and port)."""
    processes: list[psutil.Process]
    """Every server process, the supervisor included: CPU and memory are summed over them."""

    @property
    def port(self) -> int:
        return int(self.server.base_url.rsplit(":", 1)[1])


@contextlib.contextmanager
def deploy(topology: str, env: dict[str, str], workdir: Path) -> Iterator[Deployment]:
    """Start `topology`'s processes, ready; always stop them."""
    with contextlib.ExitStack() as stack:
        if topology == "api1-worker1":
            api_env = {**env, "THREADLINE_EMBEDDED_WORKER": "false"}
            server = stack.enter_context(server_process(api_env, workdir))
            worker = stack.enter_context(worker_process(env, workdir))
            roots = [server.pid, worker.pid]
        else:
            args = ("--workers", "2") if topology == "serve-workers-2" else ()
            server = stack.enter_context(server_process(env, workdir, args=args))
            roots = [server.pid]
        processes = process_tree(roots)
        deployment = Deployment(server, processes)
        if topology == "serve-workers-2":
            children = [p for p in processes if p.pid != server.pid]
            if len(children) != 2:
                raise BenchError(f"serve --workers 2 has children {children}")
            # Both children accept before the users connect, so the sockets spread over both.
            wait_all_accepting(deployment.port, children)
        yield deployment


@contextlib.contextmanager
def profiled(processes: list[psutil.Process], directory: Path | None, label: str) -> Iterator[None]:
    """py-spy attached to every process that has no children (the ones doing the work), one
    raw file each; written when py-spy gets SIGINT at the end."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    spies = [
        subprocess.Popen(
            [*py_spy_record(directory / f"{label}-{p.pid}.txt"), "--pid", str(p.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for p in processes
        if not p.children()
    ]
    try:
        yield
    finally:
        for spy in spies:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)
        for spy in spies:
            try:
                spy.wait(timeout=PROFILE_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                spy.kill()


def connections_by_process(deployment: Deployment) -> dict[str, int]:
    """Established client connections each server process holds on the server's port."""
    counts = {}
    for process in deployment.processes:
        held = [
            c
            for c in process.net_connections(kind="tcp")
            if c.laddr and c.laddr.port == deployment.port and c.status == "ESTABLISHED"
        ]
        if held:
            counts[str(process.pid)] = len(held)
    return counts


# --- The client's sockets -------------------------------------------------------------------------


async def open_socket(
    server: Server, token: str, thread_id: str, *, compression: bool
) -> ClientConnection:
    """Connect, authenticate with the first message, subscribe; returns after the snapshot."""
    async with asyncio.timeout(CONNECT_TIMEOUT):
        ws = await connect(
            server.ws_url,
            open_timeout=CONNECT_TIMEOUT,
            ping_interval=None,
            compression="deflate" if compression else None,
            max_size=2**22,
        )
        try:
            await ws.send(json.dumps({"type": "auth", "token": token}))
            await _expect_reply(ws, "authenticated")
            await ws.send(
                json.dumps(
                    {"type": "subscribe", "thread_id": thread_id, "after_seq": SUBSCRIBE_AFTER_SEQ}
                )
            )
            await _expect_reply(ws, "snapshot")
        except BaseException:
            await ws.close()
            raise
    return ws


async def _expect_reply(ws: ClientConnection, kind: str) -> None:
    """The next message must be `kind`; a batch may carry it first, then replayed events."""
    reply = json.loads(await ws.recv())
    first = reply["events"][0] if reply.get("type") == "batch" and reply["events"] else reply
    if first.get("type") != kind:
        raise BenchError(f"expected {kind!r} on the socket, got {reply}")


class EventSocket:
    """A user's subscribed socket whose reader records every event with its receive time."""

    def __init__(self, ws: ClientConnection, user: BenchUser) -> None:
        self.ws = ws
        self.user = user
        self.events: list[Received] = []
        self.replies: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        self._terminal: dict[str, asyncio.Future[Received]] = {}
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def aclose(self) -> None:
        """Close the socket; its reader then ends on its own (awaited, bounded)."""
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await self.ws.close()
            if self._reader is not None:
                await self._reader

    def terminal(self, run_id: str) -> asyncio.Future[Received]:
        if run_id not in self._terminal:
            self._terminal[run_id] = asyncio.get_running_loop().create_future()
        return self._terminal[run_id]

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                recv_perf, recv_wall = time.perf_counter(), time.time()
                message = json.loads(raw)
                items = message["events"] if message.get("type") == "batch" else [message]
                for item in items:
                    self._dispatch(item, recv_perf, recv_wall)
        except ConnectionClosed:
            pass
        finally:
            for future in self._terminal.values():
                if not future.done():
                    future.set_exception(BenchError(f"socket closed: {self.ws.close_reason}"))

    def _dispatch(self, item: dict[str, object], recv_perf: float, recv_wall: float) -> None:
        kind = str(item.get("type"))
        if "seq" not in item:  # message_accepted, error, pong, snapshot...
            if kind in ("message_accepted", "error"):
                self.replies.put_nowait(item)
            return
        data, run_id = item.get("data"), item.get("run_id")
        message_id = data.get("message_id") if isinstance(data, dict) else None
        event = Received(
            type=kind,
            run_id=str(run_id) if run_id else None,
            message_id=str(message_id) if message_id else None,
            ts=datetime.fromisoformat(str(item["ts"])).timestamp(),
            recv_perf=recv_perf,
            recv_wall=recv_wall,
        )
        self.events.append(event)
        if kind in TERMINAL and event.run_id:
            future = self.terminal(event.run_id)
            if not future.done():
                future.set_result(event)

    async def one_run(self, http: httpx.AsyncClient, send: str) -> RunSample:
        """Post one message with a run and wait for its terminal event on this socket."""
        self.events.clear()  # runs are sequential: whatever is here belongs to finished runs
        async with asyncio.timeout(RUN_TIMEOUT):
            started = time.perf_counter()
            message_id, run_id = await self._post(http, send)
            posted = time.perf_counter()
            terminal = await self.terminal(run_id)
        del self._terminal[run_id]
        if terminal.type != "agent_completed":
            raise BenchError(f"run {run_id} ended with {terminal.type}")
        if not self.replies.empty():
            raise BenchError(f"unexpected reply on the socket: {self.replies.get_nowait()}")
        mine = [
            e
            for e in self.events
            if e.run_id == run_id or (e.type == "message_created" and e.message_id == message_id)
        ]
        agent_started = next((e for e in mine if e.type == "agent_started"), None)
        return RunSample(
            post_ms=(posted - started) * 1000,
            first_event_ms=(mine[0].recv_perf - started) * 1000,
            first_event_type=mine[0].type,
            agent_started_ms=(agent_started.recv_perf - started) * 1000 if agent_started else None,
            completed_ms=(terminal.recv_perf - started) * 1000,
            emit_ms=[(e.type, (e.recv_wall - e.ts) * 1000) for e in mine],
        )

    async def _post(self, http: httpx.AsyncClient, send: str) -> tuple[str, str]:
        thread_id = self.user.thread_id
        if send == "http":
            response = await http.post(
                f"/v1/threads/{thread_id}/messages",
                headers=self.user.headers,
                json={"content": QUESTION, "run": {"agent": "demo"}},
            )
            expect(response, 201)
            body = response.json()
            return str(body["id"]), str(body["run"]["id"])
        await self.ws.send(
            json.dumps(
                {
                    "type": "send_message",
                    "thread_id": thread_id,
                    "content": QUESTION,
                    "agent": "demo",
                }
            )
        )
        reply = await self.replies.get()
        if reply.get("type") != "message_accepted" or not reply.get("run_id"):
            raise BenchError(f"send_message was refused: {reply}")
        return str(reply["message_id"]), str(reply["run_id"])


# --- Phases ---------------------------------------------------------------------------------------


async def sequential_runs(
    sock: EventSocket, http: httpx.AsyncClient, count: int, send: str
) -> list[RunSample]:
    return [await sock.one_run(http, send) for _ in range(count)]


async def run_level(
    deployment: Deployment,
    http: httpx.AsyncClient,
    sockets: list[EventSocket],
    options: Options,
    counts: Counts | None,
    *,
    label: str,
) -> dict[str, object]:
    runs = options.runs_for(len(sockets))
    servers, client_proc = deployment.processes, psutil.Process()
    async with asyncio.timeout(LEVEL_TIMEOUT):
        async with asyncio.TaskGroup() as group:
            for sock in sockets:
                group.create_task(sequential_runs(sock, http, options.warmup, options.send))
        if counts is not None:
            idle, before = await idle_rate(counts)
        load_before = os.getloadavg()
        server_cpu = [process_cpu_seconds(p) for p in servers]
        client_cpu, machine = process_cpu_seconds(client_proc), MachineMeter()
        with profiled(servers, options.profile, f"{label}-{len(sockets)}u"):
            started = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(sequential_runs(sock, http, runs, options.send))
                    for sock in sockets
                ]
            wall = time.perf_counter() - started
        machine.stop()
        server_cpu = [
            process_cpu_seconds(p) - before for p, before in zip(servers, server_cpu, strict=True)
        ]
        client_cpu = process_cpu_seconds(client_proc) - client_cpu
        spread = connections_by_process(deployment)
        if counts is not None:
            await asyncio.sleep(counts.settle_s)  # pg_stat_database lags behind (_counting.py)
            after = await counts.snapshot()
    samples = [sample for task in tasks for sample in task.result()]
    result = level_result(
        samples,
        users=len(sockets),
        runs=runs,
        warmup=options.warmup,
        wall=wall,
        server_cpu=sum(server_cpu),
        client_cpu=client_cpu,
    )
    result |= machine.per_run(
        runs=len(samples), wall_s=wall, server_s=sum(server_cpu), client_s=client_cpu
    )
    result["server_cpu_ms_per_run_by_process"] = {
        f"{p.pid} {_role(p, deployment)}": round(cpu / len(samples) * 1000, 3)
        for p, cpu in zip(servers, server_cpu, strict=True)
    }
    result["connections_by_process"] = spread
    result["load_average_before"] = [round(x, 2) for x in load_before]
    if counts is not None:
        result["database"] = per_run(before, after, idle, len(samples), postgres=counts.postgres)
    return result


def _role(process: psutil.Process, deployment: Deployment) -> str:
    if process.pid == deployment.server.pid:
        return "supervisor" if len(deployment.processes) > 1 and process.children() else "serve"
    return "worker" if "worker" in process.cmdline() else "serve child"


def level_result(
    samples: list[RunSample],
    *,
    users: int,
    runs: int,
    warmup: int,
    wall: float,
    server_cpu: float,
    client_cpu: float,
) -> dict[str, object]:
    emitted = [(kind, ms) for sample in samples for kind, ms in sample.emit_ms]
    by_type: dict[str, list[float]] = {}
    for kind, ms in emitted:
        by_type.setdefault(kind, []).append(ms)
    started = [s.agent_started_ms for s in samples if s.agent_started_ms is not None]
    return {
        "users": users,
        "runs_per_user": runs,
        "warmup_runs_per_user": warmup,
        "completed_runs": len(samples),
        "wall_s": round(wall, 3),
        "runs_per_second": round(len(samples) / wall, 1),
        "server_cpu_ms_per_run": round(server_cpu / len(samples) * 1000, 3),
        "client_cpu_ms_per_run": round(client_cpu / len(samples) * 1000, 3),
        "post_ms": summarize([s.post_ms for s in samples]),
        "first_event_ms": summarize([s.first_event_ms for s in samples]),
        "first_event_types": dict(Counter(s.first_event_type for s in samples)),
        "agent_started_ms": summarize(started),
        "agent_completed_ms": summarize([s.completed_ms for s in samples]),
        "events_per_run": round(len(emitted) / len(samples), 2),
        "emit_to_socket_ms": summarize([ms for _, ms in emitted]),
        "emit_to_socket_ms_by_type": {k: summarize(v) for k, v in sorted(by_type.items())},
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


async def idle_socket_memory(
    deployment: Deployment,
    http: httpx.AsyncClient,
    users: list[BenchUser],
    count: int,
    *,
    compression: bool,
) -> dict[str, object]:
    """RSS (summed over the server processes) before and after `count` authenticated,
    subscribed sockets, each on its own thread."""
    server = deployment.server
    owners = [users[i % len(users)] for i in range(count)]
    threads = await _bounded([lambda u=u: create_thread(http, u, "idle") for u in owners], 16)
    pairs = list(zip(owners, threads, strict=True))

    def opener(user: BenchUser, thread_id: str):  # type: ignore[no-untyped-def]
        return lambda: open_socket(server, user.token, thread_id, compression=compression)

    # A few first, so that what is set up once (lazy imports, caches) is not counted per socket.
    for ws in await _bounded([opener(u, t) for u, t in pairs[:20]], 20):
        await ws.close()
    await asyncio.sleep(SETTLE_SECONDS)
    rss_before, fds_before = _memory(deployment)
    started = time.perf_counter()
    sockets = await _bounded([opener(u, t) for u, t in pairs], 50)
    opened_s = time.perf_counter() - started
    try:
        await asyncio.sleep(SETTLE_SECONDS)
        rss_after, fds_after = _memory(deployment)
        extensions = [type(e).__name__ for e in sockets[0].protocol.extensions]
    finally:
        await _bounded([lambda ws=ws: ws.close() for ws in sockets], 100)
    await asyncio.sleep(SETTLE_SECONDS)
    return {
        "sockets": count,
        "compression_offered": compression,
        "extensions_negotiated": extensions,
        "open_s": round(opened_s, 3),
        "server_fds_before": fds_before,
        "server_fds_after": fds_after,
        "rss_before_mb": round(rss_before / 2**20, 2),
        "rss_after_mb": round(rss_after / 2**20, 2),
        "rss_after_close_mb": round(_memory(deployment)[0] / 2**20, 2),
        "kb_per_socket": round((rss_after - rss_before) / 1024 / count, 2),
    }


def _memory(deployment: Deployment) -> tuple[int, int]:
    """RSS and open files, summed over the server processes."""
    rss = sum(p.memory_info().rss for p in deployment.processes)
    return rss, sum(p.num_fds() for p in deployment.processes)


async def _bounded(factories: list, limit: int) -> list:  # type: ignore[type-arg]
    """Await every factory's coroutine, at most `limit` at a time, results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(factory):  # type: ignore[no-untyped-def]
        async with gate:
            return await factory()

    async with asyncio.timeout(LEVEL_TIMEOUT), asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(factory)) for factory in factories]
    return [task.result() for task in tasks]


# --- Per backend ----------------------------------------------------------------------------------


async def seed_past_runs(database_url: str, users: list[BenchUser], count: int) -> None:
    """`count` completed runs per user on its thread, one second apart, ending a minute ago
    (`--past-runs`); through the project's own engine and table, so on either backend."""
    engine = create_engine(normalize_database_url(database_url))
    ended = datetime.now(UTC) - timedelta(minutes=1)
    try:
        for user in users:
            rows = [
                {
                    "id": f"run_past{user.thread_id[-16:]}{n:08d}",
                    "thread_id": user.thread_id,
                    "user_id": user.id,
                    "agent": "demo",
                    "status": "completed",
                    "input": {},
                    "attempt": 1,
                    "max_attempts": 1,
                    "cancel_requested": False,
                    "created_at": (moment := ended - timedelta(seconds=count - n)),
                    "started_at": moment,
                    "finished_at": moment,
                }
                for n in range(count)
            ]
            async with asyncio.timeout(LEVEL_TIMEOUT), engine.begin() as conn:
                await conn.execute(runs_table.insert(), rows)
    finally:
        await engine.dispose()


async def drive(
    deployment: Deployment,
    options: Options,
    *,
    metrics_dir: Path,
    label: str,
    database_url: str,
    pg_database: str | None = None,
) -> dict[str, object]:
    """Every level on one deployment; `metrics_dir`: its processes' PROMETHEUS_MULTIPROC_DIR;
    `pg_database`: the PostgreSQL database it uses, whose pg_stat_database row is read (over
    `options.postgres_url`'s database) around each level."""
    server = deployment.server
    most = max(options.users)
    limits = httpx.Limits(max_connections=most + 8, max_keepalive_connections=most + 8)
    async with httpx.AsyncClient(
        base_url=server.base_url, limits=limits, timeout=HTTP_TIMEOUT, trust_env=False
    ) as http:
        counts = None
        if options.count_statements:
            admin = _asyncpg_dsn(options.postgres_url) if pg_database else None
            counts = Counts(metrics_dir, pg_admin_dsn=admin, database=pg_database)
        async with asyncio.timeout(LEVEL_TIMEOUT):
            users = await register_many(http, most, with_thread=True)
            if options.past_runs:
                await seed_past_runs(database_url, users, options.past_runs)
            sockets = [
                EventSocket(
                    await open_socket(
                        server, u.token, u.thread_id, compression=options.ws_compression
                    ),
                    u,
                )
                for u in users
            ]
        for sock in sockets:
            sock.start()
        levels = []
        try:
            for count in options.users:
                result = await run_level(
                    deployment, http, sockets[:count], options, counts, label=label
                )
                levels.append(result)
                print_level(result)
                print_database(result)
        finally:
            for sock in sockets:
                await sock.aclose()
        idle = None
        if options.idle_sockets:
            idle = await idle_socket_memory(
                deployment, http, users, options.idle_sockets, compression=options.ws_compression
            )
            print_idle(idle)
    return {"levels": levels, "idle_sockets": idle}


def _server_extra(options: Options, workdir: Path) -> dict[str, str]:
    extra = {
        "THREADLINE_MAX_CONCURRENT_RUNS_PER_USER": "1000",
        "THREADLINE_DEMO_DELAY_SECONDS": "0",
        "THREADLINE_DEBUG_COUNT_STATEMENTS": str(options.count_statements).lower(),
        **dict(options.server_env),
    }
    if options.count_statements:  # every process's counters in files there (_counting.py)
        (workdir / "metrics").mkdir()
        extra["PROMETHEUS_MULTIPROC_DIR"] = str(workdir / "metrics")
    return extra


async def _measure(
    topology: str,
    env: dict[str, str],
    workdir: Path,
    options: Options,
    *,
    label: str,
    pg_database: str | None = None,
) -> dict[str, object]:
    with deploy(topology, env, workdir) as deployment:
        return await drive(
            deployment,
            options,
            metrics_dir=workdir / "metrics",
            label=label,
            database_url=env["THREADLINE_DATABASE_URL"],
            pg_database=pg_database,
        )


async def run_sqlite(options: Options, topology: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="threadline-bench-") as tmp:
        workdir = Path(tmp)
        env = server_env(
            f"sqlite:///{workdir / 'bench.db'}", workdir, _server_extra(options, workdir)
        )
        result = await _measure(topology, env, workdir, options, label=f"sqlite-{topology}")
    import sqlite3

    return {
        "topology": topology,
        "services": {"database": f"SQLite {sqlite3.sqlite_version}"},
        **result,
    }


async def run_postgres(options: Options, topology: str) -> dict[str, object]:
    require_loopback(options.postgres_url, "--postgres-url")
    require_loopback(options.redis_url, "--redis-url")
    prefix = f"threadline-bench-runs-{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="threadline-bench-") as tmp:
        workdir = Path(tmp)
        extra = {
            **_server_extra(options, workdir),
            "THREADLINE_REDIS_URL": options.redis_url,
            "THREADLINE_REDIS_PREFIX": prefix,
        }
        async with postgres_database(options.postgres_url, label="runs") as database_url:
            env = server_env(database_url, workdir, extra)
            try:
                await asyncio.to_thread(migrate, env, workdir)
                result = await _measure(
                    topology,
                    env,
                    workdir,
                    options,
                    label=f"postgres-{topology}",
                    pg_database=urlsplit(database_url).path.lstrip("/"),
                )
                services = {
                    "database": await postgres_version(database_url),
                    "redis": await redis_version(options.redis_url),
                }
            finally:
                await delete_redis_prefix(options.redis_url, prefix)
    return {"topology": topology, "services": services, **result}


# --- Output ---------------------------------------------------------------------------------------


def print_level(r: dict[str, object]) -> None:
    def p(key: str) -> str:
        s = r[key]
        return f"{s['p50']:>8.2f}/{s['p99']:<8.2f}"  # type: ignore[index]

    print(
        f"{r['users']:>5}{r['completed_runs']:>6}{r['runs_per_second']:>8.1f}"
        f"{r['server_cpu_ms_per_run']:>9.2f}{r['client_cpu_ms_per_run']:>9.2f}  {p('post_ms')}"
        f"{p('first_event_ms')}{p('agent_started_ms')}{p('agent_completed_ms')}"
        f"{p('emit_to_socket_ms')}  load {r['load_average_before'][0]}->"  # type: ignore[index]
        f"{r['load_average_after'][0]}",
        flush=True,
    )  # type: ignore[index]
    print_machine_cpu(r)
    shares = r.get("server_cpu_ms_per_run_by_process")
    if isinstance(shares, dict) and len(shares) > 1:
        print(
            f"      server CPU ms/run by process: {shares}; client connections by process: "
            f"{r['connections_by_process']}",
            flush=True,
        )


HEADER = (
    f"{'users':>5}{'runs':>6}{'runs/s':>8}{'srv CPU':>9}{'cli CPU':>9}  "
    f"{'post p50/p99':<18}{'1st event':<18}{'started':<18}{'completed':<18}"
    f"{'emit->socket':<18}{'load (1 min)'}\n{'':>19}{'ms/run':>9}{'ms/run':>9}"
    "  (all times in ms)"
)


def print_database(r: dict[str, object]) -> None:
    counted = r.get("database")
    if not isinstance(counted, dict):
        return
    each = counted["per_run"]
    line = (
        f"      database per run (counting hook): {each['transactions']} transactions "
        f"({each['commits']} commit, {each['rollbacks']} rollback), {each['statements']} "
        f"statements, {each['pre_pings']} pre-pings, {each['round_trips']} round trips"
    )
    pg = counted.get("pg_stat_database")
    if isinstance(pg, dict):
        line += (
            f"; pg_stat_database: {pg['transactions_per_run']} transactions "
            f"({pg['commits_per_run']} commit, {pg['rollbacks_per_run']} rollback)"
        )
    print(line, flush=True)


def print_idle(r: dict[str, object]) -> None:
    print(
        f"idle sockets: {r['sockets']} (extensions {r['extensions_negotiated']}, fds "
        f"{r['server_fds_before']} -> {r['server_fds_after']}): RSS {r['rss_before_mb']} -> "
        f"{r['rss_after_mb']} MB = {r['kb_per_socket']} KB per socket",
        flush=True,
    )


def comparison(backend: str, topology: str, result: dict[str, object]) -> list[str]:
    """Lines comparing the results with issue 11's targets and the reference peer."""
    levels: list[dict] = result["levels"]  # type: ignore[assignment,type-arg]
    t, peer, own = TARGETS, REFERENCE_PEER, TARGETS[backend]

    def mark(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    lines = [
        f"[{backend} / {topology}] vs issue 11's targets and its reference figure "
        f"(~{peer['runs_per_second']:.0f} runs/s, ~{peer['server_cpu_ms_per_run']:.0f} ms "
        "CPU/run, another machine: measure the peer here with bench/peer/):"
    ]
    for r in levels:
        users, rate, cpu = r["users"], r["runs_per_second"], r["server_cpu_ms_per_run"]
        at = f"  {r['users']} users (load {r['load_average_after'][0]}):"
        if users >= 32:
            lines.append(
                f"{at} {mark(rate >= own['runs_per_second_at_32'])} runs/s {rate} "
                f"(target >= {own['runs_per_second_at_32']:.0f}"
                f"{' with the best 2-core topology' if backend == 'postgres' else ''}; "
                f"x{rate / peer['runs_per_second']:.2f} the reference figure)"
            )
        else:
            lines.append(f"{at} info runs/s {rate}")
        lines.append(
            f"{at} {mark(cpu <= own['server_cpu_ms_per_run'])} server CPU/run {cpu} ms "
            f"(target <= {own['server_cpu_ms_per_run']:.0f}; "
            f"x{cpu / peer['server_cpu_ms_per_run']:.2f} the reference figure)"
        )
        counted = r.get("database")
        if isinstance(counted, dict):
            each = counted["per_run"]
            lines.append(
                f"{at} {mark(each['transactions'] <= t['transactions_per_run'])} transactions/run "
                f"{each['transactions']} (target <= {t['transactions_per_run']:.0f}); "
                f"{mark(each['round_trips'] <= t['round_trips_per_run'])} round trips/run "
                f"{each['round_trips']} (target <= {t['round_trips_per_run']:.0f})"
            )
        first, done = r["first_event_ms"], r["agent_completed_ms"]
        lines.append(
            f"{at} {mark(first['p99'] < t['first_event_p99_ms'])} first event p50/p99 "
            f"{first['p50']}/{first['p99']} ms (target p99 < {t['first_event_p99_ms']:.0f}); "
            f"{mark(done['p99'] < t['completed_p99_ms'])} completion p50/p99 "
            f"{done['p50']}/{done['p99']} ms (target p99 < {t['completed_p99_ms']:.0f})"
        )
    idle = result.get("idle_sockets")
    if idle:
        lines.append(f"  info idle socket: {idle['kb_per_socket']} KB each")  # type: ignore[index]
    return lines


# --- Entry point ----------------------------------------------------------------------------------


def raise_open_files(needed: int) -> dict[str, int]:
    """Both ends of every socket live on this machine; the server inherits this limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:
        raise BenchError(f"need {needed} open files, the hard limit is {hard}")
    return {"soft": soft, "hard": hard}


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "runs.json")
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="a PostgreSQL server where the benchmark may create a database",
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--users", default="1,32", help="concurrency levels, comma-separated")
    parser.add_argument(
        "--runs-per-user",
        type=int,
        default=None,
        help="measured runs per user (default: max(20, 200/users))",
    )
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured runs per user")
    parser.add_argument("--idle-sockets", type=int, default=1000, help="0 skips the phase")
    parser.add_argument(
        "--send",
        choices=["http", "ws"],
        default="http",
        help="post through HTTP POST .../messages or the socket's send_message",
    )
    parser.add_argument(
        "--count-statements",
        choices=["on", "off"],
        default="on",
        help="count the server's database transactions and round trips "
        "(THREADLINE_DEBUG_COUNT_STATEMENTS; default on)",
    )
    parser.add_argument(
        "--ws-compression",
        choices=["on", "off"],
        default="on",
        help="offer permessage-deflate, as browsers do (default on)",
    )
    parser.add_argument(
        "--topology",
        default="serve",
        help=f"comma-separated, of {', '.join(TOPOLOGIES)} (default serve; SQLite runs serve only)",
    )
    parser.add_argument(
        "--past-runs",
        type=int,
        default=0,
        metavar="N",
        help="finished runs per user written into the database beforehand",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="py-spy raw profiles, one file per working server process",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a THREADLINE_* setting for the servers (repeatable), to compare "
        "settings in one sitting",
    )
    args = parser.parse_args(argv)
    server_env: list[tuple[str, str]] = []
    for item in args.server_env:
        name, equals, value = item.partition("=")
        if not equals or not name.startswith("THREADLINE_"):
            parser.error("--server-env takes THREADLINE_NAME=VALUE")
        server_env.append((name, value))
    topologies = tuple(dict.fromkeys(t.strip() for t in args.topology.split(",") if t.strip()))
    if not topologies or set(topologies) - set(TOPOLOGIES):
        parser.error(f"--topology takes some of {', '.join(TOPOLOGIES)}")
    users = tuple(sorted({int(n) for n in args.users.split(",") if n.strip()}))
    if (
        not users
        or users[0] < 1
        or args.warmup < 0
        or args.idle_sockets < 0
        or (args.runs_per_user is not None and args.runs_per_user < 1)
        or args.past_runs < 0
    ):
        parser.error(
            "--users, --runs-per-user, --warmup, --idle-sockets and --past-runs must be positive"
        )
    return Options(
        backends=("sqlite", "postgres") if args.backend == "both" else (args.backend,),
        out=args.out,
        postgres_url=args.postgres_url,
        redis_url=args.redis_url,
        users=users,
        runs_per_user=args.runs_per_user,
        warmup=args.warmup,
        idle_sockets=args.idle_sockets,
        send=args.send,
        ws_compression=args.ws_compression == "on",
        count_statements=args.count_statements == "on",
        topologies=topologies,
        profile=args.profile.resolve() if args.profile else None,
        past_runs=args.past_runs,
        server_env=tuple(server_env),
    )


async def run(options: Options, open_files: dict[str, int]) -> dict[str, object]:
    measured: dict[tuple[str, str], dict[str, object]] = {}
    started = time.perf_counter()
    for backend in options.backends:
        allowed = SQLITE_TOPOLOGIES if backend == "sqlite" else TOPOLOGIES
        skipped = [t for t in options.topologies if t not in allowed]
        if skipped:
            print(
                f"\n[{backend}] skips {', '.join(skipped)}: SQLite runs in one process "
                "(serve refuses --workers above 1 on it)",
                flush=True,
            )
        for topology in (t for t in options.topologies if t in allowed):
            print(f"\n[{backend} / {topology}] posting via {options.send}\n{HEADER}", flush=True)
            runner = run_sqlite if backend == "sqlite" else run_postgres
            measured[backend, topology] = await runner(options, topology)
    print()
    for (backend, topology), result in measured.items():
        print("\n".join(comparison(backend, topology, result)))
    config = {k: v for k, v in asdict(options).items() if k != "out"}
    config["postgres_url"] = options.postgres_url.split("@")[-1]  # no credentials in results
    config["runs_per_user_by_level"] = {str(n): options.runs_for(n) for n in options.users}
    config["server_settings"] = {
        name: Settings.model_fields[name].default
        for name in ("database_pool_size", "worker_concurrency", "socket_queue_size")
    }
    return {
        "benchmark": "bench/runs.py",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": {
            **machine_info(("psutil",)),
            "client_event_loop": _loop_name(),
            "open_files": open_files,
        },
        "config": config,
        "targets": {**TARGETS, "reference_peer": REFERENCE_PEER},
        # As before: each backend's `serve` result (levels, idle_sockets, services)...
        "backends": {b: r for (b, t), r in measured.items() if t == "serve"},
        # ...and every backend and topology measured, `serve` included.
        "topologies": {f"{b}/{t}": r for (b, t), r in measured.items()},
    }


def _loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    failures: list[BaseException] = []
    try:
        open_files = raise_open_files(options.idle_sockets + max(options.users) * 2 + 256)
        results = _run_loop(options, open_files)
    except* (BenchError, TimeoutError, ConnectionClosed, OSError, httpx.HTTPError) as group:
        failures.extend(group.exceptions)
    if failures:
        return report_failures(failures, with_type=True)
    return write_results(options.out, results)


def _run_loop(options: Options, open_files: dict[str, int]) -> dict[str, object]:
    """The client's loop: uvloop when installed (the server uses it too), to keep the client's
    own overhead, which shares the machine's cores, small."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run(options, open_files))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run(options, open_files))


if __name__ == "__main__":
    sys.exit(main())
