"""Shared fixtures: real databases and Redis, settings, an app client, and users.

Backends are a fixture parameter: `sqlite` is the embedded default (SQLite file, no Redis);
`postgres` is the scale-out set-up (PostgreSQL + Redis). API and store tests run on both.
Isolation: each test gets a fresh SQLite file (copied from a migrated template), or a
PostgreSQL database of this session truncated after the test, and its own Redis key prefix.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis

from tests import services as test_services
from threadline.api.app import create_app
from threadline.settings import Settings
from threadline.store.db import create_engine
from threadline.store.migrate import upgrade_to_head
from threadline.store.tables import metadata_obj

BACKENDS = ["sqlite", "postgres"]
TEST_SECRET = "test-secret-key-that-is-long-enough-0123456789"


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    with test_services.postgres_admin_url() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with test_services.redis_url() as url:
        yield url


async def _migrate(url: str) -> None:
    engine = create_engine(url)
    try:
        await upgrade_to_head(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A database of this session (one per xdist worker), migrated once."""
    name = test_services.unique_name("threadline_test")
    url = asyncio.run(test_services.create_database(postgres_admin_url, name))
    asyncio.run(_migrate(Settings(database_url=url).database_url))
    yield url
    asyncio.run(test_services.drop_database(postgres_admin_url, name))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    asyncio.run(_migrate(f"sqlite+aiosqlite:///{path}"))
    return path


async def _truncate(url: str) -> None:
    engine = create_engine(Settings(database_url=url).database_url)
    try:
        async with engine.begin() as conn:
            names = ", ".join(t.name for t in reversed(metadata_obj.sorted_tables))
            await conn.execute(sa.text(f"TRUNCATE {names} CASCADE"))
    finally:
        await engine.dispose()


async def _delete_prefix(url: str, prefix: str) -> None:
    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        path = tmp_path / "threadline.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    asyncio.run(_truncate(url))


@pytest.fixture
def redis_prefix(backend: str, request: pytest.FixtureRequest) -> Iterator[str]:
    prefix = f"tltest-{uuid.uuid4().hex[:10]}"
    yield prefix
    if backend == "postgres":
        asyncio.run(_delete_prefix(request.getfixturevalue("redis_url"), prefix))


@pytest.fixture
def settings_factory(
    backend: str,
    database_url: str,
    redis_prefix: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> Callable[..., Settings]:
    """Settings for this test's backend; keyword arguments override any field."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "environment": "test",
            "database_url": database_url,
            "secret_key": TEST_SECRET,
            "data_dir": tmp_path / "data",
            "redis_prefix": redis_prefix,
            # Minimal argon2 cost: a production hash takes ~0.15 s of CPU here, and every
            # registration and sign-in does one. Behaviour is the same; only the cost differs.
            "password_time_cost": 1,
            "password_memory_kib": 64,
        }
        if backend == "postgres":
            values["redis_url"] = request.getfixturevalue("redis_url")
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for an app running with its full lifespan (in-process ASGI)."""
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://threadline") as c:
            yield c


@dataclass(frozen=True)
class TestUser:
    __test__ = False  # not a test class, despite the name

    id: str
    email: str
    password: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def register_user(
    client: httpx.AsyncClient, *, email: str | None = None, password: str = "correct horse battery"
) -> TestUser:
    email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
    created = await client.post("/v1/auth/register", json={"email": email, "password": password})
    assert created.status_code == 201, created.text
    token = await client.post("/v1/auth/token", json={"email": email, "password": password})
    assert token.status_code == 200, token.text
    return TestUser(created.json()["id"], email, password, token.json()["access_token"])


@pytest.fixture
def make_user(client: httpx.AsyncClient) -> Callable[..., Awaitable[TestUser]]:
    async def make(**kwargs: object) -> TestUser:
        return await register_user(client, **kwargs)  # type: ignore[arg-type]

    return make
