"""Scale-out benchmark: runs through N `threadline serve` and M `threadline worker` processes on
one PostgreSQL database and one Redis, watched live on WebSockets.

    python bench/scale.py --out bench/results/scale.json [--layouts 1x1,1x2,2x2] \
        [--users 32] [--runs-per-user 10] [--warmup 2]

A layout `AxW` is A API processes (embedded worker off: they execute no run) and W workers.
Every user has its own account, thread and WebSocket; user i's socket is on API process
i mod A and it posts its messages (`"run": {"agent": "demo"}`, the instant demo model) over
HTTP to API process i+1 mod A, the next one only after `agent_completed` reached its socket.
So every event a socket receives was emitted on a worker process and crossed Redis, and with
two API processes the post crossed processes too.

Measured per layout:
- runs per second over the measured phase (after a warm-up);
- events lost, duplicated or out of order: every durable event the database holds for each
  thread (read back through a fresh subscription with `after_seq=0` at the end) against what
  the user's socket received live; runs that did not end exactly once with `agent_completed`;
- cross-process latency, emit on a worker to the socket on an API process: client receive
  time - the event's `ts` (the worker's clock at emit, same machine), over the events a worker
  emits (all of a run's but `run_queued` and the user's `message_created`). `ts` is truncated
  to the millisecond, so a value is 0-1 ms above the true one.

Each layout gets a fresh database (dropped afterwards) and its own Redis key prefix (deleted
afterwards); every process is started on loopback and always stopped; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from _support import (
    DEFAULT_POSTGRES_URL,
    DEFAULT_REDIS_URL,
    HTTP_TIMEOUT,
    ROOT,
    BenchError,
    BenchUser,
    Server,
    delete_redis_prefix,
    machine_info,
    migrate,
    postgres_database,
    postgres_version,
    redis_version,
    register_many,
    report_failures,
    require_loopback,
    server_env,
    server_process,
    summarize,
    worker_process,
    write_results,
)
from runs import CONNECT_TIMEOUT, TERMINAL, EventSocket, open_socket
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

LAYOUT_TIMEOUT = 900.0
TARGET_P99_MS = 25.0
# Emitted by the API process that took the POST; every other event of a run by its worker.
API_EMITTED = frozenset({"run_queued", "message_created"})


@dataclass(frozen=True)
class Options:
    out: Path
    postgres_url: str
    redis_url: str
    layouts: tuple[tuple[int, int], ...]
    users: int
    runs_per_user: int
    warmup: int
    worker_poll_seconds: float | None


class TrackedSocket(EventSocket):
    """`EventSocket` that also keeps (seq, type, run id) of everything it ever received."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.seen: list[tuple[int, str, str | None]] = []

    def _dispatch(self, item: dict[str, object], recv_perf: float, recv_wall: float) -> None:
        if "seq" in item:
            run_id = item.get("run_id")
            seq = int(str(item["seq"]))
            self.seen.append((seq, str(item["type"]), str(run_id) if run_id else None))
        super()._dispatch(item, recv_perf, recv_wall)


async def stored_log(server: Server, user: BenchUser) -> list[tuple[int, str, str | None]]:
    """Every durable event of the user's thread, replayed by `server` from the database."""
    seen: list[tuple[int, str, str | None]] = []
    async with asyncio.timeout(CONNECT_TIMEOUT * 4):
        async with connect(server.ws_url, ping_interval=None, max_size=2**24) as ws:
            await ws.send(json.dumps({"type": "auth", "token": user.token}))
            await ws.send(
                json.dumps({"type": "subscribe", "thread_id": user.thread_id, "after_seq": 0})
            )
            await ws.send(json.dumps({"type": "ping"}))  # answered after the whole replay
            async for raw in ws:
                message = json.loads(raw)
                for item in message["events"] if message.get("type") == "batch" else [message]:
                    if item.get("type") == "pong":
                        return seen
                    if "seq" in item:
                        run_id = item.get("run_id")
                        seen.append((int(item["seq"]), str(item["type"]), run_id))
    raise BenchError("the replay ended without a pong")


