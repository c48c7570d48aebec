"""The peer's side of issue 11's comparison: bench/runs.py's workload against the best-known open
peer's dev server (LangGraph's `langgraph dev`, in memory, nothing durable), on this machine.

    /tmp/peer-venv/bin/python bench/peer/run.py --out /tmp/peer.json [--users 1,32] \
        [--runs-per-user N] [--warmup 2] [--jobs-per-worker N] [--allow-blocking]

Run it with the peer's own virtualenv (README.md here); it needs only the peer's packages,
httpx and psutil, never Threadline's. It starts `langgraph dev` on a free loopback port with
graph.py (a model mirroring Threadline's demo model: one calculator tool call, then the answer
streamed in three chunks), and always stops it.

The workload is bench/runs.py's: each simulated user has its own thread and posts "what is
12*7?", waiting for the run's completion on a live stream before posting the next. Here the
post and the stream are one request, the peer's `POST /threads/{id}/runs/stream` (SSE, stream
modes `updates` and `messages-tuple` by default: each step's output and every streamed token,
as Threadline's socket carries each event and every text delta). A run counts only if the
streamed tokens spell the answer, "84".

Measured per number of concurrent users, after a warm-up, as bench/runs.py does:
- runs per second: completed runs / wall time of the measured phase;
- from just before posting to (a) the response's headers (`post_ms`); (b) the first SSE event
  (`first_event_ms`, the peer's `metadata` event: the run was created); (c) the first event of
  the run's own output (`first_output_ms`, the model's first chunk; the nearest thing to
  Threadline's `agent_started`); (d) the end of the stream (`agent_completed_ms`, the run is
  done: the same key as bench/runs.py's, so the two JSON files compare key by key);
- server CPU (user + system, psutil) over the measured phase, per completed run, summed over
  the server process and any children; the client's own CPU beside it;
- the whole machine's CPU per run and the cores busy, as bench/runs.py reports them (the peer
  keeps everything in its own process, so almost nothing is left beside server and client);
- the machine's load average before and after each level.
Percentiles are bench/_support.py's (nearest rank), so both benchmarks compute them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

# bench/_support.py's helpers (percentiles, machine facts, stopping a process group) import
# only the standard library, httpx and psutil, so the peer's virtualenv can use them too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _support import (  # noqa: E402
    BenchError,
    MachineMeter,
    free_port,
    machine_info,
    print_machine_cpu,
    process_cpu_seconds,
    report_failures,
    stop,
    summarize,
    tail,
    write_results,
)

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "langgraph.json"
ASSISTANT = "agent"  # the graph's id in langgraph.json; the dev server makes it an assistant
QUESTION = "what is 12*7?"
ANSWER = "84"
RUN_TIMEOUT = 60.0  # one run, posting to the end of its stream
LEVEL_TIMEOUT = 600.0  # warm-up plus measured phase of one concurrency level
HTTP_TIMEOUT = 30.0
START_TIMEOUT = 90.0
PEER_PACKAGES = (
    "langgraph",
    "langgraph-api",
    "langgraph-cli",
    "langgraph-runtime-inmem",
    "langchain-core",
    "blockbuster",
    "starlette",
    "sse-starlette",
    "uvicorn",
    "uvloop",
    "orjson",
    "httpx",
    "psutil",
)
NOT_HERE = (
    "threadline",
    "fastapi",
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "redis",
    "websockets",
    "httptools",
)


@dataclass(frozen=True)
class Options:
    out: Path
    users: tuple[int, ...]
    runs_per_user: int | None
    warmup: int
    stream_mode: tuple[str, ...]
    jobs_per_worker: int | None
    allow_blocking: bool

    def runs_for(self, users: int) -> int:
        return self.runs_per_user or max(20, math.ceil(200 / users))  # as bench/runs.py


@dataclass(frozen=True, slots=True)
class RunSample:
    post_ms: float
    first_event_ms: float
    first_event_type: str
    first_output_ms: float | None
    completed_ms: float
    events: Counter[str]


# --- The peer's server ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerServer:
    base_url: str
    processes: list[psutil.Process]
    """The `langgraph dev` process (uvicorn runs in it without `--reload`) and any children."""


def write_config(workdir: Path) -> Path:
    """langgraph.json with its paths made absolute: the dev server resolves a graph's path
    against its working directory, which is `workdir`, so that what it writes stays there."""
    config = json.loads(CONFIG.read_text())
    config["dependencies"] = [str((HERE / d).resolve()) for d in config["dependencies"]]
    config["graphs"] = {name: str(HERE / spec) for name, spec in config["graphs"].items()}
    path = workdir / "langgraph.json"
    path.write_text(json.dumps(config))
    return path


def peer_command(options: Options, port: int, config: Path = CONFIG) -> list[str]:
    cli = Path(sys.executable).parent / "langgraph"
    if not cli.exists():
        raise BenchError(f"no {cli}: run this with the peer's virtualenv (bench/peer/README.md)")
    command = [
        str(cli),
        "dev",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-browser",
        "--no-reload",
        "--config",
        str(config),
    ]
    if options.jobs_per_worker is not None:
        command += ["--n-jobs-per-worker", str(options.jobs_per_worker)]
    if options.allow_blocking:
        command.append("--allow-blocking")
    return command


def peer_env() -> dict[str, str]:
    # WARNING, as bench/runs.py runs Threadline (THREADLINE_LOG_LEVEL): neither server pays for
    # a log line per run. No analytics and no tracing: nothing leaves the machine.
    return {
        **os.environ,
        "LOG_LEVEL": "WARNING",
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
        "LANGSMITH_TRACING": "false",
        "LANGCHAIN_TRACING_V2": "false",
    }


@contextlib.contextmanager
def peer_server(options: Options, workdir: Path) -> Iterator[PeerServer]:
    """Start `langgraph dev` in `workdir` (whatever it writes stays there), ready; always stop
    it (SIGINT to its process group, SIGKILL after a bounded wait)."""
    port = free_port()
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        command = peer_command(options, port, write_config(workdir))
        process = subprocess.Popen(
            command,
            env=peer_env(),
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as one, never orphaned
        )
        try:
            base_url = f"http://127.0.0.1:{port}"
            wait_ready(base_url, process, log_path)
            root = psutil.Process(process.pid)
            yield PeerServer(base_url, [root, *root.children(recursive=True)])
        except BaseException:
            print(f"--- peer server log (tail) ---\n{tail(log_path)}", file=sys.stderr)
            raise
        finally:
            stop(process)


def wait_ready(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(base_url=base_url, timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BenchError(f"the peer exited ({process.returncode}); its log's tail is above")
            with contextlib.suppress(httpx.TransportError):
                if client.get("/ok").status_code == 200:
                    return
            time.sleep(0.1)
    raise BenchError(f"the peer was not ready within {START_TIMEOUT:.0f} s:\n{tail(log)}")


# --- The client -----------------------------------------------------------------------------------


async def create_thread(http: httpx.AsyncClient) -> str:
    response = await http.post("/threads", json={})
    if response.status_code != 200:
        raise BenchError(f"POST /threads: {response.status_code} {response.text[:300]}")
    return str(response.json()["thread_id"])


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream; comments (heartbeats) are skipped."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield event, "\n".join(data)


def streamed_text(data: str) -> str:
    """The text of a `messages` event's chunk: only the model's chunks, not the tool's result
    (whose "84" would otherwise pass for the answer)."""
    chunk = json.loads(data)[0]
    if chunk.get("type") != "AIMessageChunk" or not isinstance(chunk.get("content"), str):
        return ""
    return str(chunk["content"])


async def one_run(http: httpx.AsyncClient, thread_id: str, options: Options) -> RunSample:
    """Post one message as a streamed run and read its stream to the end."""
    body = {
        "assistant_id": ASSISTANT,
        "stream_mode": list(options.stream_mode),
        "input": {"messages": [{"role": "user", "content": QUESTION}]},
    }
    events: Counter[str] = Counter()
    first: tuple[float, str] | None = None
    first_output: float | None = None
    text: list[str] = []
    async with asyncio.timeout(RUN_TIMEOUT):
        started = time.perf_counter()
        async with http.stream("POST", f"/threads/{thread_id}/runs/stream", json=body) as response:
            posted = time.perf_counter()
            if response.status_code != 200:
                await response.aread()
                raise BenchError(f"runs/stream: {response.status_code} {response.text[:300]}")
            async for event, data in sse_events(response):
                now = time.perf_counter()
                events[event] += 1
                first = first or (now, event)
                if event == "error":
                    raise BenchError(f"the run failed: {data[:300]}")
                if event != "metadata" and first_output is None:
                    first_output = now
                if event.startswith("messages"):
                    text.append(streamed_text(data))
        completed = time.perf_counter()
    if first is None or ANSWER not in "".join(text):
        raise BenchError(f"the run streamed no answer: {''.join(text)!r}, events {dict(events)}")
    return RunSample(
        post_ms=(posted - started) * 1000,
        first_event_ms=(first[0] - started) * 1000,
        first_event_type=first[1],
        first_output_ms=(first_output - started) * 1000 if first_output else None,
        completed_ms=(completed - started) * 1000,
        events=events,
    )


async def sequential_runs(
    http: httpx.AsyncClient, thread_id: str, count: int, options: Options
) -> list[RunSample]:
    return [await one_run(http, thread_id, options) for _ in range(count)]


# --- Levels ---------------------------------------------------------------------------------------


async def run_level(
    server: PeerServer, http: httpx.AsyncClient, users: int, options: Options
) -> dict[str, object]:
    runs = options.runs_for(users)
    threads = [await create_thread(http) for _ in range(users)]
    client = psutil.Process()
    async with asyncio.timeout(LEVEL_TIMEOUT):
        async with asyncio.TaskGroup() as group:
            for thread_id in threads:
                group.create_task(sequential_runs(http, thread_id, options.warmup, options))
        load_before = os.getloadavg()
        server_before = [process_cpu_seconds(p) for p in server.processes]
        client_before, machine = process_cpu_seconds(client), MachineMeter()
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(sequential_runs(http, thread_id, runs, options))
                for thread_id in threads
            ]
        wall = time.perf_counter() - started
        machine.stop()
        server_cpu = [
            process_cpu_seconds(p) - b for p, b in zip(server.processes, server_before, strict=True)
        ]
        client_cpu = process_cpu_seconds(client) - client_before
    samples = [sample for task in tasks for sample in task.result()]
    result = level_result(
        samples,
        users=users,
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
        f"{p.pid} {p.name()}": round(cpu / len(samples) * 1000, 3)
        for p, cpu in zip(server.processes, server_cpu, strict=True)
    }
    result["load_average_before"] = [round(x, 2) for x in load_before]
    return result


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
    events: Counter[str] = Counter()
    for sample in samples:
        events.update(sample.events)
    outputs = [s.first_output_ms for s in samples if s.first_output_ms is not None]
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
        "first_output_ms": summarize(outputs),
        "agent_completed_ms": summarize([s.completed_ms for s in samples]),
        "events_per_run": round(sum(events.values()) / len(samples), 2),
        "events_per_run_by_type": {k: round(n / len(samples), 2) for k, n in events.items()},
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


HEADER = (
    f"{'users':>5}{'runs':>6}{'runs/s':>8}{'srv CPU':>9}{'cli CPU':>9}  "
    f"{'headers p50/p99':<18}{'1st event':<18}{'1st output':<18}{'completed':<18}"
    f"{'load (1 min)'}\n{'':>19}{'ms/run':>9}{'ms/run':>9}  (all times in ms)"
)


def print_level(r: dict[str, object]) -> None:
    def p(key: str) -> str:
        s = r[key]
        return f"{s['p50']:>8.2f}/{s['p99']:<8.2f}"  # type: ignore[index]

    print(
        f"{r['users']:>5}{r['completed_runs']:>6}{r['runs_per_second']:>8.1f}"
        f"{r['server_cpu_ms_per_run']:>9.2f}{r['client_cpu_ms_per_run']:>9.2f}  {p('post_ms')}"
        f"{p('first_event_ms')}{p('first_output_ms')}{p('agent_completed_ms')}"
        f"  load {r['load_average_before'][0]}->"  # type: ignore[index]
        f"{r['load_average_after'][0]}",
        flush=True,
    )  # type: ignore[index]
    print_machine_cpu(r)


# --- Entry point ----------------------------------------------------------------------------------


async def run(options: Options) -> dict[str, object]:
    started = time.perf_counter()
    levels = []
    connections = max(options.users) + 8
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    with (
        tempfile.TemporaryDirectory(prefix="threadline-bench-peer-") as tmp,
        peer_server(options, Path(tmp)) as server,
    ):
        async with httpx.AsyncClient(
            base_url=server.base_url, timeout=HTTP_TIMEOUT, limits=limits, trust_env=False
        ) as http:
            print(f"\n[peer: langgraph dev] {' '.join(options.stream_mode)}\n{HEADER}", flush=True)
            for users in options.users:
                levels.append(await run_level(server, http, users, options))
                print_level(levels[-1])
    config = {k: v for k, v in asdict(options).items() if k != "out"}
    config["runs_per_user_by_level"] = {str(n): options.runs_for(n) for n in options.users}
    config["server_command"] = " ".join(peer_command(options, 0)[1:]).replace(" --port 0", "")
    return {
        "benchmark": "bench/peer/run.py",
        "peer": "LangGraph's dev server (langgraph dev: langgraph-api, in-memory runtime)",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": {
            **machine_info(PEER_PACKAGES, omit_packages=NOT_HERE),
            "client_event_loop": type(asyncio.get_running_loop()).__module__,
        },
        "config": config,
        "levels": levels,
    }


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE.parent / "results" / "peer.json")
    parser.add_argument("--users", default="1,32", help="concurrency levels, comma-separated")
    parser.add_argument(
        "--runs-per-user",
        type=int,
        default=None,
        help="measured runs per user (default: max(20, 200/users))",
    )
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured runs per user")
    parser.add_argument(
        "--stream-mode",
        default="updates,messages-tuple",
        help="the peer's stream modes, comma-separated",
    )
    parser.add_argument(
        "--jobs-per-worker",
        type=int,
        default=None,
        help="langgraph dev --n-jobs-per-worker (default: the dev server's own)",
    )
    parser.add_argument(
        "--allow-blocking",
        action="store_true",
        help="langgraph dev --allow-blocking: no blockbuster checks in the loop",
    )
    # Accepted for command lines shared with bench/runs.py; the peer has no idle-socket phase.
    parser.add_argument("--idle-sockets", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    users = tuple(sorted({int(n) for n in args.users.split(",") if n.strip()}))
    modes = tuple(m.strip() for m in args.stream_mode.split(",") if m.strip())
    if (
        not users
        or users[0] < 1
        or args.warmup < 0
        or not modes
        or (args.runs_per_user is not None and args.runs_per_user < 1)
        or (args.jobs_per_worker is not None and args.jobs_per_worker < 1)
    ):
        parser.error("--users, --runs-per-user, --warmup and --jobs-per-worker must be positive")
    return Options(
        out=args.out,
        users=users,
        runs_per_user=args.runs_per_user,
        warmup=args.warmup,
        stream_mode=modes,
        jobs_per_worker=args.jobs_per_worker,
        allow_blocking=args.allow_blocking,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    failures: list[BaseException] = []
    try:
        results = _run_loop(options)
    except* (BenchError, TimeoutError, OSError, httpx.HTTPError) as group:
        failures.extend(group.exceptions)
    if failures:
        return report_failures(failures, with_type=True)
    return write_results(options.out, results)


def _run_loop(options: Options) -> dict[str, object]:
    """uvloop when installed (it is, with the peer), as bench/runs.py's client uses it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run(options))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run(options))


if __name__ == "__main__":
    sys.exit(main())
