"""Database transactions and round trips per run, counted (issue 11 item 5).

Two sources, read at the same two moments around a measured phase:
- the server's counting hook (`THREADLINE_DEBUG_COUNT_STATEMENTS=true`, store/counting.py):
  statements, commits, rollbacks, pre-pings; exact and immediate, on both backends, **summed
  over every server process** (a supervisor's children, a `threadline worker` that serves no
  HTTP): the benchmark runs the servers with `PROMETHEUS_MULTIPROC_DIR` set, so
  prometheus_client keeps every process's counters in files there, and reads them all with its
  `MultiProcessCollector` (one process's /metrics would show only that process's share);
- on PostgreSQL, `pg_stat_database` for the benchmark's own database (`xact_commit`,
  `xact_rollback`, and `sessions`: connections opened), read over a connection to another
  database so that reading does not count.
  A backend reports its counts to the statistics system at most about once a second, and an
  idle one within about 10 s (PostgreSQL 15), so the "after" reading waits `PG_STATS_SETTLE_S`
  after the phase; the idle server's own transactions in that wait (the worker's queue polls)
  are measured by the hook just before the phase and reported beside the totals.

Round trips to PostgreSQL = statements + 2 per transaction (its BEGIN, its COMMIT or ROLLBACK)
+ 3 per pre-ping (`BEGIN; ; ROLLBACK`). On SQLite the BEGIN is itself a statement, so
round trips (calls into the driver's thread) = statements + 1 per transaction.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

PG_STATS_SETTLE_S = 11.0
IDLE_SAMPLE_S = 3.0
_HOOK = {
    "statements": "threadline_db_statements_total",
    "commits": 'threadline_db_transactions_total{outcome="commit"}',
    "rollbacks": 'threadline_db_transactions_total{outcome="rollback"}',
    "checkouts": "threadline_db_pool_checkouts_total",
    "pings": "threadline_db_pings_total",
}


@dataclass(frozen=True)
class Snapshot:
    at: float
    hook: dict[str, float]
    pg: dict[str, float] | None


def parse_hook(metrics_text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in metrics_text.splitlines():
        name, _, value = line.rpartition(" ")
        for key, metric in _HOOK.items():
            if name == metric:
                values[key] = float(value)
    missing = set(_HOOK) - set(values)
    if missing:
        raise RuntimeError(
            f"no {sorted(missing)} in the metrics: is THREADLINE_DEBUG_COUNT_STATEMENTS on?"
        )
    return values


def summed_hook(metrics_dir: Path) -> dict[str, float]:
    """The hook's counters summed over every process that wrote to `metrics_dir`."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    return parse_hook(generate_latest(registry).decode())


class Counts:
    """Reads both sources; `pg_admin_dsn`/`database` only on PostgreSQL. `metrics_dir` is the
    servers' `PROMETHEUS_MULTIPROC_DIR`."""

    def __init__(
        self, metrics_dir: Path, *, pg_admin_dsn: str | None = None, database: str | None = None
    ) -> None:
        self._metrics_dir = metrics_dir
        self._pg_admin_dsn = pg_admin_dsn
        self._database = database

    async def snapshot(self) -> Snapshot:
        hook = await asyncio.to_thread(summed_hook, self._metrics_dir)
        return Snapshot(time.perf_counter(), hook, await self._pg())

    async def _pg(self) -> dict[str, float] | None:
        if self._pg_admin_dsn is None:
            return None
        import asyncpg

        async with asyncio.timeout(15):
            conn = await asyncpg.connect(self._pg_admin_dsn)
            try:
                row = await conn.fetchrow(
                    "SELECT xact_commit, xact_rollback, sessions FROM pg_stat_database"
                    " WHERE datname = $1",
                    self._database,
                )
            finally:
                await conn.close(timeout=5)
        if row is None:
            raise RuntimeError(f"pg_stat_database has no row for {self._database!r}")
        return {
            "commits": float(row["xact_commit"]),
            "rollbacks": float(row["xact_rollback"]),
            "sessions": float(row["sessions"]),
        }

    @property
    def settle_s(self) -> float:
        return PG_STATS_SETTLE_S if self._pg_admin_dsn is not None else 0.0

    @property
    def postgres(self) -> bool:
        return self._pg_admin_dsn is not None


def round_trips(hook: dict[str, float], *, postgres: bool) -> float:
    transactions = hook["commits"] + hook["rollbacks"]
    if postgres:
        return hook["statements"] + 2 * transactions + 3 * hook["pings"]
    return hook["statements"] + transactions


def per_run(
    before: Snapshot,
    after: Snapshot,
    idle_hook_per_s: dict[str, float],
    runs: int,
    *,
    postgres: bool,
) -> dict[str, object]:
    """The counted figures of one measured phase, in total and per completed run."""
    window = after.at - before.at
    hook = {k: after.hook[k] - before.hook[k] for k in _HOOK}
    idle = {k: idle_hook_per_s[k] * window for k in _HOOK}
    busy = {k: max(0.0, hook[k] - idle[k]) for k in _HOOK}

    def each(value: float) -> float:
        return round(value / runs, 2)

    result: dict[str, object] = {
        "window_s": round(window, 2),
        "hook_totals": {k: int(v) for k, v in hook.items()},
        "idle_hook_per_s": {k: round(v, 2) for k, v in idle_hook_per_s.items()},
        "per_run": {
            "transactions": each(hook["commits"] + hook["rollbacks"]),
            "commits": each(hook["commits"]),
            "rollbacks": each(hook["rollbacks"]),
            "statements": each(hook["statements"]),
            "pre_pings": each(hook["pings"]),
            "round_trips": each(round_trips(hook, postgres=postgres)),
        },
        "per_run_minus_idle": {
            "transactions": each(busy["commits"] + busy["rollbacks"]),
            "round_trips": each(round_trips(busy, postgres=postgres)),
        },
    }
    if before.pg is not None and after.pg is not None:
        pg = {k: after.pg[k] - before.pg[k] for k in after.pg}
        result["pg_stat_database"] = {
            "xact_commit": int(pg["commits"]),
            "xact_rollback": int(pg["rollbacks"]),
            "transactions_per_run": each(pg["commits"] + pg["rollbacks"]),
            "commits_per_run": each(pg["commits"]),
            "rollbacks_per_run": each(pg["rollbacks"]),
            # Connections the servers opened meanwhile: a pool too small for the load opens
            # (and closes) overflow connections, each a backend process started.
            "sessions_opened": int(pg["sessions"]),
        }
    return result


async def idle_rate(counts: Counts) -> tuple[dict[str, float], Snapshot]:
    """The idle server's own database work per second (the hook only: it is immediate), over
    long enough for pg_stat_database to have caught up; also the snapshot it ended with."""
    first = await counts.snapshot()
    await asyncio.sleep(max(IDLE_SAMPLE_S, counts.settle_s))
    second = await counts.snapshot()
    span = second.at - first.at
    return {k: (second.hook[k] - first.hook[k]) / span for k in _HOOK}, second
