"""Helpers shared by the benchmarks: a real `threadline serve` subprocess, throw-away backends,
registered users, percentiles and machine facts for the JSON results.

Used by `bench/api.py` and `bench/runs.py`; new benchmarks import these too.
Everything talks to loopback services only, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
# The installed `threadline` may be an editable install of another checkout (on the shared
# machine it pointed at a CI snapshot): benchmark this tree, in this process and the server's.
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
SECRET_KEY = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex
PASSWORD = "correct horse battery staple"
SERVER_START_TIMEOUT = 60.0
SERVER_STOP_TIMEOUT = 30.0
HTTP_TIMEOUT = 30.0
DEFAULT_POSTGRES_URL = os.environ.get(
    "THREADLINE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
DEFAULT_REDIS_URL = os.environ.get("THREADLINE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class BenchUser:
    id: str
    token: str
    thread_id: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass(frozen=True)
class Server:
    base_url: str
    pid: int
    log: Path
    profiled: bool = False
    """py-spy wraps the server: `pid` is py-spy's process, not the server's."""

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1) + "/v1/ws"


# --- Small helpers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_loopback(url: str, what: str) -> None:
    """The benchmarks only ever talk to services on this machine."""
    parts = urlsplit(url)
    if parts.scheme == "unix" or (parts.hostname is None and "host=/" in parts.query):
        return
    if parts.hostname not in LOOPBACK:
        raise BenchError(f"{what} must be on a loopback address, not {parts.hostname!r}")


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    index = max(0, math.ceil(pct / 100 * len(sorted_values)) - 1)
    return sorted_values[index]


def summarize(
    values: list[float], digits: int = 3, *, count_key: str = "count", suffix: str = ""
) -> dict[str, float | int | None]:
    """Count, p50, p90, p99, max and mean of `values` (milliseconds, say).

    The count's key is `count_key`; every other key ends with `suffix` (`"p50_ms"` for "_ms").
    """
    if not values:
        return {
            count_key: 0,
            f"p50{suffix}": None,
            f"p90{suffix}": None,
            f"p99{suffix}": None,
            f"max{suffix}": None,
            f"mean{suffix}": None,
        }
    ordered = sorted(values)
    return {
        count_key: len(ordered),
        f"p50{suffix}": round(percentile(ordered, 50), digits),
        f"p90{suffix}": round(percentile(ordered, 90), digits),
        f"p99{suffix}": round(percentile(ordered, 99), digits),
        f"max{suffix}": round(ordered[-1], digits),
        f"mean{suffix}": round(sum(ordered) / len(ordered), digits),
    }


def process_cpu_seconds(process: psutil.Process) -> float:
    """User plus system CPU seconds `process` has used so far."""
    times = process.cpu_times()
    return float(times.user + times.system)


def _machine_busy_seconds() -> float:
    """CPU seconds all of the machine's cores have spent busy so far, whoever used them: the
    server, the client, PostgreSQL, Redis and anything else (psutil, from /proc/stat)."""
    times = psutil.cpu_times()
    busy = times.user + times.nice + times.system
    return float(busy + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0))


SERVICE_PROCESSES = ("postgres", "redis-server")
"""The local services whose CPU `MachineMeter` reports, by process name."""


def _service_cpu_seconds() -> dict[int, tuple[str, float]]:
    """Each local PostgreSQL and Redis process's CPU seconds so far, by pid."""
    snapshot = {}
    for process in psutil.process_iter(["name"]):
        name = process.info["name"]
        if name in SERVICE_PROCESSES:
            with contextlib.suppress(psutil.Error):
                snapshot[process.pid] = (name, process_cpu_seconds(process))
    return snapshot


