"""What one statement and one transaction cost the server's process on PostgreSQL: through
SQLAlchemy, as Threadline runs them, and through asyncpg directly, on the same connection.

    python bench/statement_cost.py --out bench/results/statement_cost.json \
        [--postgres-url URL] [--ops 2000] [--rounds 5]

It explains the part of a run's server CPU that is the database's (docs/benchmarks.md): a run
is about 24 statements in 5 transactions, so `24 × statement + 5 × transaction` is what its
database work costs in this process, and the difference between the two columns is what going
below SQLAlchemy could save at most.

Measured, as CPU time of this process (`time.process_time`) per operation, over `--ops`
operations, the median of `--rounds` rounds in which the variants take turns (so that a noisy
neighbour slows every variant alike):
- `select_statement`: a prebuilt one-parameter SELECT returning one row, inside an open
  transaction: SQLAlchemy `conn.execute` against asyncpg `fetchrow` of the same SQL;
- `insert_statement`: a prebuilt INSERT of an id, an integer and a JSONB object (an event's
  shape), the same way; asyncpg gets the JSON already encoded, as SQLAlchemy passes it;
- `transaction`: `engine.begin()` around that SELECT (checkout, BEGIN, the statement, COMMIT,
  return to the pool) against the SELECT alone in autocommit (checkout, the statement, return),
  and the difference: what BEGIN and COMMIT add.
Wall time per operation is reported beside CPU time. The engine is Threadline's own
(`threadline.store.db.create_engine`: no pre-ping, its checkout hook), on a fresh database that
is dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from _support import (
    DEFAULT_POSTGRES_URL,
    ROOT,
    machine_info,
    postgres_database,
    postgres_version,
    report_failures,
    require_loopback,
    write_results,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from threadline.settings import normalize_database_url
from threadline.store.db import create_engine

_METADATA = sa.MetaData()
_ITEMS = sa.Table(
    "bench_items",
    _METADATA,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("data", postgresql.JSONB, nullable=False),
)
_SELECT = sa.select(_ITEMS.c.id, _ITEMS.c.n).where(_ITEMS.c.id == sa.bindparam("id"))
_INSERT = _ITEMS.insert()
_DATA = {"type": "tool_completed", "data": {"name": "calculator", "result": "84"}}
ROUND_TIMEOUT = 300.0  # one variant's operations in one round

Operation = Callable[[int], Awaitable[object]]


@dataclass(frozen=True)
class Options:
    out: Path
    postgres_url: str
    ops: int
    rounds: int


def _sql(statement: sa.ClauseElement) -> str:
    """The statement's SQL as SQLAlchemy's asyncpg dialect renders it ($1, $2, ...)."""
    dialect = postgresql.asyncpg.dialect()  # type: ignore[attr-defined]
    return str(statement.compile(dialect=dialect))


async def _measure(operations: dict[str, Operation], options: Options) -> dict[str, object]:
    """CPU and wall µs per operation of each variant, the median over rounds."""
    cpu: dict[str, list[float]] = {name: [] for name in operations}
    wall: dict[str, list[float]] = {name: [] for name in operations}
    for round_number in range(options.rounds):
        for name, operation in operations.items():
            base = round_number * options.ops
            started_cpu, started_wall = time.process_time(), time.perf_counter()
            # One deadline for the round, not one per operation: a timeout's own cost would
            # be in every figure.
            async with asyncio.timeout(ROUND_TIMEOUT):
                for i in range(options.ops):
                    await operation(base + i)
            cpu[name].append((time.process_time() - started_cpu) / options.ops * 1e6)
            wall[name].append((time.perf_counter() - started_wall) / options.ops * 1e6)
    return {
        name: {
            "cpu_us": round(statistics.median(cpu[name]), 1),
            "wall_us": round(statistics.median(wall[name]), 1),
            "cpu_us_by_round": [round(x, 1) for x in cpu[name]],
        }
        for name in operations
    }


async def _statements(conn: AsyncConnection, options: Options) -> dict[str, object]:
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    select_sql, insert_sql = _sql(_SELECT), _sql(_INSERT)
    encoded = json.dumps(_DATA)

    async def sa_select(_: int) -> object:
        return (await conn.execute(_SELECT, {"id": "probe"})).first()

    async def raw_select(_: int) -> object:
        return await raw.fetchrow(select_sql, "probe")

    async def sa_insert(i: int) -> object:
        return await conn.execute(_INSERT, {"id": f"sa-{i}", "n": i, "data": _DATA})

    async def raw_insert(i: int) -> object:
        return await raw.execute(insert_sql, f"raw-{i}", i, encoded)

    selects = await _measure({"sqlalchemy": sa_select, "asyncpg": raw_select}, options)
    inserts = await _measure({"sqlalchemy": sa_insert, "asyncpg": raw_insert}, options)
    return {"select_statement": selects, "insert_statement": inserts}


async def run(options: Options) -> dict[str, object]:
    started = time.perf_counter()
    async with postgres_database(options.postgres_url, label="stmt") as url:
        engine = create_engine(normalize_database_url(url), pool_size=2)
        try:
            async with asyncio.timeout(30), engine.begin() as conn:
                await conn.run_sync(_METADATA.create_all)
            async with engine.connect() as conn:
                await conn.execute(_INSERT, {"id": "probe", "n": 0, "data": _DATA})
                await conn.commit()

            async def in_transaction(_: int) -> object:
                async with engine.begin() as conn:
                    return (await conn.execute(_SELECT, {"id": "probe"})).first()

            async def autocommit(_: int) -> object:
                async with engine.connect() as conn:
                    auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
                    return (await auto.execute(_SELECT, {"id": "probe"})).first()

            transactions: dict[str, Any] = await _measure(
                {"begin_statement_commit": in_transaction, "statement_autocommit": autocommit},
                options,
            )
            transactions["begin_and_commit_cpu_us"] = round(
                transactions["begin_statement_commit"]["cpu_us"]
                - transactions["statement_autocommit"]["cpu_us"],
                1,
            )
            async with engine.connect() as conn:  # one transaction, rolled back at the end
                statements = await _statements(conn, options)
                await conn.rollback()
        finally:
            await engine.dispose()
        database = await postgres_version(url)
    return {
        "benchmark": "bench/statement_cost.py",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": machine_info(("sqlalchemy", "asyncpg")),
        "services": {"database": database},
        "config": {"ops": options.ops, "rounds": options.rounds},
        **statements,
        "transaction": transactions,
    }


def print_results(results: dict[str, Any]) -> None:
    for kind in ("select_statement", "insert_statement"):
        row = results[kind]
        print(
            f"{kind:<18} SQLAlchemy {row['sqlalchemy']['cpu_us']:>6} µs CPU, "
            f"asyncpg {row['asyncpg']['cpu_us']:>6} µs CPU",
            flush=True,
        )
    tx = results["transaction"]
    print(
        f"{'transaction':<18} begin+statement+commit {tx['begin_statement_commit']['cpu_us']} µs "
        f"CPU, autocommit statement {tx['statement_autocommit']['cpu_us']} µs: BEGIN and COMMIT "
        f"add {tx['begin_and_commit_cpu_us']} µs",
        flush=True,
    )


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "statement_cost.json"
    )
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="a PostgreSQL server where the benchmark may create a database",
    )
    parser.add_argument("--ops", type=int, default=2000, help="operations per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.ops < 1 or args.rounds < 1:
        parser.error("--ops and --rounds must be positive")
    require_loopback(args.postgres_url, "--postgres-url")
    return Options(out=args.out, postgres_url=args.postgres_url, ops=args.ops, rounds=args.rounds)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    try:
        results = asyncio.run(run(options))
    except (TimeoutError, OSError, sa.exc.SQLAlchemyError) as exc:
        return report_failures([exc], with_type=True)
    print_results(results)
    return write_results(options.out, results)


if __name__ == "__main__":
    sys.exit(main())
