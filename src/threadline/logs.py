"""Structured logs that carry the request, user, thread and run ids of the work in progress.

The ids ride in context variables, set where the work starts (a request, a claimed run), so
every log line below picks them up without being passed them. Tokens and passwords are never
put in a log record.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

from threadline.context import UserContext

_current: ContextVar[UserContext | None] = ContextVar("threadline_context", default=None)
_request_id: ContextVar[str | None] = ContextVar("threadline_request_id", default=None)
_FIELDS = ("request_id", "user_id", "thread_id", "run_id", "connection_id")


def set_request_id(request_id: str) -> None:
    _request_id.set(request_id)


def bind_context(ctx: UserContext) -> None:
    _current.set(ctx)


@contextmanager
def bound(ctx: UserContext) -> Iterator[None]:
    token = _current.set(ctx)
    try:
        yield
    finally:
        _current.reset(token)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current.get()
        for name in _FIELDS:
            value = getattr(ctx, name, None) if ctx else None
            if name == "request_id" and value is None:
                value = _request_id.get()
            setattr(record, name, value)
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if json_lines:
        handler.setFormatter(JSONFormatter())
    root = logging.getLogger("threadline")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
