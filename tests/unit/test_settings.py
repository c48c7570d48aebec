"""Settings: database URL normalization, sources (env over TOML file over defaults), refusals."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from threadline.errors import ConfigurationError
from threadline.settings import (
    Settings,
    known_variables,
    load_settings,
    normalize_database_url,
    unknown_variables,
)
from threadline.store.db import create_engine, read_transaction

pytestmark = pytest.mark.unit

STRONG_SECRET = "k3y-" + "a1B2c3D4e5F6g7H8i9J0" * 2


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings read the process environment and resolve SQLite paths against the working
    directory; keep the developer's shell (a THREADLINE_* export, an OPENAI_API_KEY) and the
    checkout out of every test here."""
    for name in list(os.environ):
        if name.startswith("THREADLINE_") or name.startswith(("OPENAI_", "ANTHROPIC_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# --- PostgreSQL URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme", ["postgres", "postgresql", "postgresql+psycopg", "postgresql+asyncpg", "POSTGRES"]
)
def test_every_postgres_spelling_becomes_asyncpg(scheme: str) -> None:
    url = normalize_database_url(f"{scheme}://ada:s3cret@db.internal:6543/threadline")

    assert url == "postgresql+asyncpg://ada:s3cret@db.internal:6543/threadline"


def test_postgres_credentials_host_port_and_database_survive() -> None:
    # A password with "@", "/", ":" and "%" must be URL-escaped in the URL and stay so.
    url = normalize_database_url("postgres://ada:p%40ss%2Fw%3Ard%25@db.internal:6543/app_db")

    parsed = make_url(url)
    assert parsed.drivername == "postgresql+asyncpg"
    assert parsed.username == "ada"
    assert parsed.password == "p@ss/w:rd%"
    assert parsed.host == "db.internal"
    assert parsed.port == 6543
    assert parsed.database == "app_db"


def test_escaped_password_reaches_the_driver_unescaped() -> None:
    url = make_url(normalize_database_url("postgresql://ada:p%40ss%2Fw@localhost/app"))
    _, kwargs = create_async_engine(url).dialect.create_connect_args(url)

    assert kwargs["password"] == "p@ss/w"
    assert kwargs["user"] == "ada"


@pytest.mark.parametrize("mode", ["require", "verify-full", "disable"])
def test_sslmode_becomes_asyncpg_ssl_and_other_parameters_stay(mode: str) -> None:
    url = normalize_database_url(
        f"postgresql://ada@db/app?application_name=threadline&sslmode={mode}&connect_timeout=5"
    )

    query = make_url(url).query
    assert query == {"application_name": "threadline", "ssl": mode, "connect_timeout": "5"}
    assert "sslmode" not in url


def test_an_unknown_sslmode_is_refused() -> None:
    with pytest.raises(ConfigurationError) as caught:
        normalize_database_url("postgresql://ada@db/app?sslmode=sometimes")

    assert caught.value.setting == "THREADLINE_DATABASE_URL"
    assert "sometimes" in str(caught.value)


def test_cloud_sql_unix_socket_is_kept() -> None:
    url = normalize_database_url("postgresql://ada:pw@/app?host=/cloudsql/proj:region:inst")

    assert url == "postgresql+asyncpg://ada:pw@/app?host=/cloudsql/proj:region:inst"


def test_cloud_sql_socket_reaches_asyncpg_as_the_host() -> None:
    """SQLAlchemy must hand asyncpg the socket directory as `host` (no connection is made)."""
    url = make_url(
        normalize_database_url("postgresql://ada:pw@/app?host=/cloudsql/proj:region:inst")
    )
    engine = create_async_engine(url)

    _, kwargs = engine.dialect.create_connect_args(url)

    assert kwargs["host"] == "/cloudsql/proj:region:inst"
    assert kwargs["database"] == "app"
    assert kwargs["user"] == "ada"
    assert kwargs["password"] == "pw"


# --- SQLite URLs -------------------------------------------------------------------------------


def test_relative_sqlite_path_is_made_absolute_under_the_working_directory(
    tmp_path: Path,
) -> None:
    url = normalize_database_url("sqlite:///data/t.db")

    expected = (tmp_path / "data" / "t.db").resolve()
    assert url == f"sqlite+aiosqlite:///{expected}"
    assert Path(make_url(url).database or "") == expected


def test_absolute_sqlite_path_is_kept() -> None:
    assert normalize_database_url("sqlite:////var/x.db") == "sqlite+aiosqlite:////var/x.db"


def test_sqlite_aiosqlite_scheme_and_query_are_accepted(tmp_path: Path) -> None:
    url = normalize_database_url("sqlite+aiosqlite:///t.db?timeout=3")

    assert url == f"sqlite+aiosqlite:///{(tmp_path / 't.db').resolve()}?timeout=3"


# --- Refused URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("db.internal/app", id="no-scheme"),
        pytest.param("mysql://ada@db/app", id="mysql"),
        pytest.param("sqlite://:memory:", id="sqlite-memory-no-slash"),
        pytest.param("sqlite:///:memory:", id="sqlite-memory"),
        pytest.param("sqlite://", id="sqlite-no-path"),
        pytest.param("postgresql://", id="postgres-nothing"),
        pytest.param("postgresql://ada@db:99999/app", id="port-out-of-range"),
        pytest.param("postgresql://ada@db:fivefour/app", id="port-not-a-number"),
    ],
)
def test_unusable_database_urls_name_the_setting(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        normalize_database_url(url)

    assert caught.value.setting == "THREADLINE_DATABASE_URL"
    assert str(caught.value).startswith("THREADLINE_DATABASE_URL:")


@pytest.mark.parametrize("url", ["sqlite:////", "sqlite:////tmp/"])
def test_a_sqlite_url_naming_a_directory_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="THREADLINE_DATABASE_URL"):
        normalize_database_url(url)


