"""Telling "the database went away" apart from every other database error.

A terminated backend (`pg_terminate_backend`, a restarted or failed-over server), a refused
connection or an exhausted pool is not a bug in the request or the run: the API answers 503
`database_unavailable` (the client may retry) and the engine hands the run back to the queue
to be retried, instead of a 500 or a failed run. Anything else stays what it is.
"""

from __future__ import annotations

import asyncpg
from sqlalchemy import exc as sa_exc

from threadline.store.db import DatabaseUnavailableError

# Raw asyncpg errors that mean the connection (or the server) is gone: connection failures
# (class 08), operator intervention (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot
# connect now), and "connection is closed" from a socket that died under a query.
_DRIVER_DISCONNECTS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    ConnectionError,
)


DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sa_exc.DBAPIError,
    sa_exc.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    ConnectionError,
)
"""Every error type that may be a lost connection, for handlers that must sort them out."""


def is_database_unavailable(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a lost or refused database connection."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DatabaseUnavailableError | sa_exc.TimeoutError):
            return True  # sa TimeoutError: no pooled connection came free in time
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, asyncpg.InterfaceError) and "connection is closed" not in str(
            current
        ):
            return False  # misuse of the driver, not a lost connection
        if isinstance(current, _DRIVER_DISCONNECTS):
            return True
        orig = getattr(current, "orig", None)
        current = (
            orig if isinstance(orig, BaseException) else (current.__cause__ or current.__context__)
        )
    return False
