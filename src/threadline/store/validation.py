"""Input rules that hold on every backend, checked before anything is written.

PostgreSQL cannot store NUL characters in text, and JSON has no NaN or Infinity (Python's
parser accepts them). Rejecting both here keeps SQLite and PostgreSQL behaving the same and
turns what would be a database error into a 422 with a clear code.
"""

from __future__ import annotations

import json

from threadline.errors import InvalidInputError

JSONObject = dict[str, object]
INT64_MAX = 2**63 - 1


def check_text(value: str, *, field: str) -> str:
    if "\x00" in value:
        raise InvalidInputError(
            f"{field} must not contain NUL characters", code="invalid_text", field=field
        )
    return value


def json_size(value: JSONObject, *, field: str) -> int:
    """Bytes of `value` as compact JSON; refuses NaN, Infinity and NUL characters."""
    try:
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise InvalidInputError(
            f"{field} must be valid JSON (no NaN or Infinity)", code="invalid_json", field=field
        ) from exc
    _check_strings(value, field=field)
    return len(encoded.encode())


def _check_strings(value: object, *, field: str) -> None:
    """NUL in any key or string value (the JSON text itself shows them escaped)."""
    if isinstance(value, str):
        check_text(value, field=field)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(str(key), field=field)
            _check_strings(item, field=field)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item, field=field)
