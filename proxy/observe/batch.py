"""The stats batch shared with the collector: its version, the names it may carry, and
the batch built from a recorder's drained delta (format: docs/observability.md)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final

from proxy.observe.counters import Delta, Key

__all__ = [
    "BATCH_VERSION",
    "COLLECTION_RE",
    "ERROR_CODE_RE",
    "INSTANCE_RE",
    "OPERATION_RE",
    "OTHER",
    "PLAN_MAX_CHARS",
    "SERVICE_RE",
    "UNKNOWN_ERROR",
    "Plans",
    "build_batch",
    "count_error",
]

BATCH_VERSION: Final = 1
OTHER: Final = "<other>"  # stands for whatever did not fit a bound (patterns, collections)
UNKNOWN_ERROR: Final = "unknown"
PLAN_MAX_CHARS: Final = 500
_MAX_ERROR_CODES: Final = 64  # distinct codes per key, "unknown" (where more fold) included

# Names that may appear in a batch (the collector checks the same expressions).
SERVICE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
INSTANCE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,199}")
COLLECTION_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}|<other>")
OPERATION_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}|<other>")
ERROR_CODE_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")

Plans = Mapping[str, tuple[bool | None, str | None]]  # pattern -> (index_used, plan_summary)


def count_error(errors: dict[str, int], code: str, n: int = 1) -> None:
    """Add ``n`` to ``code``; an ill-formed code, or one past the bound, counts as unknown."""
    if code in errors:
        errors[code] += n
    else:
        if not ERROR_CODE_RE.fullmatch(code) or len(errors) >= _MAX_ERROR_CODES - 1:
            code = UNKNOWN_ERROR
        errors[code] = errors.get(code, 0) + n


def build_batch(
    service: str,
    instance: str,
    span: tuple[float, float],
    delta: Mapping[Key, Delta],
    slow: Iterable[Mapping[str, Any]],
    plans: Plans,
) -> dict[str, Any]:
    """The JSON-able batch of ``delta`` and the ``slow`` entries (plans attached) recorded
    between ``span``'s start and end."""
    started, now = span
    return {
        "version": BATCH_VERSION,
        "batch_id": uuid.uuid4().hex,
        "service": service,
        "instance": instance,
        "started_at": started,
        "ended_at": max(now, started),
        "patterns": [_pattern_entry(key, d, plans) for key, d in delta.items()],
        "slow": [_slow_entry(e) for e in slow],
    }


def _pattern_entry(key: Key, d: Delta, plans: Plans) -> dict[str, Any]:
    collection, operation, pattern = key
    noted = plans.get(pattern)
    return {
        "collection": collection,
        "operation": operation,
        "pattern": pattern,
        "calls": d.calls,
        "errors": dict(d.errors),
        "total_ms": d.total_ms,
        "max_ms": d.max_ms,
        "documents": d.documents,
        "buckets": [[i, d.buckets[i]] for i in sorted(d.buckets)],
        "index_used": noted[0] if noted else None,
    }


def _slow_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "query_id": entry["query_id"],
        "timestamp": entry["timestamp"],
        "collection": entry["collection"],
        "operation": entry["operation_type"],
        "pattern": entry["query_pattern"],
        "execution_time_ms": entry["execution_time_ms"],
        "documents": entry["documents_processed"],
        "success": entry["success"],
        "error_code": entry["error_code"],
        "index_used": entry["index_used"],
        "plan": entry["plan"],
    }
