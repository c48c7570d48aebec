"""Helpers for the API tests: app clients with custom settings, error-body checks, shortcuts."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import sqlalchemy as sa
from asgi_lifespan import LifespanManager
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.conftest import TestUser
from threadline.api.app import create_app
from threadline.settings import Settings
from threadline.store.sqlite import sync_engines


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client for a new app instance (its own lifespan, engine and Redis connection).

    Unhandled errors come back as the 500 response a real server sends, not as an exception
    raised into the test, so a test can assert "never a 5xx" and show the body.
    """
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://threadline") as c:
            yield c


@contextmanager
def recorded_transactions(engine: AsyncEngine) -> Iterator[list[list[str]]]:
    """Every transaction begun on `engine` meanwhile (also one that then rolls back), as the
    list of its statements, whitespace collapsed. Recorded with the engine's own events
    (`begin`, `before_cursor_execute`), per connection, on SQLite on the writer's and the
    readers' pools; SQLite's BEGIN, sent as a statement, is the transaction, not one of them."""
    seen: list[list[str]] = []
    current: dict[int, list[str]] = {}

    def on_begin(conn: Any) -> None:
        current[id(conn)] = statements = []
        seen.append(statements)

    def on_statement(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        text = " ".join(statement.split())
        if text.upper() not in ("BEGIN", "BEGIN IMMEDIATE") and id(conn) in current:
            current[id(conn)].append(text)

    engines = sync_engines(engine)
    for sync_engine in engines:
        event.listen(sync_engine, "begin", on_begin)
        event.listen(sync_engine, "before_cursor_execute", on_statement)
    try:
        yield seen
    finally:
        for sync_engine in engines:
            event.remove(sync_engine, "begin", on_begin)
            event.remove(sync_engine, "before_cursor_execute", on_statement)


def error_code(response: httpx.Response) -> str:
    """The `code` of an error response, after checking the body is exactly the error shape."""
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message"}, body
    assert isinstance(error["code"], str) and error["code"], body
    assert isinstance(error["message"], str) and error["message"], body
    return error["code"]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert error_code(response) == code, response.text


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


async def create_thread(client: httpx.AsyncClient, user: TestUser, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/threads", json=body, headers=user.headers)
    assert response.status_code == 201, response.text
    thread: dict[str, Any] = response.json()
    return thread


async def post_message(
    client: httpx.AsyncClient, user: TestUser, thread_id: str, content: str, **extra: Any
) -> dict[str, Any]:
    response = await client.post(
        f"/v1/threads/{thread_id}/messages",
        json={"content": content, **extra},
        headers=user.headers,
    )
    assert response.status_code == 201, response.text
    message: dict[str, Any] = response.json()
    return message


async def get_thread(client: httpx.AsyncClient, user: TestUser, thread_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/threads/{thread_id}", headers=user.headers)
    assert response.status_code == 200, response.text
    thread: dict[str, Any] = response.json()
    return thread


async def all_messages(
    client: httpx.AsyncClient, user: TestUser, thread_id: str, **params: Any
) -> list[dict[str, Any]]:
    """Every message of a thread, following cursors."""
    collected: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(
            f"/v1/threads/{thread_id}/messages", params=query, headers=user.headers
        )
        assert response.status_code == 200, response.text
        page = response.json()
        collected.extend(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            return collected
    raise AssertionError("message pagination did not end")


async def list_threads(
    client: httpx.AsyncClient, user: TestUser, **params: Any
) -> list[dict[str, Any]]:
    """Every thread of a list query, following cursors."""
    collected: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get("/v1/threads", params=query, headers=user.headers)
        assert response.status_code == 200, response.text
        page = response.json()
        collected.extend(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            return collected
    raise AssertionError("thread pagination did not end")


async def count_rows(database_url: str, table: str, **where: str) -> int:
    """Rows in `table` matching `where`, read straight from the database (not through the API)."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            conditions = " AND ".join(f"{column} = :{column}" for column in where) or "1 = 1"
            query = sa.text(f"SELECT COUNT(*) FROM {table} WHERE {conditions}")
            return int((await conn.execute(query, where)).scalar_one())
    finally:
        await engine.dispose()
