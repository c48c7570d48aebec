"""Table definitions (SQLAlchemy Core). Migrations in `migrations/` create exactly these.

Every row a user owns carries `user_id`, even where it could be reached through a parent, so a
store can scope any query by user with one indexed condition.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

metadata_obj = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores them naive, as text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
ID = sa.String(32)

users = sa.Table(
    "users",
    metadata_obj,
    sa.Column("id", ID, primary_key=True),
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    # A plan name of the settings; NULL: the default plan (threadline/plans.py).
    sa.Column("plan", sa.String(64), nullable=True),
    # Set by `threadline admin users disable`: every token of the user is refused.
    sa.Column("disabled_at", UTCDateTime(), nullable=True),
)

threads = sa.Table(
    "threads",
    metadata_obj,
    sa.Column("id", ID, primary_key=True),
    sa.Column("user_id", ID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("title", sa.String(200), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("metadata", JSONType, nullable=False),
    # Optimistic concurrency: every update bumps it and checks the value it read.
    sa.Column("version", sa.Integer, nullable=False),
    # Incremented under the row lock by each append (and each move): unique, ordered positions.
    sa.Column("message_count", sa.Integer, nullable=False),
    # Last event sequence number handed out for this thread (see events/publisher.py).
    sa.Column("event_seq", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("last_activity_at", UTCDateTime(), nullable=False),
    sa.Index("ix_threads_user_activity", "user_id", "last_activity_at", "id"),
    sa.Index("ix_threads_user_status", "user_id", "status"),
)

messages = sa.Table(
    "messages",
    metadata_obj,
    sa.Column("id", ID, primary_key=True),
    sa.Column("thread_id", ID, sa.ForeignKey("threads.id", ondelete="CASCADE"), nullable=False),
    sa.Column("user_id", ID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("metadata", JSONType, nullable=False),
    sa.Column("tool_calls", JSONType, nullable=True),
    sa.Column("tool_call_id", sa.String(128), nullable=True),
    sa.Column("run_id", ID, nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("thread_id", "position", name="uq_messages_thread_position"),
    # A tool call's result is stored once per run: a retried run reuses it instead of calling
    # the tool again (the idempotency key is run id + call id).
    sa.Index(
        "uq_messages_run_tool_call",
        "run_id",
        "tool_call_id",
        unique=True,
        postgresql_where=sa.text("tool_call_id IS NOT NULL AND role = 'tool'"),
        sqlite_where=sa.text("tool_call_id IS NOT NULL AND role = 'tool'"),
    ),
)

runs = sa.Table(
    "runs",
    metadata_obj,
    sa.Column("id", ID, primary_key=True),
    sa.Column("thread_id", ID, sa.ForeignKey("threads.id", ondelete="CASCADE"), nullable=False),
    sa.Column("user_id", ID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("agent", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("input", JSONType, nullable=False),
    sa.Column("result", JSONType, nullable=True),
    sa.Column("error", JSONType, nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=True),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.Index("ix_runs_status_created", "status", "created_at"),
    sa.Index("ix_runs_thread_status", "thread_id", "status"),
    sa.Index("ix_runs_user_status", "user_id", "status"),
    # The fair claim asks when each waiting user was last served.
    sa.Index("ix_runs_user_started", "user_id", "started_at"),
)

events = sa.Table(
    "events",
    metadata_obj,
    sa.Column("id", ID, primary_key=True),
    sa.Column("thread_id", ID, sa.ForeignKey("threads.id", ondelete="CASCADE"), nullable=False),
    sa.Column("user_id", ID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("run_id", ID, nullable=True),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("data", JSONType, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("thread_id", "seq", name="uq_events_thread_seq"),
)

revoked_tokens = sa.Table(
    "revoked_tokens",
    metadata_obj,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
)

# Users of external identity providers: one issuer's subject is one user, forever, whichever
# process saw its first token (the primary key makes concurrent first sign-ins converge).
external_identities = sa.Table(
    "external_identities",
    metadata_obj,
    sa.Column("issuer", sa.String(512), primary_key=True),
    sa.Column("subject", sa.String(255), primary_key=True),
    sa.Column("user_id", ID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Index("ix_external_identities_user", "user_id"),
)

# Keys of the product's own backend. Only a hash of the secret is kept; checked on every
# request, so a revocation applies at once on every process.
service_keys = sa.Table(
    "service_keys",
    metadata_obj,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("scopes", JSONType, nullable=False),
    # An issuer: the key may act only for users of that identity provider; NULL: any user.
    sa.Column("tenant", sa.String(512), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
)

# One row per run that reached a terminal state after starting: its tokens and duration.
# Kept when the thread is deleted (usage is billed); removed with the user.
run_usage = sa.Table(
    "run_usage",
    metadata_obj,
    sa.Column("run_id", ID, primary_key=True),
    sa.Column("user_id", ID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    # The UTC day the run finished, `YYYY-MM-DD`: per-day sums need no date functions.
    sa.Column("day", sa.String(10), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("input_tokens", sa.Integer, nullable=False),
    sa.Column("output_tokens", sa.Integer, nullable=False),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Index("ix_run_usage_user_day", "user_id", "day"),
)

# Webhook endpoints (`threadline admin webhooks add`). The secret signs deliveries, so it is kept
# as given (Standard Webhooks `whsec_…`); protect the database like the signing key.
webhook_endpoints = sa.Table(
    "webhook_endpoints",
    metadata_obj,
    sa.Column("id", ID, primary_key=True),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("secret", sa.String(255), nullable=False),
    sa.Column("event_types", JSONType, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)

# The outbox: one row per event and endpoint, inserted in the transaction that records the
# event, delivered at least once by whichever process claims it (a lease, like runs).
webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata_obj,
    sa.Column("id", ID, primary_key=True),
    sa.Column(
        "endpoint_id",
        ID,
        sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    # pending, delivered or dead (every attempt failed)
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("delivered_at", UTCDateTime(), nullable=True),
    sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    sa.Index("ix_webhook_deliveries_endpoint", "endpoint_id", "created_at"),
)

# The delivery log: every attempt, its HTTP status or error, and how long it took.
webhook_attempts = sa.Table(
    "webhook_attempts",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "delivery_id",
        ID,
        sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Index("ix_webhook_attempts_delivery", "delivery_id"),
)