class MachineMeter:
    """The whole machine's CPU over a measured phase: every core's busy time, whoever used it,
    and of it the local PostgreSQL and Redis processes' share. Made just before the phase,
    `stop()`ped just after it.

    A service process that started during the phase counts from zero; one that exited during
    it is missed (PostgreSQL's pooled backends live through a level)."""

    def __init__(self) -> None:
        self._busy_s = _machine_busy_seconds()
        self._services = _service_cpu_seconds()

    def stop(self) -> None:
        self._busy_s = _machine_busy_seconds() - self._busy_s
        after = _service_cpu_seconds()
        self._service_s = dict.fromkeys(SERVICE_PROCESSES, 0.0)
        for pid, (name, seconds) in after.items():
            self._service_s[name] += seconds - self._services.get(pid, (name, 0.0))[1]

    def per_run(
        self, *, runs: int, wall_s: float, server_s: float, client_s: float
    ) -> dict[str, object]:
        """Per run: the machine's CPU, what of it was neither the server's nor the client's,
        and each service's; and the cores busy on average. With every core busy,
        `cores / machine_cpu_ms_per_run` bounds the runs per second the machine can do."""

        def ms(seconds: float) -> float:
            return round(seconds / runs * 1000, 3)

        return {
            "machine_cpu_ms_per_run": ms(self._busy_s),
            "rest_cpu_ms_per_run": ms(self._busy_s - server_s - client_s),
            "service_cpu_ms_per_run": {name: ms(s) for name, s in self._service_s.items()},
            "cores_busy": round(self._busy_s / wall_s, 2),
            "cores": psutil.cpu_count() or 1,
        }


def print_machine_cpu(result: dict[str, object]) -> None:
    services = result.get("service_cpu_ms_per_run") or {}
    shares = ", ".join(f"{name} {ms}" for name, ms in services.items())  # type: ignore[attr-defined]
    print(
        f"      machine CPU per run: {result['machine_cpu_ms_per_run']} ms, of which neither "
        f"server nor client {result['rest_cpu_ms_per_run']} ms ({shares or 'no local services'}); "
        f"cores busy {result['cores_busy']} of {result['cores']}",
        flush=True,
    )


def git_commit() -> str | None:
    """The checked-out commit, read from `.git` directly (no git process)."""
    git = ROOT / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().strip().removeprefix("gitdir: "))
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        common = (
            Path((git / "commondir").read_text().strip()) if (git / "commondir").is_file() else None
        )
        for base in (git, (git / common).resolve() if common else None):
            if base is not None and (base / ref).is_file():
                return (base / ref).read_text().strip()
        for base in (git, (git / common).resolve() if common else None):
            packed = base / "packed-refs" if base is not None else None
            if packed is not None and packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(f" {ref}"):
                        return line.split(" ", 1)[0]
    except OSError:
        return None
    return None


PACKAGES = (
    "threadline",
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "redis",
    "httpx",
    "websockets",
    "uvloop",
    "httptools",
)


def machine_info(
    extra_packages: tuple[str, ...] = (),
    *,
    omit_packages: tuple[str, ...] = (),
    host_details: bool = True,
) -> dict[str, object]:
    """The machine, Python, package versions and commit a result was measured with.

    Versions of `PACKAGES` and `extra_packages`, but not `omit_packages`; with `host_details`,
    also the processor, the load average at the start and the memory (when psutil is there).
    """
    versions: dict[str, str | None] = {}
    for package in (*PACKAGES, *extra_packages):
        if package in omit_packages:
            continue
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info: dict[str, object] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        **({"processor": platform.processor() or None} if host_details else {}),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "git_commit": git_commit(),
        "threadline_source": _threadline_source(),
        "packages": versions,
        "note": "client and server share this machine",
    }
    if not host_details:
        return info
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import psutil

        info["memory_total_mb"] = round(psutil.virtual_memory().total / 2**20)
    except ImportError:
        pass
    return info


def _threadline_source() -> str | None:
    try:
        import threadline
    except ImportError:
        return None
    return str(Path(threadline.__file__).resolve().parent)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def report_failures(failures: Sequence[BaseException], *, with_type: bool = False) -> int:
    """Print why the benchmark failed (`with_type`: each failure's class name too); returns 1."""
    for failure in failures:
        shown = f"{type(failure).__name__}: {failure}" if with_type else str(failure)
        print(f"benchmark failed: {shown}", file=sys.stderr)
    return 1


