"""The `threadline` command: serve, worker, migrate.

Every failure a user can fix (a bad setting, a database that cannot be reached or is not
migrated, a port in use) ends in one unwrapped line on stderr and exit status 2, before the
server creates anything; never in a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

import click
import typer
import uvicorn
from pydantic import SecretStr
from sqlalchemy.exc import DBAPIError

from threadline import heap
from threadline.cli_admin import admin
from threadline.errors import ThreadlineError
from threadline.logs import configure_logging
from threadline.runtime import check_agents
from threadline.settings import Settings, load_settings, unknown_variables

# Plain click help: rich's panels print a `<bool>` type beside every flag and wrap long lines.
app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    help="Threadline server and tools.",
)
_DEFAULTS = Settings.model_fields
_GRACEFUL_SHUTDOWN_SECONDS = 30  # uvicorn's bound on open connections at shutdown
app.add_typer(admin, name="admin")


def _help(text: str, name: str) -> str:
    """`text` with the option's default: the variable, else the setting's own default (the
    option itself defaults to None so that the variable and the TOML file still apply)."""
    variable = f"THREADLINE_{name.upper()}"
    return f"{text}  [default: {variable}, else {_DEFAULTS[name].default}]"


def _say(message: str) -> None:
    """One line on stderr, never wrapped (a terminal wraps it at its own width)."""
    click.echo(message, err=True)


def _fail(title: str, exc: BaseException | str) -> typer.Exit:
    _say(f"{click.style(title + ':', fg='red')} {exc}")
    return typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        click.echo(f"threadline {package_version('threadline')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Threadline server and tools."""


AgentsOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="MODULE",
        help="Module whose agents to register, e.g. mypkg.agents (repeatable).  "
        "[default: THREADLINE_AGENTS, else none]",
    ),
]
AppDirOption = Annotated[
    Path,
    typer.Option(
        metavar="DIR",
        help="Directory put first on the import path, so that --agents finds modules there "
        "(like uvicorn's --app-dir).",
    ),
]


def _settings(*, app_dir: Path | None = None, **overrides: object) -> Settings:
    if app_dir is not None:
        # What `python -m` does for the working directory: `threadline serve --agents
        # mypkg.agents`, run from the folder that holds mypkg, imports it.
        sys.path.insert(0, str(app_dir.resolve()))
    for warning in unknown_variables():
        _say(f"{click.style('Warning:', fg='yellow')} {warning}")
    try:
        settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
        check_agents(settings)
    except ThreadlineError as exc:
        raise _fail("Configuration error", exc) from exc
    return settings


WorkersOption = Annotated[
    int | None,
    typer.Option(
        metavar="N",
        help=_help(
            "API processes to run on this one port, each with its embedded worker unless "
            "THREADLINE_EMBEDDED_WORKER=false; more than 1 needs PostgreSQL and Redis.",
            "workers",
        ),
    ),
]


@app.command()
def serve(
    host: Annotated[
        str | None,
        typer.Option(metavar="HOST", help=_help("Interface to bind.", "host")),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(metavar="PORT", help=_help("Port to listen on (0: any free one).", "port")),
    ] = None,
    agents: AgentsOption = None,
    app_dir: AppDirOption = Path("."),
    workers: WorkersOption = None,
) -> None:
    """Run the API server. With no configuration: SQLite file, in-process worker, demo agent."""
    settings = _settings(
        app_dir=app_dir, host=host, port=port, agents=agents or None, workers=workers
    )
    # Before anything is created (database, secret key) or printed: a second server on the
    # same port fails here, in one line.
    listener = _bind(settings.host, settings.port)
    _check_database(settings)
    if settings.workers > 1:
        settings = _prepare_processes(settings)
    configure_logging(settings.log_level, json_lines=settings.log_json)
    bound_port = listener.getsockname()[1]
    shown_host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0") else settings.host
    processes = f" ({settings.workers} API processes)" if settings.workers > 1 else ""
    _announce(settings, f"Threadline on http://{shown_host}:{bound_port}{processes}")
    _announce(settings, f"Database: {_redacted(settings.database_url)}")
    if settings.workers == 1:
        _serve_in_process(settings, listener)
        return
    _supervise(settings, "API process", settings.workers, _serve_child, listener=listener)


