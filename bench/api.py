"""API latency benchmark: a real `threadline serve` process spoken to over real HTTP.

    python bench/api.py --backend sqlite|postgres|both --out bench/results/api.json

Measures, per backend:
- the in-process cost of `UserContext.create` (the API builds one per request);
- create-thread, list-threads and post-message latency (p50/p90/p99/max) and throughput at 1 and
  at 32 concurrent clients. Each client is an asyncio task sending its requests one after another
  through one pooled `httpx.AsyncClient`; each has its own registered user, except list-threads,
  where every client reads the same user's 10,000 threads (seeded with one bulk INSERT, not
  10,000 HTTP calls).

A `healthz` row (no auth, no database) is the floor: HTTP, middleware and this client.

The server is a subprocess (`python -m threadline serve`) on a free loopback port: SQLite in a
temporary directory, or a fresh PostgreSQL database (dropped afterwards) plus Redis under a unique
key prefix (deleted afterwards). Every wait is bounded and the server is always stopped.

The client shares the machine with the server, so its CPU time is part of what is measured; each
row therefore also records CPU milliseconds per request of the server process and of this client,
and how busy the whole machine was (other people's work on a shared machine shows up there).
`--quiet-wait` waits, bounded, for the machine to idle before each backend; `--profile PATH`
records the server with py-spy (if installed) as collapsed stacks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import sqlalchemy as sa
from _support import (
    DEFAULT_POSTGRES_URL,
    DEFAULT_REDIS_URL,
    HTTP_TIMEOUT,
    ROOT,
    BenchError,
    BenchUser,
    Server,
    delete_redis_prefix,
    expect,
    machine_info,
    migrate,
    postgres_database,
    redis_version,
    register,
    register_many,
    report_failures,
    require_loopback,
    server_env,
    server_process,
    summarize,
    write_results,
)
from sqlalchemy.engine import make_url

from threadline.context import UserContext
from threadline.ids import IdPrefix, new_id
from threadline.settings import Settings, normalize_database_url
from threadline.store.db import create_engine
from threadline.store.tables import threads

# `healthz` is a baseline: HTTP, middleware and this client, without auth or database.
OPERATIONS = ("healthz", "create_thread", "list_threads", "post_message")
SCENARIO_TIMEOUT = 600.0


@dataclass(frozen=True)
class Options:
    backends: tuple[str, ...]
    out: Path
    postgres_url: str
    redis_url: str
    clients: tuple[int, ...]
    requests: dict[int, int]
    warmup: int
    seed_threads: int
    context_iterations: int
    profile: Path | None
    quiet_wait: float


# --- Small helpers --------------------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far (Linux `/proc`; None elsewhere)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def machine_cpu() -> tuple[int, int] | None:
    """(total, idle) jiffies of the whole machine (Linux `/proc/stat`; None elsewhere)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(values), values[3] + values[4]  # idle + iowait


def busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of all the machine's CPUs busy between two `machine_cpu` readings."""
    if before is None or after is None or after[0] == before[0]:
        return None
    return round(1 - (after[1] - before[1]) / (after[0] - before[0]), 3)


async def wait_for_quiet(max_wait: float, threshold: float = 0.15) -> dict[str, object]:
    """The machine is shared: wait (bounded) until other work leaves it mostly idle."""
    deadline = time.monotonic() + max_wait
    while True:
        before = machine_cpu()
        await asyncio.sleep(2.0)
        busy = busy_share(before, machine_cpu())
        if busy is None or busy < threshold or time.monotonic() >= deadline:
            return {"busy_share_before_start": busy, "quiet": busy is not None and busy < threshold}
        print(f"machine {busy:.0%} busy with other work; waiting for it to calm down", flush=True)


# --- (a) user context -----------------------------------------------------------------------------