def write_results(out: Path, results: dict[str, object]) -> int:
    """Write the results to `out` as JSON; returns 0."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nWrote {out}")
    return 0


# --- The server process ---------------------------------------------------------------------------


def server_env(database_url: str, workdir: Path, extra: dict[str, str]) -> dict[str, str]:
    """The parent's environment minus any THREADLINE_* setting, plus the benchmark's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env.update(
        THREADLINE_ENVIRONMENT="production",
        THREADLINE_DATABASE_URL=database_url,
        THREADLINE_SECRET_KEY=SECRET_KEY,
        THREADLINE_MESSAGES_PER_MINUTE="1000000000",
        THREADLINE_LOG_LEVEL="WARNING",
        THREADLINE_DATA_DIR=str(workdir / "data"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
        **extra,
    )
    return env


_PY_SPY_RECORD = ("py-spy", "record", "--gil", "--rate", "200", "--format", "raw")


def py_spy_record(output: Path) -> list[str]:
    """The py-spy command that records into `output`; add `--pid N`, or `-- <command>`.
    Collapsed stacks: flamegraph.pl and speedscope read them, and so does `sort | uniq`.
    --gil: sample only the thread holding the GIL, i.e. where Python CPU time goes (the driver
    threads of aiosqlite otherwise dominate the samples while they wait)."""
    return [*_PY_SPY_RECORD, "--output", str(output)]


@contextmanager
def server_process(
    env: dict[str, str],
    workdir: Path,
    *,
    profile: Path | None = None,
    args: Sequence[str] = (),
) -> Iterator[Server]:
    """Start `threadline serve [args]` on a free loopback port, wait until ready, always stop it.

    The command is the server itself (no wrapper), so `Server.pid` is the process whose CPU time
    and memory a benchmark may read (with `--workers N`: the supervisor, whose children do the
    work; see `process_tree`). With `profile`, py-spy records the server into that file
    (collapsed stacks) and wraps it: then `Server.pid` is py-spy's and `Server.profiled` is set.
    """
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "threadline",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    if profile is not None:
        command = [*py_spy_record(profile), "--", *command]
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as one, never orphaned
        )
        server = Server(f"http://127.0.0.1:{port}", process.pid, log_path, profile is not None)
        failed = False
        try:
            wait_ready(server.base_url, process, log_path)
            yield server
        except BaseException:
            failed = True
            raise
        finally:
            stop(process)
            if failed:
                print(f"--- server log (tail) ---\n{tail(log_path)}", file=sys.stderr)


