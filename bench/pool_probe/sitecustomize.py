"""How long each server process's transactions hold their pooled connection, how long a
checkout waits for one, and how long each statement of a post waits for its answer.

    POOL_PROBE_DIR=/tmp/pool PYTHONPATH=$PWD/bench/pool_probe python bench/runs.py \
        --backend postgres --topology serve --users 32 --runs-per-user 10 --idle-sockets 0

Like bench/gc_probe, Python imports this `sitecustomize` by itself in every process started
with the directory on PYTHONPATH (bench/runs.py passes it on to the servers). Each process
that used a connection pool writes `<POOL_PROBE_DIR>/pool-<pid>.json` when it exits: the
50th, 90th and 99th percentiles, in ms, of
- `hold`: checkout to checkin, per transaction kind (named by its first statement);
- `wait`: how long opening a connection's transaction waited for the pool;
- `post_statements`: each statement of a post's transaction (the one that starts with the
  user's locked read), from sending it to its answer, event-loop wait included.
Everything is measured over the whole process life (warm-up included). Not imported by the
benchmark or by Threadline; the figures in docs/benchmarks.md name it where they use it.
"""

import atexit
import collections
import json
import os
import time

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import engine as async_engine
from sqlalchemy.pool import Pool

_DIRECTORY = os.environ.get("POOL_PROBE_DIR")
_POST_FIRST = "SELECT users.disabled_at, users.plan"
_checked_out: dict[int, float] = {}
_first: dict[int, str] = {}
_sent: dict[int, float] = {}
_holds: dict[str, list[float]] = collections.defaultdict(list)
_post_statements: dict[str, list[float]] = collections.defaultdict(list)
_waits: list[float] = []


@event.listens_for(Pool, "checkout")
def _on_checkout(_dbapi: object, record: object, _proxy: object) -> None:
    _checked_out[id(record)] = time.perf_counter()


@event.listens_for(Pool, "checkin")
def _on_checkin(_dbapi: object, record: object) -> None:
    began = _checked_out.pop(id(record), None)
    kind = _first.pop(id(record), "(no statement)")
    if began is not None:
        _holds[kind].append(time.perf_counter() - began)


@event.listens_for(Engine, "before_cursor_execute")
def _before(conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
    record = id(conn.connection._connection_record)
    _first.setdefault(record, " ".join(statement.split())[:40])
    _sent[id(conn)] = time.perf_counter()


@event.listens_for(Engine, "after_cursor_execute")
def _after(conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
    sent = _sent.pop(id(conn), None)
    record = id(conn.connection._connection_record)
    if sent is not None and _first.get(record, "").startswith(_POST_FIRST):
        _post_statements[" ".join(statement.split())[:50]].append(time.perf_counter() - sent)


_start = async_engine.AsyncConnection.start


async def _timed_start(self, is_ctxmanager=False):  # type: ignore[no-untyped-def]
    began = time.perf_counter()
    try:
        return await _start(self, is_ctxmanager)
    finally:
        _waits.append(time.perf_counter() - began)


async_engine.AsyncConnection.start = _timed_start  # type: ignore[method-assign]


def _percentiles(values: list[float]) -> dict[str, float | int]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"n": len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def _write() -> None:
    if not _waits:
        return  # a process that never used a pool (a supervisor)
    report = {
        "hold": {k: _percentiles(v) for k, v in _holds.items() if len(v) >= 20},
        "wait": _percentiles(_waits),
        "post_statements": {k: _percentiles(v) for k, v in _post_statements.items()},
    }
    path = os.path.join(_DIRECTORY or ".", f"pool-{os.getpid()}.json")
    with open(path, "w") as out:
        json.dump(report, out, indent=1)


atexit.register(_write)
