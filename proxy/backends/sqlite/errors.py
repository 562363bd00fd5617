"""Driver errors of the SQLite store translated into the error hierarchy of ``proxy.errors``."""

from __future__ import annotations

import logging
import re
import sqlite3

from proxy.backends.migrations import declared_index_name
from proxy.backends.sqlite.connection import ConnState
from proxy.errors import (
    Conflict,
    DuplicateId,
    DuplicateKey,
    InternalError,
    InvalidQuery,
    LimitExceeded,
    ProxyError,
    Timeout,
    Unavailable,
)

log = logging.getLogger(__name__)

_UNIQUE_INDEX = re.compile(r"UNIQUE constraint failed: index '([A-Za-z0-9_]+)'")
_TOO_COMPLEX = ("parser stack overflow", "too many", "too large", "too deep")


def translate(exc: BaseException, state: ConnState | None = None) -> ProxyError:
    """Map a driver exception to a client-facing error (retryable or not)."""
    if isinstance(exc, ProxyError):
        return exc
    if state is not None and state.failure is not None:
        return state.failure
    if isinstance(exc, OverflowError):
        return InvalidQuery("a number is out of range for the database", code="invalid_value")
    if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc):
        found = _UNIQUE_INDEX.search(str(exc))
        index = declared_index_name(found.group(1)) if found else None
        if index is not None:  # a declared unique index (proxy.backends.migrations)
            return DuplicateKey(
                f"the unique index {index!r} already holds this value", details={"index": index}
            )
        return DuplicateId("a document with this _id already exists")
    if not isinstance(exc, sqlite3.Error):
        log.error("unexpected error in the sqlite store: %s", type(exc).__name__)
        return InternalError("unexpected error while talking to the database")
    name = getattr(exc, "sqlite_errorname", "") or ""
    message = str(exc)
    if name == "SQLITE_INTERRUPT" or message == "interrupted":
        return Timeout("the statement took longer than the configured timeout")
    if name == "SQLITE_BUSY_SNAPSHOT":
        return Conflict(
            "the transaction read data that another write has changed since; retry it",
            code="serialization_failure",
            retryable=True,
        )
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return Unavailable("the embedded store is busy", retry_after=1)
    if name.startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_NOMEM")):
        log.error("sqlite store unavailable: %s", name)
        return Unavailable("the embedded store cannot be written", retry_after=1)
    if name == "SQLITE_TOOBIG" or any(s in message for s in _TOO_COMPLEX):
        return LimitExceeded("the request is too complex for the database", code="too_complex")
    log.error("unexpected sqlite error %s (%s)", name or type(exc).__name__, message[:200])
    return InternalError("unexpected database error")


def no_table(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and str(exc).startswith("no such table")
