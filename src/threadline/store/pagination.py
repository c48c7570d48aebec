"""Cursors and pages shared by every list."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from threadline.errors import InvalidInputError
from threadline.ids import IdPrefix

T = TypeVar("T")

MAX_PAGE_SIZE = 200


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: Sequence[T]
    next_cursor: str | None


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInputError(
            f"limit must be between 1 and {MAX_PAGE_SIZE}", code="invalid_limit", field="limit"
        )
    return limit


# Keyset cursors in plain text, each described by a pattern that the OpenAPI document states:
# every string the pattern matches is a valid cursor (a place in the list's order, perhaps
# between two rows or past the end), so a client, or a fuzzer, that follows the document is
# never refused. Clients should still treat them as opaque and pass `next_cursor` back.
_ULID = "[0-7][0-9A-HJKMNP-TV-Z]{25}"
_MAX_POSITION = 2**31 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
POSITION_CURSOR = r"^[0-9]{1,10}$"
"""A message position (the last one of the page)."""


def id_cursor_pattern(prefix: IdPrefix) -> str:
    """An id (the last one of the page), for lists ordered by id."""
    return rf"^{prefix.value}_{_ULID}$"


def time_id_cursor_pattern(prefix: IdPrefix) -> str:
    """`<microseconds since 1970>.<id>`, for lists ordered by a time, then id."""
    return rf"^[0-9]{{1,16}}\.{prefix.value}_{_ULID}$"


def _malformed() -> InvalidInputError:
    return InvalidInputError("Malformed cursor", code="invalid_cursor", field="cursor")


def position_cursor(position: int) -> str:
    return str(position)


def parse_position_cursor(cursor: str) -> int:
    if re.fullmatch(POSITION_CURSOR, cursor) is None:
        raise _malformed()
    return min(int(cursor), _MAX_POSITION)  # past every position: an empty page, not an error


def parse_id_cursor(cursor: str, prefix: IdPrefix) -> str:
    if re.fullmatch(id_cursor_pattern(prefix), cursor) is None:
        raise _malformed()
    return cursor


def time_id_cursor(moment: datetime, row_id: str) -> str:
    return f"{(moment - _EPOCH) // _MICROSECOND}.{row_id}"


def parse_time_id_cursor(cursor: str, prefix: IdPrefix) -> tuple[datetime, str]:
    if re.fullmatch(time_id_cursor_pattern(prefix), cursor) is None:
        raise _malformed()
    micros, _, row_id = cursor.partition(".")
    return _EPOCH + int(micros) * _MICROSECOND, row_id
