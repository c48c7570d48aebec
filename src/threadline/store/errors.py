"""The store's errors for a database that does not answer: the API maps them to 503, and the
run engine hands a run that meets one back to the queue (`store/failures.py`)."""

from __future__ import annotations

from threadline.errors import ThreadlineError


class DatabaseUnavailableError(ThreadlineError):
    """The database cannot be reached, or does not answer in time."""

    code = "database_unavailable"

    def __init__(self, *, location: str, reason: str) -> None:
        super().__init__(f"Cannot reach the database at {location}: {reason}")
        self.location = location
        self.reason = reason


class DatabaseBusyError(DatabaseUnavailableError):
    """A SQLite connection of this process did not come free within its deadline: every one of
    its kind (the writer, or the readers) was held by other transactions all that time."""

    code = "database_busy"

    def __init__(self, *, location: str, kind: str, timeout_seconds: float) -> None:
        super().__init__(
            location=location,
            reason=f"no {kind} connection came free within {timeout_seconds:g} s "
            "(other transactions of this process held them all that time)",
        )
        self.kind = kind
        self.timeout_seconds = timeout_seconds
