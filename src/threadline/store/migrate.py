"""Apply Alembic migrations from inside a running event loop (for `serve` and `migrate`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from threadline.errors import ConfigurationError

_MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same in every process that migrates.
_MIGRATION_LOCK_KEY = 7_245_019_331


def alembic_config(database_url: str = "") -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


async def upgrade_to_head(engine: AsyncEngine) -> None:
    """Bring the schema up to date. Safe when several processes start at once."""
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Two API processes starting together must not both create the tables.
            await connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        await connection.run_sync(_upgrade)


def _upgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def ensure_schema_current(engine: AsyncEngine) -> None:
    """Fail start-up clearly when the database has not been migrated to this code's schema."""
    async with engine.connect() as connection:
        current = await connection.run_sync(_current_revision)
    scripts = ScriptDirectory.from_config(alembic_config())
    head = scripts.get_current_head()
    if current == head:
        return
    if current is None:
        problem = "the database has no Threadline tables yet (a new database?)"
    elif current not in {script.revision for script in scripts.walk_revisions()}:
        raise ConfigurationError(
            "THREADLINE_DATABASE_URL",
            f"the database schema is at revision {current}, which this version of Threadline "
            "does not know (a newer version migrated it): upgrade Threadline",
        )
    else:
        problem = f"the database schema is at revision {current}, this version needs {head}"
    raise ConfigurationError("THREADLINE_DATABASE_URL", f"{problem}: run `threadline migrate`")


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()
