"""Configuration: `THREADLINE_*` environment variables over an optional TOML file over defaults.

Parsed once by the entry point (CLI or `create_app`) into a frozen `Settings` that is passed
down explicitly; nothing else in the package reads the environment. Provider keys keep their
vendors' usual names (`OPENAI_API_KEY`, `ANTHROPIC_API_KEY`) so existing set-ups just work.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from threadline.auth.issuers import TrustedIssuer
from threadline.errors import ConfigurationError
from threadline.plans import DEFAULT_PLANS, PlanLimits

CONFIG_FILE_VARIABLE = "THREADLINE_CONFIG_FILE"
_PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "changethis", "test"})
# libpq spells TLS policy `sslmode`; asyncpg takes the same values under `ssl`.
_SSLMODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
_POSTGRES_SCHEMES = frozenset(
    {"postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2", "postgresql+asyncpg"}
)
_SQLITE_SCHEMES = frozenset({"sqlite", "sqlite+aiosqlite"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ENV_PREFIX = "THREADLINE_"
# Read by the test suite, not by the server: never warned about.
_TEST_SUITE_VARIABLES = frozenset({"THREADLINE_TEST_DATABASE_URL", "THREADLINE_TEST_REDIS_URL"})


def normalize_database_url(url: str, *, setting: str = "THREADLINE_DATABASE_URL") -> str:
    """Turn any common spelling of a database URL into the async-driver form SQLAlchemy needs.

    `postgres://`, `postgresql://` and `postgresql+psycopg://` become `postgresql+asyncpg://`,
    `sslmode=` becomes asyncpg's `ssl=`, and a Cloud SQL `host=/cloudsql/…` socket is kept.
    A relative SQLite path is made absolute against the working directory so every process and
    the migration runner open the same file. Raises `ConfigurationError` naming `setting`.
    """
    url = url.strip()
    if not url:
        raise ConfigurationError(setting, "is empty")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigurationError(setting, f"{url!r} is not a URL (expected scheme://...)")
    scheme = scheme.lower()
    if scheme in _POSTGRES_SCHEMES:
        return _normalize_postgres(rest, setting)
    if scheme in _SQLITE_SCHEMES:
        return _normalize_sqlite(rest, setting)
    raise ConfigurationError(
        setting, f"unsupported database {scheme!r}: use postgresql://... or sqlite:///path"
    )


def _normalize_postgres(rest: str, setting: str) -> str:
    parts = urlsplit(f"postgresql+asyncpg://{rest}")
    if not parts.path.strip("/") and "host=" not in parts.query and not parts.hostname:
        raise ConfigurationError(setting, "a PostgreSQL URL needs a host and a database name")
    query = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "sslmode":
            if value not in _SSLMODES:
                raise ConfigurationError(setting, f"unknown sslmode {value!r}")
            key = "ssl"
        query.append((key, value))
    try:
        _ = parts.port  # urlsplit only validates the port when asked
    except ValueError as exc:
        raise ConfigurationError(setting, f"invalid port: {exc}") from exc
    return urlunsplit(parts._replace(query=urlencode(query, safe="/:")))


def _normalize_sqlite(rest: str, setting: str) -> str:
    # sqlite:///relative.db -> rest "/relative.db"; sqlite:////abs.db -> rest "//abs.db"
    if not rest.startswith("/"):
        raise ConfigurationError(setting, "SQLite URLs look like sqlite:///file.db")
    path_part, _, query = rest[1:].partition("?")
    if path_part in ("", ":memory:"):
        raise ConfigurationError(
            setting, "an in-memory SQLite database would vanish between connections; use a file"
        )
    if path_part.endswith("/"):
        raise ConfigurationError(setting, f"{path_part!r} names a directory, not a database file")
    path = Path(path_part).expanduser()
    if path.is_dir():
        raise ConfigurationError(setting, f"{path} is a directory, not a database file")
    if not path.is_absolute():
        path = Path.cwd() / path
    normalized = f"sqlite+aiosqlite:///{path.resolve()}"
    return f"{normalized}?{query}" if query else normalized


def _split_comma_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def check_cors_origin(origin: str) -> str:
    """`*`, or a browser origin: `http(s)://host[:port]`, no path, no trailing slash."""
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    try:
        port = parts.port
    except ValueError:
        port = -1
    well_formed = (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and port != -1
        and not parts.username
        and not parts.password
        and parts.path == ""
        and not parts.query
        and not parts.fragment
        and " " not in origin
    )
    if not well_formed:
        raise ConfigurationError(
            "THREADLINE_CORS_ORIGINS",
            f"{origin!r} is not an origin: use scheme://host[:port] such as "
            "https://app.example.com (no path, no trailing slash), or *",
        )
    return origin


class Settings(BaseSettings):
    """Every setting, with its environment variable `THREADLINE_<NAME>`."""

    model_config = SettingsConfigDict(
        env_prefix="THREADLINE_", frozen=True, extra="ignore", populate_by_name=True
    )

    environment: Literal["development", "production", "test"] = "development"
    """`production` refuses a missing or weak secret key."""
    host: str = "127.0.0.1"
    """Interface `serve` binds; `0.0.0.0` to accept connections from other machines."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port `serve` listens on."""
    database_url: str = "sqlite:///threadline.db"
    """Normalized on load; see `normalize_database_url`."""
    database_pool_size: int = Field(default=10, ge=1, le=200)
    """PostgreSQL connections per process (the pool may overflow by as many again)."""
    database_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=600)
    """How long to wait for PostgreSQL to accept a connection and answer before failing."""
    database_statement_timeout_seconds: float = Field(default=60.0, ge=0)
    """PostgreSQL cancels any one statement that runs longer than this; 0 turns it off."""
    database_pool_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    """How long a request or a run waits for a free pooled connection before it is answered
    503 `database_unavailable` (or handed back); a warning names the pool's state."""
    redis_url: str | None = None
    """When set, live events, control messages (cancel, logout), token revocations and
    rate-limit counters go through Redis, shared by every process."""
    redis_prefix: str = "threadline"
    """Prefix of every Redis key, so several deployments (or test runs) can share one Redis."""
    redis_stream_max_len: int = Field(default=1000, ge=10)
    """Live events kept per thread in its Redis stream (about); a reader further behind catches
    up from the database."""
    redis_stream_ttl_seconds: int = Field(default=3600, ge=10)
    """A thread's Redis stream expires this long after its last event."""
    redis_readers: int = Field(default=2, ge=1, le=64)
    """Connections per API process that read live events (each serves a share of the threads)."""
    redis_keys_per_read: int = Field(default=256, ge=1, le=10_000)
    """Thread streams one XREAD call reads; a reader with more takes turns."""
    redis_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    """Deadline of a Redis call (publishing, revocations, rate limits)."""

    secret_key: SecretStr | None = None
    """Signs tokens. In development, a random key is kept in `data_dir` when unset."""
    data_dir: Path = Path(".threadline")
    """Where the embedded server keeps its generated secret key."""
    password_time_cost: int = Field(default=3, ge=1)
    """Argon2 passes per hash (argon2-cffi's default). Tests lower it; production should not."""
    password_memory_kib: int = Field(default=65_536, ge=8)
    """Argon2 memory per hash, in KiB (argon2-cffi's default)."""
    token_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    """How long a bearer token is valid."""

    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Allowed browser origins, comma-separated (`*` allows any)."""
    messages_per_minute: int = Field(default=60, ge=1)
    """Messages one user may post per minute (HTTP and WebSocket together); then 429."""
    max_request_bytes: int = Field(default=1_000_000, ge=1024)
    """Largest request body accepted; larger is a 413."""
    max_message_chars: int = Field(default=32_000, ge=1)
    """Longest message content; longer is a 422 `message_too_long`."""
    max_metadata_bytes: int = Field(default=8_192, ge=2)
    """Largest metadata object (thread or message), as compact JSON."""
    log_level: str = "INFO"
    """Lowest level logged: DEBUG, INFO, WARNING, ERROR or CRITICAL."""
    log_format: Literal["auto", "text", "json"] = "auto"
    """`text` (readable lines), `json` (one object a line) or `auto`: JSON in production,
    text otherwise. Every line, the server's access log included, has this one format."""

    agents: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Python modules whose agents to register (comma-separated), besides the built-in `demo`."""
    default_model: str = "demo"
    """Model of the built-in agent: `demo`, `openai:<model>` or `anthropic:<model>`."""
    demo_delay_seconds: float = Field(default=0.0, ge=0)
    """Pause between the demo model's chunks, to watch streaming happen."""
    workers: int = Field(default=1, ge=1, le=64)
    """API processes `threadline serve` runs on its one host and port (`--workers`), each with
    its embedded worker unless that is off. More than 1 needs PostgreSQL and Redis."""
    worker_processes: int = Field(default=1, ge=1, le=64)
    """Processes `threadline worker` runs (`--processes`). More than 1 needs PostgreSQL and
    Redis."""
    embedded_worker: bool = True
    """Run agents inside the API process. Turn off when `threadline worker` processes run them."""
    worker_concurrency: int = Field(default=32, ge=1, le=1000)
    """Runs one worker (process) executes at once."""
    worker_poll_seconds: float = Field(default=0.5, gt=0)
    """How often an idle worker looks for runs queued by other processes."""
    run_timeout_seconds: float = Field(default=300.0, gt=0)
    """A run still going after this ends as `timed_out`."""
    max_concurrent_runs_per_user: int = Field(default=4, ge=1)
    """Runs of one user that execute at once; more wait in the queue."""
    max_active_runs_per_user: int = Field(default=200, ge=1)
    """Queued plus running runs one user may have; beyond it a new run is a 429."""
    run_max_attempts: int = Field(default=3, ge=1)
    """Attempts of a run whose worker died (lease expired) before it is failed."""
    run_lease_seconds: float = Field(default=30.0, ge=1)
    """A worker that has not heartbeated its run for this long is taken for dead."""
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    """On shutdown, how long running runs may take to finish before they are handed back to
    the queue for another worker."""
    socket_queue_size: int = Field(default=1000, ge=8)
    """Events a connection may fall behind by before it is closed and told to resume."""
    debug_count_statements: bool = False
    """Count database statements, transactions and pool checkouts and show them on /metrics
    (`threadline_db_*_total`), for benchmarks; costs a little CPU per statement."""

    oidc_issuers: list[TrustedIssuer] = Field(default_factory=list)
    """Trusted external identity providers (a JSON list); see docs/identity.md. Their users
    sign in with their own tokens and are created on first use."""
    password_auth: bool = True
    """Allow registration and sign-in with email and password. Turn off when every user comes
    from an OIDC issuer."""
    plans: dict[str, PlanLimits] = Field(default_factory=lambda: dict(DEFAULT_PLANS))
    """Plans by name (a JSON object of limits); see `threadline.plans`."""
    default_plan: str | None = None
    """Plan of users who have none; unset: the deployment-wide limits above apply to them."""

    webhook_delivery: bool = True
    """Deliver webhooks from this process (any number of processes may: each delivery is
    claimed by one)."""
    webhook_poll_seconds: float = Field(default=1.0, gt=0)
    """How often the deliverer looks for due deliveries."""
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    """Deadline of one delivery POST."""
    webhook_max_attempts: int = Field(default=8, ge=1, le=100)
    """Attempts of a delivery before it is dead."""
    webhook_retry_base_seconds: float = Field(default=2.0, gt=0)
    """First retry delay; each next one doubles (capped at an hour)."""

    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("THREADLINE_OPENAI_API_KEY", "OPENAI_API_KEY")
    )
    """Enables `openai:<model>` agents."""
    openai_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("THREADLINE_OPENAI_BASE_URL", "OPENAI_BASE_URL"),
    )
    """An OpenAI-compatible server (vLLM, Ollama, llama.cpp); no key needed then."""
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("THREADLINE_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"),
    )
    """Enables `anthropic:<model>` agents."""
    anthropic_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("THREADLINE_ANTHROPIC_BASE_URL", "ANTHROPIC_BASE_URL"),
    )
    """Another Anthropic API endpoint."""

    @field_validator("cors_origins", "agents", mode="before")
    @classmethod
    def _parse_lists(cls, value: object) -> object:
        return _split_comma_list(value)

    @field_validator("database_url")
    @classmethod
    def _normalize_database(cls, value: str) -> str:
        return normalize_database_url(value)

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ConfigurationError(
                "THREADLINE_LOG_LEVEL", f"{value!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        return level

    @field_validator("cors_origins")
    @classmethod
    def _check_cors_origins(cls, value: list[str]) -> list[str]:
        return [check_cors_origin(origin) for origin in value]

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> Settings:
        if self.environment != "production":
            return self
        secret = self.secret_key.get_secret_value() if self.secret_key else ""
        if secret.strip().lower() in _PLACEHOLDER_SECRETS or len(secret) < 32:
            raise ConfigurationError(
                "THREADLINE_SECRET_KEY",
                "must be set to a random value of at least 32 characters in production",
            )
        return self

    @model_validator(mode="after")
    def _check_plans(self) -> Settings:
        if self.default_plan is not None and self.default_plan not in self.plans:
            raise ConfigurationError(
                "THREADLINE_DEFAULT_PLAN",
                f"{self.default_plan!r} is not one of the plans ({', '.join(sorted(self.plans))})",
            )
        if not self.password_auth and not self.oidc_issuers:
            raise ConfigurationError(
                "THREADLINE_PASSWORD_AUTH", "is off but no THREADLINE_OIDC_ISSUERS is configured"
            )
        return self

    @model_validator(mode="after")
    def _check_processes(self) -> Settings:
        for setting, option, count in (
            ("THREADLINE_WORKERS", "--workers", self.workers),
            ("THREADLINE_WORKER_PROCESSES", "--processes", self.worker_processes),
        ):
            if count == 1:
                continue
            if self.is_sqlite:
                raise ConfigurationError(
                    setting,
                    f"{option} {count} needs PostgreSQL and Redis: an SQLite file takes one "
                    "writer at a time and the in-process event bus cannot be shared between "
                    f"processes (use {option} 1, or set THREADLINE_DATABASE_URL and "
                    "THREADLINE_REDIS_URL)",
                )
            if self.redis_url is None:
                raise ConfigurationError(
                    setting,
                    f"{option} {count} needs THREADLINE_REDIS_URL: without Redis each process "
                    "has its own in-process event bus, and a user connected to one would miss "
                    "the events of runs executed by another",
                )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def log_json(self) -> bool:
        if self.log_format == "auto":
            return self.environment == "production"
        return self.log_format == "json"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_VARIABLE)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigurationError(CONFIG_FILE_VARIABLE, f"no such file: {path}")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def known_variables() -> frozenset[str]:
    """Every environment variable the settings read (`THREADLINE_CONFIG_FILE` included)."""
    names = {CONFIG_FILE_VARIABLE}
    for name, field in Settings.model_fields.items():
        names.add(f"{ENV_PREFIX}{name.upper()}")
        if isinstance(field.validation_alias, AliasChoices):
            names.update(str(choice) for choice in field.validation_alias.choices)
    return frozenset(names)


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """One warning per `THREADLINE_*` variable that no setting reads, naming the closest real
    one: a misspelled variable is otherwise silently ignored."""
    environ = dict(os.environ) if environ is None else environ
    known = known_variables() | _TEST_SUITE_VARIABLES
    # Compared without the common prefix, which would make every name look close.
    suffixes = {name.removeprefix(ENV_PREFIX): name for name in known}
    warnings = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1)
        hint = f"; did you mean {suffixes[close[0]]}?" if close else ""
        warnings.append(f"{name} is not a Threadline setting and is ignored{hint}")
    return warnings


def load_settings(**overrides: object) -> Settings:
    """Build the settings once, at the entry point. Errors name the offending variable."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "settings"
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, ConfigurationError):
            raise cause from exc
        raise ConfigurationError(f"THREADLINE_{field.upper()}", first["msg"]) from exc
