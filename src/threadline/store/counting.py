"""Counting database work for benchmarks (`THREADLINE_DEBUG_COUNT_STATEMENTS=true`).

Off by default: each hook costs a little CPU per statement. When on, /metrics carries:
- `threadline_db_statements_total`: statements sent through a cursor (`before_cursor_execute`;
  an `executemany` counts once). On SQLite this includes the BEGIN of every transaction
  (the dialect sends it as a statement of its own, one trip to the driver's thread, outside
  SQLAlchemy's statement path: counted on the `begin` event);
- `threadline_db_transactions_total{outcome}`: transactions ended, `commit` or `rollback`
  (SQLAlchemy `commit`/`rollback` events of a connection);
- `threadline_db_pool_checkouts_total`: pool checkouts;
- `threadline_db_pings_total`: pre-pings, one per checkout when the pool pre-pings (each a
  transaction of its own, `BEGIN; ; ROLLBACK`, that the events above do not see).

A round trip to PostgreSQL is a statement, a BEGIN (sent by the driver before a transaction's
first statement), a COMMIT, a ROLLBACK, or three per pre-ping; `bench/runs.py` adds them up
and reads pg_stat_database's counts of the same period, the server's side of the transactions.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from threadline.store.sqlite import sync_engines


def count_statements(engine: AsyncEngine, registry: CollectorRegistry) -> None:
    """Count `engine`'s statements, transactions and checkouts into `registry`."""
    statements = Counter(
        "threadline_db_statements_total",
        "Database statements executed (debug counting)",
        registry=registry,
    )
    transactions = Counter(
        "threadline_db_transactions_total",
        "Database transactions ended, by outcome (debug counting)",
        ["outcome"],
        registry=registry,
    )
    checkouts = Counter(
        "threadline_db_pool_checkouts_total",
        "Connections checked out of the pool (debug counting)",
        registry=registry,
    )
    pings = Counter(
        "threadline_db_pings_total",
        "Pre-pings of pooled connections (debug counting)",
        registry=registry,
    )
    pre_ping = bool(engine.sync_engine.pool._pre_ping)
    committed, rolled_back = transactions.labels("commit"), transactions.labels("rollback")

    def on_statement(*_args: Any, **_kwargs: Any) -> None:
        statements.inc()

    def on_commit(_connection: Any) -> None:
        committed.inc()

    def on_rollback(_connection: Any) -> None:
        rolled_back.inc()

    def on_checkout(*_args: Any) -> None:
        checkouts.inc()
        if pre_ping:
            pings.inc()

    for sync_engine in sync_engines(engine):  # SQLite: the writer's and the readers'
        event.listen(sync_engine, "before_cursor_execute", on_statement)
        if sync_engine.dialect.name == "sqlite":
            event.listen(sync_engine, "begin", on_statement)
        event.listen(sync_engine, "commit", on_commit)
        event.listen(sync_engine, "rollback", on_rollback)
        event.listen(sync_engine.pool, "checkout", on_checkout)
