"""The one place domain errors become HTTP responses: `{"error": {"code", "message"}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from threadline.agents.errors import UnknownAgentError
from threadline.auth.revocation import RevocationUnavailableError
from threadline.errors import (
    AuthError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    ThreadlineError,
)
from threadline.llm.providers import UnknownModelError
from threadline.runs.engine import RunLimitError

logger = logging.getLogger(__name__)

_STATUS_BY_ERROR: tuple[tuple[type[ThreadlineError], int], ...] = (
    (UnknownAgentError, 422),
    (UnknownModelError, 422),
    (RunLimitError, 429),
    (NotFoundError, 404),
    (ConflictError, 409),
    (InvalidInputError, 422),
    (PayloadTooLargeError, 413),
    (RateLimitedError, 429),
    (AuthError, 401),
    (RevocationUnavailableError, 503),
)
_CODE_BY_STATUS = {
    400: "bad_request",
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def error_response(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def status_for(error: ThreadlineError) -> int:
    for error_type, status in _STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return status
    return getattr(error, "http_status", 400)


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ThreadlineError):  # pragma: no cover - registered for this type only
        raise exc
    headers: dict[str, str] = {}
    if isinstance(exc, RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after_seconds)
    if isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, RevocationUnavailableError):
        headers["Retry-After"] = str(exc.retry_after_seconds)
        logger.warning("Token check unavailable: %s", exc.cause)
    return error_response(status_for(exc), exc.code, exc.message, headers=headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):  # pragma: no cover
        raise exc
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where}: {error.get('msg', 'invalid')}" if where else error["msg"])
    return error_response(422, "validation_error", "; ".join(problems) or "Invalid request")


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):  # pragma: no cover
        raise exc
    code = _CODE_BY_STATUS.get(exc.status_code, f"http_{exc.status_code}")
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, code, str(exc.detail), headers=headers)


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("Unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "Internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ThreadlineError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