def test_a_bad_database_url_in_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("THREADLINE_DATABASE_URL", "mysql://ada@db/app")

    with pytest.raises(ConfigurationError, match="THREADLINE_DATABASE_URL"):
        load_settings()


# --- Sources -----------------------------------------------------------------------------------


def test_defaults_with_an_empty_environment(tmp_path: Path) -> None:
    settings = Settings()

    assert settings.environment == "development"
    assert settings.port == 8000
    assert settings.cors_origins == []
    assert settings.openai_api_key is None
    assert settings.database_url == f"sqlite+aiosqlite:///{(tmp_path / 'threadline.db').resolve()}"
    assert settings.is_sqlite


def test_settings_come_from_threadline_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_PORT", "9123")
    monkeypatch.setenv("THREADLINE_CORS_ORIGINS", "https://a.example,http://b.example:3000")
    monkeypatch.setenv("THREADLINE_DATABASE_URL", "postgres://ada@db/app?sslmode=require")

    settings = Settings()

    assert settings.port == 9123
    assert settings.cors_origins == ["https://a.example", "http://b.example:3000"]
    assert settings.database_url == "postgresql+asyncpg://ada@db/app?ssl=require"
    assert not settings.is_sqlite


def test_cors_origins_ignore_blanks_around_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_CORS_ORIGINS", " https://a.example , https://b.example, ")

    assert Settings().cors_origins == ["https://a.example", "https://b.example"]


def test_provider_keys_keep_their_vendor_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-vendor-name")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-vendor-name")

    settings = Settings()

    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "sk-from-vendor-name"
    assert settings.anthropic_api_key is not None
    assert settings.anthropic_api_key.get_secret_value() == "sk-ant-from-vendor-name"
    assert "sk-from-vendor-name" not in repr(settings)


def test_the_threadline_prefixed_key_is_accepted_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_OPENAI_API_KEY", "sk-prefixed")

    key = Settings().openai_api_key
    assert key is not None and key.get_secret_value() == "sk-prefixed"


def _write_config(path: Path) -> Path:
    path.write_text(
        'port = 7001\nlog_level = "DEBUG"\ncors_origins = ["https://file.example"]\n'
        'database_url = "sqlite:///from-file.db"\n'
    )
    return path