def _serve_in_process(settings: Settings, listener: socket.socket) -> None:
    from threadline.api.app import create_app

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            log_config=None,  # configure_logging formats uvicorn's lines like ours
            log_level=settings.log_level.lower(),
            proxy_headers=True,
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
            # Events are small JSON; compression state costs ~40 KB per idle socket
            # (bench/runs.py measured 91 KB with it, 49 KB without).
            ws_per_message_deflate=False,
        )
    )
    heap.settle()
    server.run(sockets=[listener])


def _serve_child(settings: Settings, listener: socket.socket) -> None:
    """One of `serve --workers N`'s processes: the same server, on the shared socket."""
    configure_logging(settings.log_level, json_lines=settings.log_json)
    _serve_in_process(settings, listener)


def _prepare_processes(settings: Settings) -> Settings:
    """What several processes must share, settled once before they start: Redis answers, and
    one token-signing key (in development each process would otherwise make its own)."""
    from threadline.runtime import check_redis, resolve_secret

    try:
        asyncio.run(check_redis(settings))
    except ThreadlineError as exc:
        raise _fail("Configuration error", exc) from exc
    if settings.secret_key is not None:
        return settings
    return settings.model_copy(update={"secret_key": SecretStr(resolve_secret(settings))})


def _supervise(
    settings: Settings,
    name: str,
    count: int,
    target: Callable[..., object],
    *,
    listener: socket.socket | None = None,
) -> None:
    """Run `count` processes of `target(settings[, listener])` until a signal or a failure.
    Exits 1 after a failure; after a stop signal, re-raises it for an API server (as uvicorn
    does for a lone one) and returns for workers (a lone worker exits 0)."""
    from threadline.supervisor import Supervisor

    supervisor = Supervisor(
        name=name,
        count=count,
        target=target,
        args=(settings,),
        sockets=[listener] if listener is not None else [],
        # Past every child's own bounds (the runs' grace, then uvicorn's): only a stuck child
        # is killed.
        stop_timeout_seconds=settings.shutdown_grace_seconds + _GRACEFUL_SHUTDOWN_SECONDS + 10,
        report=lambda line: _announce(settings, line),
    )
    outcome = supervisor.run()
    if outcome.failed:
        raise typer.Exit(1)
    if outcome.signal is not None and listener is not None:
        signal.raise_signal(outcome.signal)


def _announce(settings: Settings, line: str) -> None:
    """A start-up line: plain for a person at a terminal, a log record when logs are JSON (so
    that every line a log collector reads is JSON)."""
    if settings.log_json:
        logging.getLogger("threadline.cli").info("%s", line)
    else:
        _say(line)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a port in use is found before anything else."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn does: a restart may reuse a port whose old connections are in TIME_WAIT (a
    # port another process listens on still fails to bind).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "is already in use" if exc.errno == 98 else f"cannot be bound ({exc.strerror})"
        raise _fail(
            "Cannot listen",
            f"{host}:{port} {reason}; choose another with --port or THREADLINE_PORT",
        ) from exc
    sock.set_inheritable(True)
    return sock


@app.command()
def worker(
    agents: AgentsOption = None,
    app_dir: AppDirOption = Path("."),
    processes: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help=_help(
                "Worker processes to run; more than 1 needs PostgreSQL and Redis.",
                "worker_processes",
            ),
        ),
    ] = None,
) -> None:
    """Run agents from the queue, without serving HTTP (start API processes with
    THREADLINE_EMBEDDED_WORKER=false when workers run apart)."""
    settings = _settings(
        app_dir=app_dir, agents=agents or None, embedded_worker=True, worker_processes=processes
    )
    _check_database(settings)
    if settings.worker_processes > 1:
        settings = _prepare_processes(settings)
    configure_logging(settings.log_level, json_lines=settings.log_json)
    if settings.worker_processes == 1:
        _work_in_process(settings)
        return
    _supervise(settings, "Worker process", settings.worker_processes, _work_child)