def bench_user_context(iterations: int, repeats: int = 5) -> dict[str, float]:
    user_id, thread_id = new_id(IdPrefix.USER), new_id(IdPrefix.THREAD)
    request_id = uuid.uuid4().hex

    def create() -> UserContext:
        return UserContext.create(user_id, request_id=request_id, thread_id=thread_id)

    timer = timeit.Timer(create)
    timer.timeit(number=min(iterations, 10_000))  # warm-up
    runs = sorted(timer.repeat(repeat=repeats, number=iterations))
    per_call = [run / iterations * 1e6 for run in runs]
    return {
        "iterations": iterations,
        "repeats": repeats,
        "best_us": round(per_call[0], 3),
        "median_us": round(per_call[len(per_call) // 2], 3),
        "target_us": 20.0,
    }


# --- Backends -------------------------------------------------------------------------------------


async def service_versions(database_url: str, redis_url: str | None) -> dict[str, str]:
    versions = {}
    engine = create_engine(normalize_database_url(database_url))
    try:
        async with asyncio.timeout(10), engine.connect() as conn:
            query = (
                "SELECT version()"
                if engine.dialect.name == "postgresql"
                else "SELECT 'SQLite ' || sqlite_version()"
            )
            versions["database"] = str(await conn.scalar(sa.text(query)))
    finally:
        await engine.dispose()
    if redis_url:
        versions["redis"] = await redis_version(redis_url)
    return versions


async def seed_threads(database_url: str, user_id: str, count: int) -> float:
    """Insert `count` threads for one user in one statement batch; returns the seconds taken."""
    now = datetime.now(UTC)
    rows = [
        {
            "id": new_id(IdPrefix.THREAD),
            "user_id": user_id,
            "title": f"Seeded thread {i}",
            "status": "active",
            "metadata": {"seed": i % 10},
            "version": 1,
            "message_count": 0,
            "created_at": now - timedelta(seconds=count - i),
            "updated_at": now - timedelta(seconds=count - i),
            "last_activity_at": now - timedelta(seconds=count - i),
        }
        for i in range(count)
    ]
    engine = create_engine(normalize_database_url(database_url))
    started = time.perf_counter()
    try:
        async with asyncio.timeout(120), engine.begin() as conn:
            await conn.execute(threads.insert(), rows)
    finally:
        await engine.dispose()
    return time.perf_counter() - started


# --- HTTP clients ---------------------------------------------------------------------------------


Send = Callable[[], Awaitable[httpx.Response]]


def sender(http: httpx.AsyncClient, operation: str, user: BenchUser, seeded: BenchUser) -> Send:
    if operation == "healthz":
        return lambda: http.get("/healthz")
    if operation == "create_thread":
        return lambda: http.post("/v1/threads", json={"title": "bench"}, headers=user.headers)
    if operation == "list_threads":
        return lambda: http.get("/v1/threads", params={"limit": 20}, headers=seeded.headers)
    if operation == "post_message":
        path = f"/v1/threads/{user.thread_id}/messages"
        body = {"content": "Hello from the benchmark; how are you today?"}
        return lambda: http.post(path, json=body, headers=user.headers)
    raise ValueError(operation)


async def sequential(send: Send, count: int, status: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        response = await send()
        latencies.append(time.perf_counter() - started)
        expect(response, status)
    return latencies


async def run_scenario(
    server: Server, senders: list[Send], *, requests: int, warmup: int, status: int
) -> dict[str, float | int | None]:
    async with asyncio.timeout(SCENARIO_TIMEOUT):
        async with asyncio.TaskGroup() as group:
            for send in senders:
                group.create_task(sequential(send, warmup, status))
        pid = None if server.profiled else server.pid  # py-spy's CPU time is not the server's
        server_cpu, client_cpu = cpu_seconds(pid), time.process_time()
        machine_before = machine_cpu()
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(sequential(s, requests, status)) for s in senders]
        wall = time.perf_counter() - started
        client_cpu = time.process_time() - client_cpu
        server_end = cpu_seconds(pid)
        machine_busy = busy_share(machine_before, machine_cpu())
    latencies = [seconds * 1000 for task in tasks for seconds in task.result()]
    count = len(latencies)
    server_cpu = None if server_cpu is None or server_end is None else server_end - server_cpu
    # Cores busy with everything but the server and this client: the database and Redis when
    # they are used, and whatever else runs on the machine (noise on a shared machine).
    rest = None
    if machine_busy is not None and server_cpu is not None:
        rest = round(machine_busy * (os.cpu_count() or 1) - (server_cpu + client_cpu) / wall, 2)
    return {
        "clients": len(senders),
        "requests_per_client": requests,
        **summarize(latencies, count_key="requests", suffix="_ms"),
        "throughput_rps": round(count / wall, 1),
        "wall_s": round(wall, 3),
        # CPU per request: the server's single process, and this client's (same machine).
        "server_cpu_ms_per_request": server_cpu and round(server_cpu / count * 1000, 3),
        "server_cpu_share": server_cpu and round(server_cpu / wall, 3),
        "client_cpu_ms_per_request": round(client_cpu / count * 1000, 3),
        # Everything on the machine: server, client, PostgreSQL, Redis, and anyone else's work.
        "machine_busy_share": machine_busy,
        "rest_of_machine_cores": rest,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


async def drive(server: Server, database_url: str, options: Options) -> dict[str, object]:
    most = max(options.clients)
    limits = httpx.Limits(max_connections=most + 4, max_keepalive_connections=most + 4)
    async with httpx.AsyncClient(
        base_url=server.base_url, limits=limits, timeout=HTTP_TIMEOUT, trust_env=False
    ) as http:
        async with asyncio.timeout(SCENARIO_TIMEOUT):
            seeded = await register(http, with_thread=False)
            seed_seconds = await seed_threads(database_url, seeded.id, options.seed_threads)
            users = await register_many(http, most, with_thread=True)
        scenarios = []
        for clients in options.clients:
            for operation in OPERATIONS:
                senders = [sender(http, operation, user, seeded) for user in users[:clients]]
                result = await run_scenario(
                    server,
                    senders,
                    requests=options.requests[clients],
                    warmup=options.warmup,
                    status=201 if operation in ("create_thread", "post_message") else 200,
                )
                scenarios.append({"operation": operation, **result})
                print_row(operation, result)
    return {
        "seeded_threads": options.seed_threads,
        "seed_seconds": round(seed_seconds, 3),
        "scenarios": scenarios,
    }


# --- Per backend ----------------------------------------------------------------------------------


async def run_sqlite(options: Options) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="threadline-bench-") as tmp:
        workdir = Path(tmp)
        database_url = f"sqlite:///{workdir / 'bench.db'}"
        env = server_env(database_url, workdir, {})
        profile = options.profile and options.profile.with_suffix(".sqlite.txt")
        with server_process(env, workdir, profile=profile) as server:
            result = await drive(server, database_url, options)
        return {"services": await service_versions(database_url, None), **result}


async def run_postgres(options: Options) -> dict[str, object]:
    require_loopback(options.postgres_url, "--postgres-url")
    require_loopback(options.redis_url, "--redis-url")
    prefix = f"threadline-bench-{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="threadline-bench-") as tmp:
        workdir = Path(tmp)
        async with postgres_database(options.postgres_url) as database_url:
            env = server_env(
                database_url,
                workdir,
                {"THREADLINE_REDIS_URL": options.redis_url, "THREADLINE_REDIS_PREFIX": prefix},
            )
            try:
                await asyncio.to_thread(migrate, env, workdir)
                profile = options.profile and options.profile.with_suffix(".postgres.txt")
                with server_process(env, workdir, profile=profile) as server:
                    result = await drive(server, database_url, options)
                versions = await service_versions(database_url, options.redis_url)
            finally:
                await delete_redis_prefix(options.redis_url, prefix)
        pool_size = Settings.model_fields["database_pool_size"].default
        return {"services": versions, "database_pool_size": pool_size, **result}


# --- Output ---------------------------------------------------------------------------------------

HEADER = (
    f"{'operation':<14}{'clients':>8}{'requests':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
    f"{'max ms':>9}{'req/s':>8}{'srv cpu':>9}{'cli cpu':>9}{'other':>7}"
)


def print_row(operation: str, r: dict[str, float | int | None]) -> None:
    server_cpu = r["server_cpu_ms_per_request"]
    shown_cpu = f"{server_cpu:>9.2f}" if server_cpu is not None else f"{'-':>9}"
    rest = r["rest_of_machine_cores"]
    shown_rest = f"{rest:>7.2f}" if rest is not None else f"{'-':>7}"
    print(
        f"{operation:<14}{r['clients']:>8}{r['requests']:>9}{r['p50_ms']:>9.2f}"
        f"{r['p90_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['max_ms']:>9.2f}{r['throughput_rps']:>8.0f}"
        f"{shown_cpu}{r['client_cpu_ms_per_request']:>9.2f}{shown_rest}",
        flush=True,
    )


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api.json")
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="a PostgreSQL server where the benchmark may create (and drop) a database",
    )
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
    )
    parser.add_argument(
        "--requests",
        type=int,
        nargs=2,
        default=[300, 40],
        metavar=("ONE_CLIENT", "PER_CLIENT_AT_32"),
        help="measured requests per client at 1 and at 32 clients",
    )
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured requests per client")
    parser.add_argument("--seed-threads", type=int, default=10_000)
    parser.add_argument("--context-iterations", type=int, default=200_000)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each backend, wait up to this long for the machine to idle",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="record the server with py-spy into PATH.<backend>.txt (collapsed stacks)",
    )
    args = parser.parse_args(argv)
    return Options(
        backends=("sqlite", "postgres") if args.backend == "both" else (args.backend,),
        out=args.out,
        postgres_url=args.postgres_url,
        redis_url=args.redis_url,
        clients=(1, 32),
        requests={1: args.requests[0], 32: args.requests[1]},
        warmup=args.warmup,
        seed_threads=args.seed_threads,
        context_iterations=args.context_iterations,
        profile=args.profile.resolve() if args.profile else None,
        quiet_wait=args.quiet_wait,
    )