def integrity(
    received: list[tuple[int, str, str | None]], stored: list[tuple[int, str, str | None]]
) -> dict[str, int]:
    """Received live against stored, from the first event after the socket's subscribe (what
    came before was in the subscribe's replay, which `open_socket` does not record)."""
    if received:
        stored = [e for e in stored if e[0] >= received[0][0]]
    durable = [e for e in received if e[1] != "message_delta"]
    counts = Counter(seq for seq, _, _ in durable)
    stored_seqs = {seq for seq, _, _ in stored}
    seqs = [seq for seq, _, _ in durable]  # deltas carry the seq of the event they follow
    ends = Counter(run for _, kind, run in stored if kind in TERMINAL)
    runs = {run for _, kind, run in stored if kind == "run_queued"}
    return {
        "lost": len(stored_seqs - set(counts)),
        "duplicated": sum(n - 1 for n in counts.values() if n > 1),
        "not_in_store": len(set(counts) - stored_seqs),
        "out_of_order": sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b <= a),
        "runs_not_ended_once": sum(1 for run in runs if ends[run] != 1),
        "runs_failed": sum(1 for _, kind, _ in stored if kind in TERMINAL - {"agent_completed"}),
    }


async def measure(apis: list[Server], options: Options) -> dict[str, object]:
    clients = [
        httpx.AsyncClient(base_url=api.base_url, timeout=HTTP_TIMEOUT, trust_env=False)
        for api in apis
    ]
    try:
        users = await register_many(clients[0], options.users, with_thread=True)
        sockets = []
        for n, user in enumerate(users):
            api = apis[n % len(apis)]
            ws = await open_socket(api, user.token, user.thread_id, compression=False)
            sock = TrackedSocket(ws, user)
            sock.start()
            sockets.append(sock)
        try:
            return await _phases(sockets, clients, apis, options)
        finally:
            for sock in sockets:
                await sock.aclose()
    finally:
        for client in clients:
            await client.aclose()


async def _phases(
    sockets: list[TrackedSocket],
    clients: list[httpx.AsyncClient],
    apis: list[Server],
    options: Options,
) -> dict[str, object]:
    def poster(n: int) -> httpx.AsyncClient:
        return clients[(n + 1) % len(clients)]

    async def runs(n: int, sock: TrackedSocket, count: int) -> list[float]:
        latencies: list[float] = []
        for _ in range(count):
            sample = await sock.one_run(poster(n), "http")
            latencies += [ms for kind, ms in sample.emit_ms if kind not in API_EMITTED]
        return latencies

    async with asyncio.TaskGroup() as group:
        for n, sock in enumerate(sockets):
            group.create_task(runs(n, sock, options.warmup))
    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(runs(n, sock, options.runs_per_user))
            for n, sock in enumerate(sockets)
        ]
    wall = time.perf_counter() - started
    latencies = [ms for task in tasks for ms in task.result()]
    totals: Counter[str] = Counter()
    for n, sock in enumerate(sockets):
        stored = await stored_log(apis[(n + 1) % len(apis)], sock.user)
        totals.update(integrity(sock.seen, stored))
    completed = options.users * options.runs_per_user
    return {
        "users": options.users,
        "runs_measured": completed,
        "wall_s": round(wall, 3),
        "runs_per_second": round(completed / wall, 1),
        "integrity": dict(totals),
        "emit_to_socket_ms": summarize(latencies, suffix=""),
    }


