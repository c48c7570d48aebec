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


class WriteLockTimeoutError(DatabaseUnavailableError):
    """A SQLite write transaction waited longer than its deadline for this process's writer
    slot (another write transaction of this process held it all that time)."""

    code = "database_busy"

    def __init__(self, *, location: str, timeout_seconds: float) -> None:
        super().__init__(
            location=location,
            reason=f"no write slot came free within {timeout_seconds:g} s "
            "(a write transaction of this process held it all that time)",
        )
        self.timeout_seconds = timeout_seconds