@contextmanager
def worker_process(
    env: dict[str, str], workdir: Path, *, args: Sequence[str] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `threadline worker [args]` (not waited for: runs queue until it claims them),
    always stop it (SIGINT, as `stop`); its log's tail is printed if it failed."""
    log_path = workdir / f"worker-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "threadline", "worker", *args],
            env=env,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop(process)
        if process.returncode not in (0, None):
            print(f"--- worker log (tail) ---\n{tail(log_path)}", file=sys.stderr)


def process_tree(pids: Sequence[int]) -> list[psutil.Process]:
    """The processes `pids` and all their descendants (a supervisor and its children)."""
    roots = [psutil.Process(pid) for pid in pids]
    return [p for root in roots for p in (root, *root.children(recursive=True))]


def connection_owner(processes: Sequence[psutil.Process], client_port: int) -> int | None:
    """The pid of the process holding the server end of the client's loopback connection."""
    for process in processes:
        for conn in process.net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == client_port:
                return process.pid
    return None


def wait_all_accepting(port: int, processes: Sequence[psutil.Process]) -> None:
    """Connect to `port` until every one of `processes` has accepted a connection: several
    processes accepting on one socket, each ready (a benchmark's sockets then spread over all)."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    waiting = {p.pid for p in processes}
    while waiting and time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            local = conn.getsockname()[1]
            while time.monotonic() < deadline:
                owner = connection_owner(processes, local)
                if owner is not None:
                    waiting.discard(owner)
                    break
                time.sleep(0.02)
    if waiting:
        raise BenchError(f"processes {sorted(waiting)} accepted no connection on port {port}")


def wait_ready(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    with httpx.Client(base_url=base_url, timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BenchError(f"the server exited ({process.returncode}):\n{tail(log)}")
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise BenchError(f"the server was not ready within {SERVER_START_TIMEOUT:.0f} s:\n{tail(log)}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT (uvicorn's graceful shutdown, and py-spy's cue to write its profile), then SIGKILL
    after `SERVER_STOP_TIMEOUT`."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=SERVER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def migrate(env: dict[str, str], workdir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "threadline", "migrate"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if done.returncode != 0:
        raise BenchError(f"threadline migrate failed:\n{done.stdout}\n{done.stderr}")


# --- Backends -------------------------------------------------------------------------------------


def _asyncpg_dsn(url: str) -> str:
    """asyncpg wants plain `postgresql://`; accept the SQLAlchemy spellings too."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.startswith("postgres"):
        raise BenchError(f"not a PostgreSQL URL: {url!r}")
    return f"postgresql://{rest}"


@asynccontextmanager
async def postgres_database(admin_url: str, *, label: str = "") -> AsyncIterator[str]:
    """A fresh database on the admin URL's server (created with asyncpg), dropped afterwards.
    Yields its `postgresql://` URL."""
    import asyncpg

    admin_dsn = _asyncpg_dsn(admin_url)
    name = f"threadline_bench_{label + '_' if label else ''}{uuid.uuid4().hex[:10]}"
    async with asyncio.timeout(30):
        conn = await asyncpg.connect(admin_dsn)
    try:
        async with asyncio.timeout(30):
            await conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{name}"))
        finally:
            async with asyncio.timeout(60):
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close(timeout=10)


async def postgres_version(url: str) -> str:
    import asyncpg

    async with asyncio.timeout(15):
        conn = await asyncpg.connect(_asyncpg_dsn(url))
        try:
            return str(await conn.fetchval("SELECT version()"))
        finally:
            await conn.close(timeout=5)


async def redis_version(redis_url: str) -> str:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        info = await redis.info("server")
        return str(info.get("redis_version"))
    finally:
        await redis.aclose()


async def delete_redis_prefix(redis_url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        async with asyncio.timeout(60):
            keys = [key async for key in redis.scan_iter(match=f"{prefix}:*", count=1000)]
            if keys:
                await redis.delete(*keys)
    finally:
        await redis.aclose()


# --- HTTP clients ---------------------------------------------------------------------------------


def expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise BenchError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}, expected {status}: {response.text[:300]}"
        )


async def register(http: httpx.AsyncClient, *, with_thread: bool) -> BenchUser:
    """A new user (two argon2 operations on the server), its token and maybe one thread."""
    email = f"bench-{uuid.uuid4().hex[:16]}@example.com"
    credentials = {"email": email, "password": PASSWORD}
    created = await http.post("/v1/auth/register", json=credentials)
    expect(created, 201)
    token = await http.post("/v1/auth/token", json=credentials)
    expect(token, 200)
    user = BenchUser(created.json()["id"], token.json()["access_token"])
    if not with_thread:
        return user
    return BenchUser(user.id, user.token, await create_thread(http, user))


async def create_thread(http: httpx.AsyncClient, user: BenchUser, title: str = "bench") -> str:
    thread = await http.post("/v1/threads", json={"title": title}, headers=user.headers)
    expect(thread, 201)
    return str(thread.json()["id"])


async def register_many(
    http: httpx.AsyncClient, count: int, *, with_thread: bool, at_once: int = 4
) -> list[BenchUser]:
    """`count` users, a few at a time: each costs two argon2 operations on the server."""
    users: list[BenchUser] = []
    while len(users) < count:
        batch = min(at_once, count - len(users))
        async with asyncio.TaskGroup() as group:
            made = [
                group.create_task(register(http, with_thread=with_thread)) for _ in range(batch)
            ]
        users.extend(task.result() for task in made)
    return users
