"""What the client raises: the API's own error, or a failure to reach the API at all."""

from __future__ import annotations

import httpx

from threadline.errors import ThreadlineError


class APIError(ThreadlineError):
    """The API answered with an error (`{"error": {"code", "message"}}`).

    Attributes:
        code: The API's stable error code (`thread_not_found`, `rate_limited`, ...).
        status: The HTTP status (401, 404, 409, 422, 429, ...); for an error sent over the
            WebSocket, the status the same error has over HTTP.
        retry_after: Seconds to wait before retrying, from `Retry-After` (429 only).
    """

    def __init__(
        self, message: str, *, code: str, status: int, retry_after: float | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIError:
        """Read the error body; a body that is not the API's (a proxy's HTML page) still
        gives an error with `http_<status>` as its code."""
        code, message = f"http_{response.status_code}", response.reason_phrase
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = str(error.get("code", code))
            message = str(error.get("message", message))
        elif response.text:
            message = response.text[:200]
        return cls(
            message,
            code=code,
            status=response.status_code,
            retry_after=_seconds(response.headers.get("retry-after")),
        )


class APIConnectionError(ThreadlineError):
    """The API could not be reached, or did not answer in time (after any retries)."""

    code = "connection_error"


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None  # an HTTP date: Threadline sends seconds, a proxy might not
