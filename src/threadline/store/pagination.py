"""Opaque cursors and pages shared by every list."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from threadline.errors import InvalidInputError

T = TypeVar("T")

MAX_PAGE_SIZE = 200


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: Sequence[T]
    next_cursor: str | None


def encode_cursor(*values: str | int) -> str:
    raw = json.dumps(list(values), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, *, arity: int) -> list[str | int]:
    """Decode a cursor made by `encode_cursor`; anything else is a 422 `invalid_cursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInputError("Malformed cursor", code="invalid_cursor", field="cursor") from exc
    if (
        not isinstance(values, list)
        or len(values) != arity
        or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values)
    ):
        raise InvalidInputError("Malformed cursor", code="invalid_cursor", field="cursor")
    return values


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInputError(
            f"limit must be between 1 and {MAX_PAGE_SIZE}", code="invalid_limit", field="limit"
        )
    return limit
