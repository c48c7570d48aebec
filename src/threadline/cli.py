"""The `threadline` command: serve, migrate."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
import uvicorn
from rich.console import Console

from threadline.errors import ThreadlineError
from threadline.logs import configure_logging
from threadline.runtime import check_agents
from threadline.settings import Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Threadline server and tools.")
console = Console(stderr=True)


def _settings(**overrides: object) -> Settings:
    try:
        settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
        check_agents(settings)
    except ThreadlineError as exc:
        console.print(f"[red]Configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc
    return settings


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind [THREADLINE_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [THREADLINE_PORT]")] = None,
    agents: Annotated[
        list[str] | None,
        typer.Option(help="Module whose agents to register (repeatable) [THREADLINE_AGENTS]"),
    ] = None,
) -> None:
    """Run the API server. With no configuration: SQLite file, in-process worker, demo agent."""
    from threadline.api.app import create_app

    settings = _settings(host=host, port=port, agents=agents or None)
    _check_schema(settings)
    configure_logging(settings.log_level)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level.lower(),
            proxy_headers=True,
            timeout_graceful_shutdown=30,
            # Events are small JSON; compression state costs ~40 KB per idle socket
            # (bench/runs.py measured 91 KB with it, 49 KB without).
            ws_per_message_deflate=False,
        )
    )
    shown_host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0") else settings.host
    console.print(f"Threadline on [bold]http://{shown_host}:{settings.port}[/bold]")
    console.print(f"Database: {_redacted(settings.database_url)}")
    server.run()


@app.command()
def worker(
    agents: Annotated[
        list[str] | None,
        typer.Option(help="Module whose agents to register (repeatable) [THREADLINE_AGENTS]"),
    ] = None,
) -> None:
    """Run agents from the queue, without serving HTTP (start API processes with
    THREADLINE_EMBEDDED_WORKER=false when workers run apart)."""
    from threadline.runs.standalone import run_worker

    settings = _settings(agents=agents or None, embedded_worker=True)
    _check_schema(settings)
    configure_logging(settings.log_level)
    console.print(f"Threadline worker on {_redacted(settings.database_url)}")
    asyncio.run(run_worker(settings))  # SIGINT and SIGTERM stop it gracefully


@app.command()
def migrate() -> None:
    """Apply database migrations (needed before `serve` on PostgreSQL)."""
    from threadline.store.db import create_engine
    from threadline.store.migrate import upgrade_to_head

    settings = _settings()

    async def run() -> None:
        engine = create_engine(settings.database_url)
        try:
            await upgrade_to_head(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
    console.print(f"Migrated {_redacted(settings.database_url)} to the latest schema.")


def _check_schema(settings: Settings) -> None:
    """On PostgreSQL, refuse to start on a database `threadline migrate` has not brought up to
    date (SQLite is migrated by the server itself)."""
    if settings.is_sqlite:
        return
    from threadline.store.db import create_engine
    from threadline.store.migrate import ensure_schema_current

    async def check() -> None:
        engine = create_engine(settings.database_url, pool_size=1)
        try:
            await ensure_schema_current(engine)
        finally:
            await engine.dispose()

    try:
        asyncio.run(check())
    except ThreadlineError as exc:
        console.print(f"[red]Configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc
    except Exception as exc:  # any driver error: show it in one line, not a traceback
        console.print(f"[red]Cannot reach the database:[/red] {type(exc).__name__}: {exc}")
        raise typer.Exit(2) from exc


def _redacted(url: str) -> str:
    """The URL without its password, for printing."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{location}"


def main() -> None:
    app()
