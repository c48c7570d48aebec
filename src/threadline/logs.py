"""Structured logs that carry the request, user, thread and run ids of the work in progress.

The ids ride in context variables, set where the work starts (a request, a claimed run), so
every log line below picks them up without being passed them. Tokens and passwords are never
put in a log record by Threadline, and `redact` masks any that another library's line carries
(a bearer header, a `token=` query parameter in an access-log line).

One format for every line, Threadline's, uvicorn's (its access log included) and any other
library's: readable text (`text`) or one JSON object a line (`json`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

from threadline.context import UserContext

_current: ContextVar[UserContext | None] = ContextVar("threadline_context", default=None)
_request_id: ContextVar[str | None] = ContextVar("threadline_request_id", default=None)
# The thread and run a request's path names (before, or without, a user context).
_path_ids: ContextVar[dict[str, str] | None] = ContextVar("threadline_path_ids", default=None)
_FIELDS = ("request_id", "user_id", "thread_id", "run_id", "connection_id")
_SECRETS = re.compile(
    r"(?i)(bearer[ .]|(?:access_token|token|password|secret|api_key)=)[^\s&\"',;]+"
)
# Loggers that get the configured level; other libraries' loggers log warnings and worse.
_OWN_LOGGERS = ("threadline", "uvicorn")


def redact(text: str) -> str:
    """`text` with anything that looks like a bearer token or secret parameter masked."""
    return _SECRETS.sub(lambda match: f"{match.group(1)}***", text)


def set_request_id(request_id: str, **path_ids: str) -> None:
    """Set at the start of a request: its id, and the `thread_id` / `run_id` its path names."""
    _request_id.set(request_id)
    _path_ids.set(path_ids)


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
            if value is None:
                value = (_path_ids.get() or {}).get(name)
            setattr(record, name, value)
        return True


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """`2026-01-01T00:00:00.000+00:00 INFO uvicorn.access: message request_id=…`."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        ids = " ".join(
            f"{name}={value}"
            for name in _FIELDS
            if (value := getattr(record, name, None)) is not None
        )
        if ids:
            line = f"{line}  {ids}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return redact(line)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    """One handler, on the root logger, for every line of the process. Threadline's and
    uvicorn's loggers log at `level`; other libraries' at WARNING unless `level` is higher.
    (Run uvicorn with `log_config=None` so that it leaves its loggers to this.)"""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JSONFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric = logging.getLevelName(level.upper())
    root.setLevel(max(numeric, logging.WARNING))
    for name in _OWN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(numeric)
        logger.propagate = True
    for name in ("uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
