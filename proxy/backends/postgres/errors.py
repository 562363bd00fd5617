"""Driver errors as the proxy's error hierarchy: sqlstates, the DP00x codes the helper
functions raise, connection failures; no SQL or driver text leaves this module."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from proxy.backends.migrations import declared_index_name
from proxy.backends.postgres.pool import CONNECTION_ERRORS
from proxy.errors import (
    BadRequest,
    Conflict,
    DatabaseTimeout,
    DuplicateId,
    DuplicateKey,
    InternalError,
    InvalidQuery,
    LimitExceeded,
    NumberOutOfRange,
    ProxyError,
    Timeout,
    Unavailable,
)
from proxy.tls import tls_failure

log = logging.getLogger(__name__)

# codes dbproxy_refuse() may raise
_REFUSALS = frozenset({"array_index_too_large", "expression_failed", "result_too_large"})
MISSING_RETRY_AFTER = 5.0  # seconds: a missing database is a configuration problem
REFUSED_RETRY_AFTER = 2.0  # seconds: refused credentials or TLS wait for a rotation or a fix


def no_answer() -> DatabaseTimeout:
    return DatabaseTimeout("the database did not answer within the request's deadline")


def translate(exc: BaseException) -> ProxyError:
    """Map a driver exception to a client-facing error (retryable or not)."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        return Timeout("the statement took longer than the configured timeout")
    if isinstance(exc, asyncio.TimeoutError):  # the client gave up: the server never answered
        return no_answer()
    if isinstance(
        exc, asyncpg.exceptions.SerializationError | asyncpg.exceptions.DeadlockDetectedError
    ):
        return Conflict(
            "the transaction conflicted with a concurrent one; retry it",
            code="serialization_failure",
            retryable=True,
        )
    if isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        index = declared_index_name(getattr(exc, "constraint_name", None))
        if index is not None:  # a declared unique index (proxy.backends.migrations)
            return DuplicateKey(
                f"the unique index {index!r} already holds this value", details={"index": index}
            )
        return DuplicateId("a document with this _id already exists")
    refused = connection_refused(exc)
    if refused is not None:
        return refused
    if isinstance(exc, CONNECTION_ERRORS):
        return Unavailable("the database is not reachable", retry_after=1)
    if isinstance(exc, asyncpg.PostgresError):
        return _translate_sqlstate(exc)
    return InternalError("unexpected error while talking to the database")


def _refused(message: str, reason: str) -> Unavailable:
    return Unavailable(message, details={"reason": reason}, retry_after=REFUSED_RETRY_AFTER)


def connection_refused(exc: BaseException) -> Unavailable | None:
    """A connection the server (or its certificate) refused: credentials, pg_hba.conf, TLS.
    Always ``503 database_unavailable`` (retryable: a rotated secret or a fixed server
    heals it), ``details.reason`` naming the cause; None for any other failure."""
    if isinstance(exc, asyncpg.exceptions.InvalidPasswordError):
        return _refused(
            "the database refused the credentials (password authentication failed)",
            "authentication_failed",
        )
    if isinstance(exc, asyncpg.exceptions.InvalidAuthorizationSpecificationError):
        if "no encryption" in str(exc):
            return _refused(
                "the database requires TLS for this connection (set sslmode=require or "
                "stronger in the connection string)",
                "tls_required",
            )
        return _refused(
            "the database refused the connection (no pg_hba.conf rule admits this user, "
            "host and database, or the role may not log in)",
            "authentication_failed",
        )
    tls = tls_failure(exc)
    if tls is not None:
        return _refused(f"TLS to the database failed: {tls}", "tls_failed")
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        return _refused(
            "the database server does not offer TLS, which the connection string's sslmode "
            "requires",
            "tls_not_offered",
        )
    return None


def dsn_database(dsn: str) -> str | None:
    """The database a ``postgresql://`` URL names (path, or ``dbname``/``database``), for
    messages; None when it names none (then libpq's default, the user name, applies)."""
    parts = urlsplit(dsn)
    name = unquote(parts.path.lstrip("/"))
    if not name:
        query = parse_qs(parts.query)
        name = (query.get("dbname") or query.get("database") or [""])[0]
    name = name[:63]
    return name if name and name.isprintable() else None


def _translate_sqlstate(exc: asyncpg.PostgresError) -> ProxyError:
    state = getattr(exc, "sqlstate", "") or ""
    if state == "DP002":  # raised by dbproxy_number inside the update statement
        return NumberOutOfRange(getattr(exc, "message", "") or "a number is out of range")
    if state == "DP003" and getattr(exc, "detail", None) in _REFUSALS:  # dbproxy_refuse
        return InvalidQuery(getattr(exc, "message", "") or "refused", code=exc.detail)
    if state == "DP001":
        return InvalidQuery(
            f"the update does not fit the stored document: {getattr(exc, 'message', '')}",
            code="update_type_mismatch",
        )
    routed_null = state == "23514" and str(getattr(exc, "detail", "")).endswith("= (null).")
    if routed_null or (state == "23502" and getattr(exc, "column_name", None) == "_pkey"):
        return BadRequest(
            "the document has no partition key of the declared kind (the collection is "
            "partitioned by it)",
            code="partition_key_missing",
        )
    if state == "23514" and not getattr(exc, "constraint_name", None):
        return BadRequest(
            "no partition holds this document's partition key (outside every declared "
            "value or bound)",
            code="partition_key_out_of_range",
        )
    if state == "DP010":  # the collection's table is frozen by partition_collection
        return Unavailable(
            "the collection is being partitioned: writes resume when the copy is done",
            code="collection_being_partitioned",
            retry_after=5,
        )
    if state == "2201B":
        return InvalidQuery("invalid regular expression", code="invalid_regex")
    if state in ("22P02", "22023"):
        return InvalidQuery(
            "the operation does not fit the stored document's structure",
            code="update_type_mismatch",
        )
    if state == "22P05":
        return InvalidQuery("strings may not contain the NUL character", code="invalid_value")
    if state.startswith("22"):
        return InvalidQuery("a value is out of range for the database", code="invalid_value")
    if state.startswith("54"):
        return LimitExceeded("the request is too complex for the database", code="too_complex")
    if state.startswith("53") or state.startswith("57P"):
        return Unavailable("the database is overloaded or shutting down", retry_after=1)
    if state == "3D000":
        return Unavailable("the database does not exist", retry_after=MISSING_RETRY_AFTER)
    log.error("unexpected database error sqlstate=%s type=%s", state, type(exc).__name__)
    return InternalError("unexpected database error")
