"""The one error hierarchy of dbproxy: every failure a client can see, with status and code."""

from __future__ import annotations

from typing import Any


class ProxyError(Exception):
    """Base of every error that reaches a client.

    ``status`` is the HTTP status, ``code`` a stable snake_case identifier that clients may
    branch on, ``message`` a human sentence that never contains SQL or driver text.
    ``retryable`` tells the client whether the same request may succeed later.
    """

    status: int = 500
    code: str = "internal_error"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
        retryable: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or {}
        self.retry_after = retry_after
        self.headers = headers or {}
        if retryable is not None:
            self.retryable = retryable

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        if self.retryable:
            body["retryable"] = True
        return body


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"


class InvalidJson(BadRequest):
    code = "invalid_json"


class InvalidCollection(BadRequest):
    code = "invalid_collection_name"


class InvalidQuery(BadRequest):
    """A filter, sort, projection or update the language does not accept."""

    code = "invalid_query"


class ForbiddenOperator(InvalidQuery):
    code = "forbidden_operator"


class LimitExceeded(BadRequest):
    """A request that is well-formed but larger than a configured limit."""

    code = "limit_exceeded"


class NumberOutOfRange(BadRequest):
    """A number dbproxy cannot store unchanged: an integer outside signed 64 bits, a number
    beyond double range, or an update whose result would be one."""

    code = "number_out_of_range"


class UnsupportedByBackend(BadRequest):
    code = "unsupported_by_backend"


class Unauthorized(ProxyError):
    status = 401
    code = "unauthorized"


class Forbidden(ProxyError):
    status = 403
    code = "forbidden"


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"


class Conflict(ProxyError):
    status = 409
    code = "conflict"


class DuplicateId(Conflict):
    code = "duplicate_id"


class DuplicateKey(Conflict):
    """A unique index refused the write (``details.index`` names it)."""

    code = "duplicate_key"


class SchemaViolation(BadRequest):
    """A write the collection's schema refuses: ``details.problems`` lists every problem
    (``path``, ``rule``, ``message``); nothing was written."""

    code = "schema_violation"


class PreconditionFailed(ProxyError):
    status = 412
    code = "precondition_failed"


class PayloadTooLarge(ProxyError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(ProxyError):
    """The client did not send its request's headers or body in time."""

    status = 408
    code = "request_timeout"


class UnsupportedMediaType(ProxyError):
    status = 415
    code = "unsupported_media_type"


class Unprocessable(ProxyError):
    status = 422
    code = "unprocessable"


class RateLimited(ProxyError):
    status = 429
    code = "rate_limited"
    retryable = True


class Unavailable(ProxyError):
    """The database (or a resource in front of it) cannot take the request now."""

    status = 503
    code = "database_unavailable"
    retryable = True


class PoolExhausted(Unavailable):
    code = "pool_exhausted"


class TooManyConnections(Unavailable):
    """The sidecar holds as many client connections as it is configured to."""

    code = "too_many_connections"


class Timeout(ProxyError):
    status = 504
    code = "statement_timeout"
    retryable = True


class DatabaseTimeout(Timeout):
    """The database did not answer within the request's deadline (nothing was written)."""

    code = "database_timeout"


class InternalError(ProxyError):
    status = 500
    code = "internal_error"


class CommitOutcomeUnknown(ProxyError):
    """The connection was lost after COMMIT was sent: the write may or may not be durable."""

    status = 502
    code = "commit_outcome_unknown"


class ConfigError(Exception):
    """A configuration (file, flags, environment) with one or more problems, all listed."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
