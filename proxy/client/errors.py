"""The client's errors: one class per HTTP status family, built from the error envelope."""

from __future__ import annotations

from typing import Any


class DbProxyError(Exception):
    """A dbproxy error answer: ``status``, stable ``code``, ``retryable``, ``request_id``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        request_id: str | None = None,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable
        self.request_id = request_id
        self.details = details or {}
        self.retry_after = retry_after


class BadRequest(DbProxyError):
    """400 (and other 4xx without a class of their own)."""


class Unauthorized(DbProxyError):
    """401."""


class Forbidden(DbProxyError):
    """403."""


class NotFound(DbProxyError):
    """404."""


class Conflict(DbProxyError):
    """409 (``retryable`` for serialization failures and write conflicts)."""


class PreconditionFailed(DbProxyError):
    """412: If-Match or If-None-Match did not hold."""


class PayloadTooLarge(DbProxyError):
    """413."""


class Unprocessable(DbProxyError):
    """422: an Idempotency-Key reused with another request."""


class RateLimited(DbProxyError):
    """429."""


class ServerError(DbProxyError):
    """500 and other 5xx without a class of their own."""


class CommitOutcomeUnknown(DbProxyError):
    """502: the write may or may not have happened; read before retrying."""


class Unavailable(DbProxyError):
    """503."""


class Timeout(DbProxyError):
    """504."""


BY_STATUS: dict[int, type[DbProxyError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    413: PayloadTooLarge,
    422: Unprocessable,
    429: RateLimited,
    500: ServerError,
    502: CommitOutcomeUnknown,
    503: Unavailable,
    504: Timeout,
}
RETRYABLE_STATUSES = frozenset({429, 503})


def from_response(status: int, body: Any, headers: Any) -> DbProxyError:
    """The error of an answer (``body``: its parsed JSON, or None when it was not JSON)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"code": "http_error", "message": f"HTTP {status}"}
    kind = BY_STATUS.get(status) or (ServerError if status >= 500 else BadRequest)
    raw_after = headers.get("Retry-After")
    try:
        retry_after = float(raw_after) if raw_after is not None else None
    except ValueError:
        retry_after = None
    return kind(
        status,
        str(error.get("code", "http_error")),
        str(error.get("message", "")),
        retryable=bool(error.get("retryable")) or status in RETRYABLE_STATUSES,
        request_id=error.get("request_id") or headers.get("X-Request-Id"),
        details=error.get("details") if isinstance(error.get("details"), dict) else None,
        retry_after=retry_after,
    )
