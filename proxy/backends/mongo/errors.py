"""Driver errors of the MongoDB backend translated into the error hierarchy of ``proxy.errors``;
no driver or server text leaves this module."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from pymongo import errors as pe

from proxy.backends.migrations import declared_index_name
from proxy.errors import (
    CommitOutcomeUnknown,
    Conflict,
    DatabaseTimeout,
    DuplicateId,
    DuplicateKey,
    InternalError,
    InvalidQuery,
    LimitExceeded,
    NumberOutOfRange,
    ProxyError,
    SchemaViolation,
    Timeout,
    Unavailable,
)
from proxy.numbers import INT64_MAX, INT64_MIN

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
WRITE_CONFLICT = 112
VALIDATION_FAILED = 121
# an update that cannot apply to the stored document (MongoDB's codes)
_UPDATE_REFUSED = {2, 9, 14, 16837, 28, 40, 54, 55, 56, 57, 4772600, 6, 17261}
_TIME_LIMIT = {50, 262}  # MaxTimeMSExpired, ExceededTimeLimit
_TOO_LARGE = {10334, 17419, 17420, 10}
_REGEX = {51091, 51108, 51107}


def write_conflict() -> Conflict:
    return Conflict(
        "another transaction changed the same document at the same time; retry",
        code="write_conflict",
        retryable=True,
    )


def duplicate(details: Mapping[str, Any] | None) -> Conflict:
    """A duplicate key: on ``_id`` a DuplicateId, on a declared unique index a DuplicateKey."""
    pattern = (details or {}).get("keyPattern") or {}
    if not pattern or "_id" in pattern:
        return DuplicateId("a document with this _id already exists")
    index = declared_index_name(str((details or {}).get("indexName") or ""))
    if index is None:  # SecantusDB names it only in errmsg ("... index: NAME dup key")
        found = _INDEX_IN_MESSAGE.search(str((details or {}).get("errmsg") or ""))
        index = declared_index_name(found.group(1)) if found else None
    if index is None:
        keys = [k for k in pattern if k != "_id"]
        index = "_".join(keys) or "unique"
    return DuplicateKey(
        f"the unique index {index!r} already holds this value", details={"index": index}
    )


_INDEX_IN_MESSAGE = re.compile(r"index: ([A-Za-z0-9_]+) dup key")
_SSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]([^(\]]*)")
_CERT_REASONS = frozenset({"CERTIFICATE_VERIFY_FAILED"})


def unreachable(exc: pe.PyMongoError) -> Unavailable:
    """The server could not be reached: ``details.reason`` is ``tls_failed`` (with OpenSSL's
    reason, which names no secret) when the TLS handshake failed, else ``connection_failed``.
    The driver's own text (its topology description) is not passed on."""
    found = _SSL_REASON.search(str(exc))
    if found is not None:
        code, text = found.group(1), found.group(2).strip(" :")[:160]
        what = (
            "the server's TLS certificate was refused"
            if code in _CERT_REASONS
            else ("the TLS handshake failed")
        )
        return Unavailable(
            f"TLS to the database failed: {what}: {text or code.lower()}",
            details={"reason": "tls_failed"},
            retry_after=1,
        )
    return Unavailable(
        "the database is not reachable", details={"reason": "connection_failed"}, retry_after=1
    )


def translate(
    exc: BaseException, *, committing: bool = False, updating: bool = False
) -> ProxyError:
    """Map a driver exception to a client-facing error (retryable or not)."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, pe.PyMongoError):
        if committing and exc.has_error_label("UnknownTransactionCommitResult"):
            return CommitOutcomeUnknown(
                "the connection was lost while committing; the transaction may or may not "
                "have been applied"
            )
        if exc.has_error_label("TransientTransactionError") and not isinstance(
            exc, pe.ConnectionFailure
        ):
            return write_conflict()
    if isinstance(exc, pe.DuplicateKeyError):
        return duplicate(exc.details)
    if isinstance(exc, pe.ExecutionTimeout | pe.WTimeoutError):
        return Timeout("the statement took longer than the configured timeout")
    if isinstance(exc, pe.NetworkTimeout):
        return DatabaseTimeout("the database did not answer within the request's deadline")
    if isinstance(exc, pe.ConnectionFailure | pe.ServerSelectionTimeoutError):
        return unreachable(exc)
    if isinstance(exc, pe.DocumentTooLarge):
        return LimitExceeded("the document is too large for the database", code="too_large")
    if isinstance(exc, pe.OperationFailure):
        return _by_code(exc, updating)
    log.error("unexpected error from MongoDB: %s", type(exc).__name__)
    return InternalError("unexpected error while talking to the database")


def _by_code(exc: pe.OperationFailure, updating: bool) -> ProxyError:
    code = exc.code or 0
    if code == DUPLICATE_KEY:
        return duplicate(exc.details)
    if code == WRITE_CONFLICT:
        return write_conflict()
    if code == VALIDATION_FAILED:  # the server's $jsonSchema (the sidecar checks first)
        return SchemaViolation(
            "the database's schema validator refused the document",
            details={"problems": [{"path": "", "rule": "$jsonSchema", "message": "refused"}]},
        )
    if code in _TIME_LIMIT:
        return Timeout("the statement took longer than the configured timeout")
    if code in _REGEX:
        return InvalidQuery("invalid regular expression", code="invalid_regex")
    if code in _TOO_LARGE:
        return LimitExceeded("the request is too large for the database", code="too_large")
    message = str((exc.details or {}).get("errmsg", "")).lower()
    if updating and ("overflow" in message or "failed to apply $" in message):
        # an $inc or $mul whose integer result is past 64 bits (the text is never echoed)
        return NumberOutOfRange(
            f"the integer result of an $inc or $mul does not fit in signed 64 bits "
            f"({INT64_MIN} to {INT64_MAX})",
            details={"min": INT64_MIN, "max": INT64_MAX},
        )
    if code in _UPDATE_REFUSED and not updating:
        return InvalidQuery("the database refused the query", code="invalid_query")
    if code in _UPDATE_REFUSED:
        return InvalidQuery(
            "the update does not apply to the stored document (a type mismatch)",
            code="update_type_mismatch",
        )
    if code in (91, 189, 11600, 11602, 13435, 13436):  # shutting down, not primary
        return Unavailable("the database is shutting down or not primary", retry_after=1)
    log.error("unexpected MongoDB error code %s (%s)", code, type(exc).__name__)
    return InternalError("unexpected database error")