async def run_layout(options: Options, api_count: int, worker_count: int) -> dict[str, object]:
    prefix = f"threadline-bench-scale-{uuid.uuid4().hex[:10]}"
    extra = {
        "THREADLINE_REDIS_URL": options.redis_url,
        "THREADLINE_REDIS_PREFIX": prefix,
        "THREADLINE_MAX_CONCURRENT_RUNS_PER_USER": "1000",
        "THREADLINE_DEMO_DELAY_SECONDS": "0",
    }
    if options.worker_poll_seconds is not None:
        extra["THREADLINE_WORKER_POLL_SECONDS"] = str(options.worker_poll_seconds)
    with tempfile.TemporaryDirectory(prefix="threadline-bench-scale-") as tmp:
        workdir = Path(tmp)
        async with postgres_database(options.postgres_url, label="scale") as database_url:
            env = server_env(database_url, workdir, extra)
            try:
                await asyncio.to_thread(migrate, env, workdir)
                with contextlib.ExitStack() as stack:
                    api_env = {**env, "THREADLINE_EMBEDDED_WORKER": "false"}
                    apis = [
                        stack.enter_context(server_process(api_env, _dir(workdir, "api", n)))
                        for n in range(api_count)
                    ]
                    for n in range(worker_count):
                        stack.enter_context(worker_process(env, _dir(workdir, "worker", n)))
                    async with asyncio.timeout(LAYOUT_TIMEOUT):
                        result = await measure(apis, options)
            finally:
                await delete_redis_prefix(options.redis_url, prefix)
    return {
        "layout": f"{api_count} API + {worker_count} worker",
        "api_processes": api_count,
        "worker_processes": worker_count,
        **result,
    }


def _dir(workdir: Path, kind: str, n: int) -> Path:
    path = workdir / f"{kind}-{n}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def print_layout(r: dict[str, object]) -> None:
    latency = r["emit_to_socket_ms"]
    print(
        f"{r['layout']:<20} {r['runs_per_second']:>8} runs/s  "
        f"emit->socket p50 {latency['p50']} ms  p99 {latency['p99']} ms  "  # type: ignore[index]
        f"integrity {r['integrity']}",
        flush=True,
    )


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="a PostgreSQL server where the benchmark may create a database",
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--layouts", default="1x1,1x2,2x2", help="APIxWORKERS, comma-separated")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--runs-per-user", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured runs per user")
    parser.add_argument(
        "--worker-poll-seconds",
        type=float,
        default=None,
        help="THREADLINE_WORKER_POLL_SECONDS of the workers (default: its default)",
    )
    args = parser.parse_args(argv)
    try:
        layouts = tuple(tuple(int(x) for x in item.split("x")) for item in args.layouts.split(","))
    except ValueError:
        parser.error("--layouts looks like 1x1,2x2")
    if (
        any(len(lay) != 2 or min(lay) < 1 for lay in layouts)
        or args.users < 1
        or args.runs_per_user < 1
        or args.warmup < 0
    ):
        parser.error("--layouts, --users, --runs-per-user and --warmup must be positive")
    require_loopback(args.postgres_url, "--postgres-url")
    require_loopback(args.redis_url, "--redis-url")
    return Options(
        out=args.out,
        postgres_url=args.postgres_url,
        redis_url=args.redis_url,
        layouts=layouts,
        users=args.users,  # type: ignore[arg-type]
        runs_per_user=args.runs_per_user,
        warmup=args.warmup,
        worker_poll_seconds=args.worker_poll_seconds,
    )


async def run(options: Options) -> dict[str, object]:
    started = time.perf_counter()
    layouts = []
    for api_count, worker_count in options.layouts:
        result = await run_layout(options, api_count, worker_count)
        print_layout(result)
        layouts.append(result)
    config = {k: v for k, v in asdict(options).items() if k != "out"}
    config["postgres_url"] = options.postgres_url.split("@")[-1]  # no credentials in results
    return {
        "benchmark": "bench/scale.py",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": machine_info(("psutil",)),
        "services": {
            "database": await postgres_version(options.postgres_url),
            "redis": await redis_version(options.redis_url),
        },
        "config": config,
        "targets": {"emit_to_socket_p99_ms_at_32_users": TARGET_P99_MS, "lost": 0, "duplicated": 0},
        "layouts": layouts,
    }


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    failures: list[BaseException] = []
    try:
        results = asyncio.run(run(options))
    except* (BenchError, TimeoutError, ConnectionClosed, OSError, httpx.HTTPError) as group:
        failures.extend(group.exceptions)
    if failures:
        return report_failures(failures, with_type=True)
    return write_results(options.out, results)


if __name__ == "__main__":
    sys.exit(main())