def _work_in_process(settings: Settings) -> None:
    from threadline.runs.standalone import run_worker

    def ready(worker_id: str) -> None:  # announced once it works, so a failure is one line
        _announce(settings, f"Threadline worker {worker_id} on {_redacted(settings.database_url)}")

    heap.settle()
    try:
        asyncio.run(run_worker(settings, on_ready=ready))  # SIGINT and SIGTERM stop it gracefully
    except (ThreadlineError, OSError, DBAPIError) as exc:  # Redis or PostgreSQL unreachable
        raise _fail("Worker cannot start", " ".join(str(exc).split())) from exc


def _work_child(settings: Settings) -> None:
    """One of `worker --processes N`'s processes."""
    configure_logging(settings.log_level, json_lines=settings.log_json)
    try:
        _work_in_process(settings)
    except typer.Exit as exc:  # no click here to turn it into the exit status
        sys.exit(exc.exit_code)


@app.command()
def migrate() -> None:
    """Apply database migrations (needed before `serve` on PostgreSQL)."""
    from threadline.store.migrate import upgrade_to_head

    settings = _settings()
    _with_database(settings, upgrade_to_head)
    _say(f"Migrated {_redacted(settings.database_url)} to the latest schema.")


def _check_database(settings: Settings) -> None:
    """On PostgreSQL, refuse to start on a database that cannot be reached or that `threadline
    migrate` has not brought up to date (SQLite is migrated by the server itself)."""
    if settings.is_sqlite:
        return
    from threadline.store.migrate import ensure_schema_current

    _with_database(settings, ensure_schema_current)


def _with_database(settings: Settings, action: Callable[..., Awaitable[None]]) -> None:
    """Check the database answers within the connect timeout, then run `action(engine)`; any
    failure is one line."""
    from threadline.store.db import (
        DatabaseUnavailableError,
        check_reachable,
        create_engine,
        unavailable,
    )

    timeout = settings.database_connect_timeout_seconds

    async def run() -> None:
        engine = create_engine(settings.database_url, pool_size=1, connect_timeout_seconds=timeout)
        try:
            await check_reachable(
                engine, database_url=settings.database_url, timeout_seconds=timeout
            )
            await action(engine)
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
    except DatabaseUnavailableError as exc:
        raise _fail("Database error", exc) from exc
    except ThreadlineError as exc:
        raise _fail("Configuration error", exc) from exc
    except Exception as exc:  # any other driver error: one line, not a traceback
        error = unavailable(exc, database_url=settings.database_url, timeout_seconds=timeout)
        raise _fail("Database error", error) from exc


def _redacted(url: str) -> str:
    """The URL without its password, for printing."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{location}"


@app.command()
def chat(
    url: Annotated[str, typer.Argument(help="The server")] = "http://localhost:8000",
    email: Annotated[str | None, typer.Option(help="Sign in as (asked if not given)")] = None,
    password: Annotated[str | None, typer.Option(help="Password (asked if not given)")] = None,
    token: Annotated[str | None, typer.Option(help="A bearer token instead of a password")] = None,
    agent: Annotated[str | None, typer.Option(help="Agent to talk to")] = None,
    thread: Annotated[str | None, typer.Option(help="Open this thread id")] = None,
) -> None:
    """Chat with an agent in the terminal, its steps shown live (Ctrl-C cancels a run)."""
    from threadline.chat import run_chat

    code = run_chat(url, email=email, password=password, token=token, agent=agent, thread_id=thread)
    raise typer.Exit(code)


def main() -> None:
    app()
