"""Domain errors. Stores, engines and services raise these; `api/errors.py` maps them to HTTP.

Every error has a stable `code` that clients can switch on. Three families stay apart:
- errors the caller caused (not found, conflict, invalid input, auth),
- errors that end a run (model provider failure, limits, cancellation), defined beside the
  code that raises them,
- developer misuse (bad agent or tool declarations), which fail at start-up.
"""

from __future__ import annotations


class ThreadlineError(Exception):
    """Root of every error Threadline raises on purpose."""

    code: str = "threadline_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NotFoundError(ThreadlineError):
    """The resource does not exist *for this user*: another user's data looks exactly the same."""

    def __init__(self, resource: str, resource_id: str | None = None) -> None:
        super().__init__(f"{resource.capitalize()} not found", code=f"{resource}_not_found")
        self.resource = resource
        self.resource_id = resource_id


class ConflictError(ThreadlineError):
    """The request is well-formed but conflicts with the resource's current state."""

    code = "conflict"


class InvalidInputError(ThreadlineError):
    """Input that passed schema validation but breaks a domain rule."""

    code = "invalid_input"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message, code=code)
        self.field = field


class PayloadTooLargeError(ThreadlineError):
    code = "payload_too_large"


class RateLimitedError(ThreadlineError):
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class AuthError(ThreadlineError):
    """Authentication failed. Each cause has its own code; all map to 401."""

    code = "not_authenticated"


class ForbiddenError(ThreadlineError):
    """Authenticated, but not allowed to do this (a missing scope, a disabled account)."""

    code = "forbidden"
    http_status = 403


class ConfigurationError(ThreadlineError):
    """Settings that cannot work. Raised at start-up and names the setting."""

    code = "configuration_error"

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
