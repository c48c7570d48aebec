"""Database deadlines: a connect timeout (a server that accepts and never answers fails fast,
naming the host) and a statement timeout (PostgreSQL cancels a statement that runs too long)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from threadline.settings import Settings
from threadline.store.db import DatabaseUnavailableError, check_reachable, create_engine

pytestmark = pytest.mark.integration


async def test_a_statement_over_the_statement_timeout_is_cancelled(postgres_url: str):
    url = Settings(database_url=postgres_url).database_url
    engine = create_engine(url, pool_size=1, statement_timeout_seconds=0.2)
    try:
        async with asyncio.timeout(30), engine.connect() as conn:
            assert (await conn.execute(sa.text("SELECT 1"))).scalar() == 1
            started = time.monotonic()
            with pytest.raises(DBAPIError, match="statement timeout"):
                await conn.execute(sa.text("SELECT pg_sleep(5)"))
            assert time.monotonic() - started < 4
    finally:
        await engine.dispose()


async def test_a_server_that_never_answers_fails_within_the_connect_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever replies
        port = silent.getsockname()[1]
        url = Settings(database_url=f"postgresql://u:secret@127.0.0.1:{port}/app").database_url
        engine = create_engine(url, pool_size=1, connect_timeout_seconds=0.5)
        started = time.monotonic()
        try:
            async with asyncio.timeout(30):
                with pytest.raises(DatabaseUnavailableError) as raised:
                    await check_reachable(engine, database_url=url, timeout_seconds=0.5)
        finally:
            await engine.dispose()
    assert time.monotonic() - started < 5
    assert raised.value.location == f"127.0.0.1:{port}/app"
    assert "no answer within 0.5 s" in raised.value.message
    assert "secret" not in raised.value.message
