"""The one place domain errors become HTTP responses: `{"error": {"code", "message"}}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from threadline.agents.errors import UnknownAgentError
from threadline.api.openapi import allowed_methods
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
from threadline.store.db import DatabaseUnavailableError
from threadline.store.failures import DATABASE_ERRORS, is_database_unavailable

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
    (DatabaseUnavailableError, 503),
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


# Parameters whose malformed values have had their own codes since before FastAPI checked their
# patterns.
_CODE_BY_PARAMETER = {
    ("query", "cursor"): "invalid_cursor",
    ("header", "last-event-id"): "invalid_cursor",
    ("header", "if-match"): "invalid_if_match",
}
# FastAPI's words for a body it could not decode at all (bytes that are not UTF-8 JSON).
_UNPARSABLE_BODY = "There was an error parsing the body"


def _body_problem(request: Request, errors: list[dict[str, Any]]) -> JSONResponse | None:
    """A clear answer when the body as a whole is the problem: not JSON, not sent as JSON,
    missing, or not an object. None when the problem is in its fields."""
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "json_invalid":
            where = f" (at character {loc[1]})" if len(loc) > 1 else ""
            detail = (error.get("ctx") or {}).get("error", "")
            return error_response(
                400, "invalid_json", f"The request body is not valid JSON{where}: {detail}"
            )
        if loc != ("body",):
            continue
        content_type = request.headers.get("content-type", "")
        if error.get("type") == "missing":
            return error_response(422, "body_required", "This request needs a JSON object body")
        if "json" not in content_type.lower():
            return error_response(
                415,
                "unsupported_media_type",
                "Send the body as JSON, with the header Content-Type: application/json",
            )
        return error_response(422, "validation_error", "The request body must be a JSON object")
    return None


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):  # pragma: no cover
        raise exc
    errors = list(exc.errors())
    body_problem = _body_problem(request, errors)
    if body_problem is not None:
        return body_problem
    code = next(
        (
            _CODE_BY_PARAMETER[loc]
            for e in errors
            if (loc := tuple(e.get("loc", ()))) in _CODE_BY_PARAMETER
        ),
        "validation_error",
    )
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where}: {error.get('msg', 'invalid')}" if where else error["msg"])
    return error_response(422, code, "; ".join(problems) or "Invalid request")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):  # pragma: no cover
        raise exc
    if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:
        return error_response(400, "invalid_json", "The request body is not valid UTF-8 JSON")
    code = _CODE_BY_STATUS.get(exc.status_code, f"http_{exc.status_code}")
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 405:
        # Starlette names only the methods of the first route on the path.
        methods = allowed_methods(request.app.router.routes, request.url.path)
        headers["Allow"] = ", ".join(methods) or headers.get("Allow", "")
    return error_response(exc.status_code, code, str(exc.detail), headers=headers or None)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A lost or refused database connection is a 503 the client may retry, never a 500;
    the pool replaces the dead connection by itself. Other database errors are bugs."""
    if not is_database_unavailable(exc):
        return await _unexpected_error(request, exc)
    logger.warning("Database unavailable: %s: %s", type(exc).__name__, exc)
    return error_response(
        503,
        "database_unavailable",
        "The database is unavailable; retry shortly",
        headers={"Retry-After": "1"},
    )


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("Unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "Internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ThreadlineError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for error_type in DATABASE_ERRORS:
        app.add_exception_handler(error_type, _database_error)
    app.add_exception_handler(Exception, _unexpected_error)
