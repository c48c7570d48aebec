"""Prefixed, time-sortable ids: `thr_01JD3…` (a prefix, then a 26-character ULID).

A ULID is 48 bits of millisecond timestamp then 80 random bits, in Crockford base32, so ids sort
by creation time as plain strings and need no coordination between processes. Within one process
ids are also strictly increasing: inside the same millisecond the random part is incremented
rather than redrawn (the ULID spec's monotonic mode), so two messages created back to back keep
their order. Across processes, ids created in the same millisecond order arbitrarily; the
stores never rely on id order for anything a user could see reordered (messages carry a position).
"""

from __future__ import annotations

import os
import re
import threading
import time
from enum import StrEnum

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}
_ULID_RE = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")
_RANDOM_BITS = 80
_RANDOM_MAX = (1 << _RANDOM_BITS) - 1


class IdPrefix(StrEnum):
    USER = "usr"
    THREAD = "thr"
    MESSAGE = "msg"
    RUN = "run"
    EVENT = "evt"
    SERVICE_KEY = "key"
    WEBHOOK = "whk"
    WEBHOOK_DELIVERY = "dlv"


class _MonotonicULID:
    """Generates ULIDs that strictly increase within this process, across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0
        self._pid = os.getpid()

    def new(self) -> str:
        with self._lock:
            if os.getpid() != self._pid:
                # A forked child must not continue the parent's sequence.
                self._pid, self._last_ms = os.getpid(), -1
            now_ms = time.time_ns() // 1_000_000
            if now_ms <= self._last_ms and self._last_random < _RANDOM_MAX:
                now_ms = self._last_ms
                rand = self._last_random + 1
            else:
                now_ms = max(now_ms, self._last_ms + 1) if now_ms <= self._last_ms else now_ms
                # Keep the top bit clear so increments have room before overflowing.
                rand = int.from_bytes(os.urandom(10), "big") >> 1
            self._last_ms, self._last_random = now_ms, rand
        return _encode((now_ms << _RANDOM_BITS) | rand)


def _encode(value: int) -> str:
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


_generator = _MonotonicULID()


def new_id(prefix: IdPrefix) -> str:
    return f"{prefix.value}_{_generator.new()}"


def is_valid_id(value: object, prefix: IdPrefix) -> bool:
    if not isinstance(value, str) or len(value) != len(prefix.value) + 27:
        return False
    head, sep, body = value.partition("_")
    return sep == "_" and head == prefix.value and _ULID_RE.match(body) is not None


def id_timestamp_ms(value: str) -> int:
    """The creation time, in milliseconds since the epoch, encoded in a valid id."""
    body = value.partition("_")[2]
    ms = 0
    for char in body[:10]:
        ms = (ms << 5) | _DECODE[char]
    return ms