def test_settings_come_from_the_toml_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("THREADLINE_CONFIG_FILE", str(_write_config(tmp_path / "threadline.toml")))

    settings = Settings()

    assert settings.port == 7001
    assert settings.log_level == "DEBUG"
    assert settings.cors_origins == ["https://file.example"]
    assert settings.database_url == f"sqlite+aiosqlite:///{(tmp_path / 'from-file.db').resolve()}"


def test_environment_beats_the_toml_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("THREADLINE_CONFIG_FILE", str(_write_config(tmp_path / "threadline.toml")))
    monkeypatch.setenv("THREADLINE_PORT", "9002")
    monkeypatch.setenv("THREADLINE_CORS_ORIGINS", "https://env.example")

    settings = Settings()

    assert settings.port == 9002
    assert settings.cors_origins == ["https://env.example"]
    assert settings.log_level == "DEBUG"  # not in the environment: the file still applies


def test_arguments_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_PORT", "9002")

    assert Settings(port=9003).port == 9003


def test_a_missing_config_file_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("THREADLINE_CONFIG_FILE", str(tmp_path / "nowhere.toml"))

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert caught.value.setting == "THREADLINE_CONFIG_FILE"
    assert "nowhere.toml" in str(caught.value)


def test_settings_are_frozen() -> None:
    settings = Settings()

    with pytest.raises(ValidationError, match="frozen"):
        settings.port = 1  # type: ignore[misc]
    assert settings.port == 8000


# --- Refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param(None, id="missing"),
        pytest.param("changethis", id="placeholder"),
        pytest.param("CHANGEME", id="placeholder-uppercase"),
        pytest.param(" " * 40, id="blank"),
        pytest.param("x" * 31, id="one-short"),
    ],
)
def test_production_refuses_a_weak_secret_key(secret: str | None) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings(environment="production", secret_key=secret)  # type: ignore[arg-type]

    assert caught.value.setting == "THREADLINE_SECRET_KEY"


def test_production_refusal_also_applies_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("THREADLINE_ENVIRONMENT", "production")
    monkeypatch.setenv("THREADLINE_SECRET_KEY", "secret")

    with pytest.raises(ConfigurationError, match="THREADLINE_SECRET_KEY"):
        load_settings()


def test_production_accepts_a_long_random_secret_key() -> None:
    settings = Settings(environment="production", secret_key=STRONG_SECRET)  # type: ignore[arg-type]

    assert settings.secret_key is not None
    assert settings.secret_key.get_secret_value() == STRONG_SECRET


@pytest.mark.parametrize("environment", ["development", "test"])
def test_outside_production_no_secret_key_is_needed(environment: str) -> None:
    assert Settings(environment=environment).secret_key is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("THREADLINE_PORT", "abc"),
        ("THREADLINE_PORT", "70000"),
        ("THREADLINE_ENVIRONMENT", "staging"),
        ("THREADLINE_MESSAGES_PER_MINUTE", "0"),
    ],
)
def test_load_settings_names_the_variable_of_a_validation_error(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert caught.value.setting == variable
    assert str(caught.value).startswith(f"{variable}:")
    assert isinstance(caught.value.__cause__, ValidationError)


def test_load_settings_applies_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_PORT", "9002")

    assert load_settings(port=9004).port == 9004


# --- The SQLite engine built from a normalized URL ---------------------------------------------


async def test_a_sqlite_read_transaction_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    engine = create_engine(normalize_database_url(f"sqlite:///{tmp_path / 'locks.db'}"))
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("CREATE TABLE notes (body TEXT)"))
        writing, read_done = asyncio.Event(), asyncio.Event()

        async def writer() -> None:
            # Holds its write transaction open until the read is over: a read that waited for
            # the writer would never finish, and this times out.
            async with engine.begin() as conn:
                await conn.execute(sa.text("INSERT INTO notes VALUES ('draft')"))
                writing.set()
                try:
                    async with asyncio.timeout(10):
                        await read_done.wait()
                except TimeoutError:
                    pytest.fail("a read transaction waited for the writer's transaction")

        async def read_while_writing() -> int:
            await writing.wait()
            async with read_transaction(engine) as conn:
                count = await conn.scalar(sa.text("SELECT count(*) FROM notes"))
            read_done.set()
            return int(count)

        async with asyncio.timeout(30), asyncio.TaskGroup() as group:
            group.create_task(writer())
            read = group.create_task(read_while_writing())
        assert read.result() == 0  # the read saw the state before the uncommitted insert
    finally:
        await engine.dispose()