async def run(options: Options) -> dict[str, object]:
    # SIGTERM cancels like Ctrl-C does, so the server is stopped and the database dropped.
    main_task = asyncio.current_task()
    if main_task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    context = bench_user_context(options.context_iterations)
    print(
        f"UserContext.create: {context['best_us']:.2f} µs per call (best of "
        f"{context['repeats']} x {context['iterations']:,}; target < 20 µs)"
    )
    backends: dict[str, object] = {}
    for backend in options.backends:
        quiet = await wait_for_quiet(options.quiet_wait) if options.quiet_wait > 0 else {}
        print(
            f"\n[{backend}]  (srv/cli cpu: CPU ms per request; other: cores busy with anything"
            f" else)\n{HEADER}",
            flush=True,
        )
        runner = run_sqlite if backend == "sqlite" else run_postgres
        backends[backend] = {**quiet, **await runner(options)}
    config = {k: v for k, v in asdict(options).items() if k not in ("out", "profile")}
    config["postgres_url"] = make_url(options.postgres_url).render_as_string(hide_password=True)
    config["requests"] = {str(k): v for k, v in options.requests.items()}
    return {
        "benchmark": "bench/api.py",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(omit_packages=("websockets",), host_details=False),
        "config": config,
        "user_context": context,
        "backends": backends,
    }


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    failures: list[BaseException] = []
    try:
        results = asyncio.run(run(options))
    except* BenchError as group:  # raised alone or from a TaskGroup of clients
        failures.extend(group.exceptions)
    except* asyncio.CancelledError:  # SIGTERM
        failures.append(BenchError("stopped by a signal"))
    if failures:
        return report_failures(failures)
    return write_results(options.out, results)


if __name__ == "__main__":
    sys.exit(main())
