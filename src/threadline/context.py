"""The user context: who is acting, on what, in which request, run or connection.

Every store function takes one and scopes its queries by `user_id`, so isolation does not depend
on each caller remembering a `WHERE`. It is frozen so nothing downstream can act as someone else,
and cheap to build (a few microseconds: `bench/api.py` measures it) because the API builds one
per request and the worker one per claimed run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from threadline.errors import InvalidInputError
from threadline.ids import IdPrefix, is_valid_id

# Values that show up when a caller stringified a missing value instead of failing.
_PLACEHOLDERS = frozenset({"none", "null", "undefined", "nil", "test", "nan", "0", "-"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class InvalidContextError(InvalidInputError):
    """A context was built from an id that cannot be real."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", code="invalid_context", field=field)


def _check_id(field: str, value: str | None, prefix: IdPrefix, *, required: bool) -> None:
    if value is None:
        if required:
            raise InvalidContextError(field, "is required")
        return
    if not isinstance(value, str):
        raise InvalidContextError(field, f"must be a string, not {type(value).__name__}")
    stripped = value.strip()
    if not stripped:
        raise InvalidContextError(field, "is empty")
    if stripped.lower() in _PLACEHOLDERS:
        raise InvalidContextError(field, f"{value!r} is a placeholder, not an id")
    if not is_valid_id(value, prefix):
        raise InvalidContextError(field, f"{value!r} is not a valid {prefix.value}… id")


def _check_token(field: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not _REQUEST_ID.fullmatch(value):
        raise InvalidContextError(field, "must be 1-128 characters of [A-Za-z0-9._:-]")


@dataclass(frozen=True, slots=True)
class UserContext:
    """Immutable identity and scope of one unit of work. Build it with `create`."""

    user_id: str
    request_id: str | None = None
    thread_id: str | None = None
    run_id: str | None = None
    connection_id: str | None = None

    @classmethod
    def create(
        cls,
        user_id: str,
        *,
        request_id: str | None = None,
        thread_id: str | None = None,
        run_id: str | None = None,
        connection_id: str | None = None,
    ) -> UserContext:
        """Validate every id and build the context; raise `InvalidContextError` on a bad one."""
        _check_id("user_id", user_id, IdPrefix.USER, required=True)
        _check_id("thread_id", thread_id, IdPrefix.THREAD, required=False)
        _check_id("run_id", run_id, IdPrefix.RUN, required=False)
        _check_token("request_id", request_id)
        _check_token("connection_id", connection_id)
        return cls(user_id, request_id, thread_id, run_id, connection_id)

    def for_thread(self, thread_id: str) -> UserContext:
        _check_id("thread_id", thread_id, IdPrefix.THREAD, required=True)
        return replace(self, thread_id=thread_id)

    def for_run(self, run_id: str, *, thread_id: str) -> UserContext:
        _check_id("run_id", run_id, IdPrefix.RUN, required=True)
        _check_id("thread_id", thread_id, IdPrefix.THREAD, required=True)
        return replace(self, run_id=run_id, thread_id=thread_id)