@pytest.mark.parametrize("level", ["verbose", "", "INFOO", "10"])
def test_an_unknown_log_level_is_a_configuration_error(level: str) -> None:
    with pytest.raises(ConfigurationError, match="THREADLINE_LOG_LEVEL"):
        load_settings(log_level=level)


def test_log_levels_are_case_insensitive() -> None:
    assert load_settings(log_level="debug").log_level == "DEBUG"


@pytest.mark.parametrize(
    "origin",
    [
        "nonsense",
        "localhost:3000",
        "https://a.example/",
        "https://a.example/app",
        "ftp://a.example",
        "http://",
        "https://a.example:99999",
        "https://user:pw@a.example",
    ],
)
def test_a_nonsense_cors_origin_is_refused(origin: str) -> None:
    with pytest.raises(ConfigurationError, match="THREADLINE_CORS_ORIGINS"):
        load_settings(cors_origins=origin)


@pytest.mark.parametrize("origin", ["*", "https://a.example", "http://localhost:3000"])
def test_real_cors_origins_are_accepted(origin: str) -> None:
    assert load_settings(cors_origins=origin).cors_origins == [origin]


def test_unknown_threadline_variables_are_named_with_the_closest_real_one() -> None:
    warnings = unknown_variables(
        {
            "THREADLINE_PORTT": "1",
            "THREADLINE_LOGLEVEL": "debug",
            "THREADLINE_ZZZ": "1",
            "THREADLINE_PORT": "8000",  # real
            "THREADLINE_TEST_DATABASE_URL": "postgresql://x/y",  # the test suite's
            "OPENAI_API_KEY": "sk-x",  # not ours to judge
        }
    )
    assert warnings == [
        "THREADLINE_LOGLEVEL is not a Threadline setting and is ignored; "
        "did you mean THREADLINE_LOG_LEVEL?",
        "THREADLINE_PORTT is not a Threadline setting and is ignored; "
        "did you mean THREADLINE_PORT?",
        "THREADLINE_ZZZ is not a Threadline setting and is ignored",
    ]


def test_every_documented_variable_is_known() -> None:
    documented = Path(__file__).parents[2].joinpath("docs", "configuration.md").read_text()
    for name in known_variables() - {"THREADLINE_CONFIG_FILE"}:
        if name.startswith("THREADLINE_PASSWORD_"):
            continue  # test-only tuning, deliberately undocumented
        assert f"`{name}`" in documented, name


@pytest.mark.parametrize(
    ("environment", "log_format", "json_lines"),
    [
        ("development", "auto", False),
        ("production", "auto", True),
        ("development", "json", True),
        ("production", "text", False),
    ],
)
def test_log_format_text_in_development_json_in_production(
    environment: str, log_format: str, json_lines: bool
) -> None:
    settings = load_settings(environment=environment, log_format=log_format, secret_key="x" * 40)
    assert settings.log_json is json_lines


@pytest.mark.parametrize(
    ("field", "setting"),
    [("workers", "THREADLINE_WORKERS"), ("worker_processes", "THREADLINE_WORKER_PROCESSES")],
)
def test_several_processes_need_postgres_and_redis(field: str, setting: str) -> None:
    postgres, redis = "postgresql://u@db/app", "redis://cache:6379/0"
    assert getattr(load_settings(**{field: 1}), field) == 1  # the default: one process, SQLite
    with pytest.raises(ConfigurationError, match=f"^{setting}: .*SQLite.*one writer.*event bus"):
        load_settings(**{field: 2})
    with pytest.raises(ConfigurationError, match=f"^{setting}: .*needs THREADLINE_REDIS_URL"):
        load_settings(database_url=postgres, **{field: 2})
    assert getattr(load_settings(database_url=postgres, redis_url=redis, **{field: 3}), field) == 3
    with pytest.raises(ConfigurationError, match=f"^{setting}: "):
        load_settings(database_url=postgres, redis_url=redis, **{field: 0})
