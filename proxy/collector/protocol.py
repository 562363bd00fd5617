"""The stats push batch a sidecar sends the collector: its format and strict validation
(format in docs/collector.md); a batch is all valid or refused as a whole."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from proxy.errors import BadRequest
from proxy.observe.batch import (
    BATCH_VERSION,
    COLLECTION_RE,
    ERROR_CODE_RE,
    INSTANCE_RE,
    OPERATION_RE,
    PLAN_MAX_CHARS,
    SERVICE_RE,
)
from proxy.observe.buckets import NUM_BUCKETS
from proxy.observe.patterns import PATTERN_MAX_CHARS
from proxy.problems import Problems

__all__ = [
    "MAX_BATCH_PATTERNS",
    "MAX_BATCH_SLOW",
    "Batch",
    "PatternRollup",
    "SlowQuery",
    "parse_push_batch",
]

MAX_BATCH_PATTERNS: Final = 10_000
MAX_BATCH_SLOW: Final = 1_000
MAX_COUNT: Final = 2**53 - 1  # integers JSON carries exactly
MAX_MS: Final = 1e12
MAX_EPOCH: Final = 1e11  # seconds; far beyond any real clock, within timestamptz
_MAX_PROBLEMS: Final = 20
_BATCH_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{8,64}")
_QUERY_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BATCH_KEYS: Final = frozenset(
    {"version", "batch_id", "service", "instance", "started_at", "ended_at", "patterns", "slow"}
)
_PATTERN_KEYS: Final = frozenset(
    {
        "collection",
        "operation",
        "pattern",
        "calls",
        "errors",
        "total_ms",
        "max_ms",
        "documents",
        "buckets",
        "index_used",
    }
)
_SLOW_KEYS: Final = frozenset(
    {
        "query_id",
        "timestamp",
        "collection",
        "operation",
        "pattern",
        "execution_time_ms",
        "documents",
        "success",
        "error_code",
        "index_used",
        "plan",
    }
)


# ---- the validated batch -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PatternRollup:
    collection: str
    operation: str
    pattern: str
    calls: int
    errors: dict[str, int]
    total_ms: float
    max_ms: float
    documents: int
    buckets: tuple[int, ...]  # dense, NUM_BUCKETS long
    index_used: bool | None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.collection, self.operation, self.pattern)


@dataclass(frozen=True, slots=True)
class SlowQuery:
    query_id: str
    timestamp: float
    collection: str
    operation: str
    pattern: str
    execution_time_ms: float
    documents: int
    success: bool
    error_code: str | None
    index_used: bool | None
    plan: str | None


@dataclass(frozen=True, slots=True)
class Batch:
    batch_id: str
    service: str
    instance: str
    started_at: float
    ended_at: float
    patterns: tuple[PatternRollup, ...]
    slow: tuple[SlowQuery, ...]


# ---- validation ----------------------------------------------------------------------------


def _full(problems: Problems) -> bool:
    return len(problems.items) >= _MAX_PROBLEMS


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Reader:
    """Typed access to one JSON object of the batch; each problem noted with its path."""

    __slots__ = ("ok", "path", "problems", "raw")

    def __init__(self, raw: object, keys: frozenset[str], path: str, problems: Problems) -> None:
        self.path, self.problems, self.ok = path, problems, True
        if not isinstance(raw, dict):
            self.fail(path, "must be an object")
            self.raw: Mapping[str, Any] = {}
            return
        self.raw = raw
        for key in sorted(set(raw) - keys, key=str)[:3]:
            self.fail(f"{path}.{str(key)[:40]}", "unknown key")
        for key in sorted(keys - set(raw)):
            self.fail(f"{path}.{key}", "is required")

    def fail(self, where: str, message: str) -> None:
        self.ok = False
        self.problems.add(where, message)

    def count(self, key: str, low: int = 0) -> int:
        value = self.raw.get(key)
        if _is_int(value) and low <= value <= MAX_COUNT:
            return value
        if key in self.raw:
            self.fail(f"{self.path}.{key}", f"must be an integer between {low} and {MAX_COUNT}")
        return 0

    def number(self, key: str, high: float) -> float:
        value = self.raw.get(key)
        if _is_number(value) and math.isfinite(value) and 0 <= value <= high:
            return float(value)
        if key in self.raw:
            self.fail(f"{self.path}.{key}", f"must be a number between 0 and {high:g}")
        return 0.0

    def text(self, key: str, pattern: re.Pattern[str] | None, max_len: int = 0) -> str:
        value = self.raw.get(key)
        if key not in self.raw:
            return ""
        if not isinstance(value, str):
            self.fail(f"{self.path}.{key}", "must be a string")
            return ""
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(f"{self.path}.{key}", f"must match {pattern.pattern}")
        elif pattern is None and not (0 < len(value) <= max_len and "\x00" not in value):
            self.fail(f"{self.path}.{key}", f"must be 1 to {max_len} characters, no NUL")
        return value

    def optional_text(self, key: str, pattern: re.Pattern[str] | None, max_len: int) -> str | None:
        return None if self.raw.get(key) is None else self.text(key, pattern, max_len)

    def flag(self, key: str, *, nullable: bool) -> bool | None:
        value = self.raw.get(key)
        if key in self.raw and not (isinstance(value, bool) or (nullable and value is None)):
            self.fail(f"{self.path}.{key}", "must be true or false" + (" or null" * nullable))
            return None
        return value if isinstance(value, bool) else None

    def items(self, key: str, max_items: int) -> list[Any]:
        value = self.raw.get(key)
        if key in self.raw and not isinstance(value, list):
            self.fail(f"{self.path}.{key}", "must be an array")
            return []
        if isinstance(value, list) and len(value) > max_items:
            self.fail(f"{self.path}.{key}", f"must hold at most {max_items} items")
            return []
        return value if isinstance(value, list) else []


def _errors(r: _Reader, calls: int) -> dict[str, int]:
    raw = r.raw.get("errors")
    where = f"{r.path}.errors"
    if "errors" not in r.raw:
        return {}
    if not isinstance(raw, dict) or len(raw) > 64:
        r.fail(where, "must be an object of at most 64 error codes")
        return {}
    errors: dict[str, int] = {}
    for code, n in raw.items():
        if not ERROR_CODE_RE.fullmatch(code) or not _is_int(n) or not 1 <= n <= MAX_COUNT:
            r.fail(where, "keys must be error codes, values positive integers")
            return {}
        errors[code] = n
    if sum(errors.values()) > calls:
        r.fail(where, "count more errors than calls")
    return errors


def _buckets(r: _Reader, calls: int) -> tuple[int, ...]:
    raw = r.items("buckets", NUM_BUCKETS)
    where = f"{r.path}.buckets"
    dense = [0] * NUM_BUCKETS
    last = -1
    for pair in raw:
        valid = isinstance(pair, list) and len(pair) == 2 and all(_is_int(x) for x in pair)
        if not valid or not last < pair[0] < NUM_BUCKETS or not 1 <= pair[1] <= MAX_COUNT:
            r.fail(where, f"must be [index, count] pairs, indexes rising below {NUM_BUCKETS}")
            return tuple(dense)
        last = pair[0]
        dense[pair[0]] = pair[1]
    if "buckets" in r.raw and sum(dense) != calls:
        r.fail(where, "bucket counts must add up to calls")
    return tuple(dense)


def _pattern(raw: object, path: str, problems: Problems) -> PatternRollup | None:
    r = _Reader(raw, _PATTERN_KEYS, path, problems)
    calls = r.count("calls", 1)
    total_ms, max_ms = r.number("total_ms", MAX_MS), r.number("max_ms", MAX_MS)
    if max_ms > total_ms * (1 + 1e-9) + 1e-6:
        r.fail(f"{path}.max_ms", "must not exceed total_ms")
    rollup = PatternRollup(
        collection=r.text("collection", COLLECTION_RE),
        operation=r.text("operation", OPERATION_RE),
        pattern=r.text("pattern", None, PATTERN_MAX_CHARS),
        calls=calls,
        errors=_errors(r, calls),
        total_ms=total_ms,
        max_ms=max_ms,
        documents=r.count("documents"),
        buckets=_buckets(r, calls),
        index_used=r.flag("index_used", nullable=True),
    )
    return rollup if r.ok else None


def _slow(raw: object, path: str, problems: Problems) -> SlowQuery | None:
    r = _Reader(raw, _SLOW_KEYS, path, problems)
    slow = SlowQuery(
        query_id=r.text("query_id", _QUERY_ID_RE),
        timestamp=r.number("timestamp", MAX_EPOCH),
        collection=r.text("collection", COLLECTION_RE),
        operation=r.text("operation", OPERATION_RE),
        pattern=r.text("pattern", None, PATTERN_MAX_CHARS),
        execution_time_ms=r.number("execution_time_ms", MAX_MS),
        documents=r.count("documents"),
        success=bool(r.flag("success", nullable=False)),
        error_code=r.optional_text("error_code", ERROR_CODE_RE, 64),
        index_used=r.flag("index_used", nullable=True),
        plan=r.optional_text("plan", None, PLAN_MAX_CHARS),
    )
    return slow if r.ok else None


def parse_push_batch(raw: Any) -> Batch:
    """The validated stats batch a sidecar pushed; BadRequest ``invalid_batch`` listing the
    problems otherwise."""
    problems = Problems()
    r = _Reader(raw, _BATCH_KEYS, "batch", problems)
    version = r.raw.get("version")
    if "version" in r.raw and (not _is_int(version) or version != BATCH_VERSION):
        r.fail("batch.version", f"must be {BATCH_VERSION}")
    started, ended = r.number("started_at", MAX_EPOCH), r.number("ended_at", MAX_EPOCH)
    if started > ended:
        r.fail("batch.ended_at", "must not be before started_at")
    patterns: list[PatternRollup] = []
    seen: set[tuple[str, str, str]] = set()
    for i, item in enumerate(r.items("patterns", MAX_BATCH_PATTERNS)):
        if _full(problems):
            break
        rollup = _pattern(item, f"batch.patterns[{i}]", problems)
        if rollup is not None and rollup.key in seen:
            problems.add(f"batch.patterns[{i}]", "repeats the key of an earlier entry")
        elif rollup is not None:
            seen.add(rollup.key)
            patterns.append(rollup)
    slow: list[SlowQuery] = []
    for i, item in enumerate(r.items("slow", MAX_BATCH_SLOW)):
        if _full(problems):
            break
        entry = _slow(item, f"batch.slow[{i}]", problems)
        if entry is not None:
            slow.append(entry)
    batch = Batch(
        batch_id=r.text("batch_id", _BATCH_ID_RE),
        service=r.text("service", SERVICE_RE),
        instance=r.text("instance", INSTANCE_RE),
        started_at=started,
        ended_at=ended,
        patterns=tuple(patterns),
        slow=tuple(slow),
    )
    if problems.items:
        shown = problems.items[:_MAX_PROBLEMS]
        raise BadRequest(
            f"invalid stats batch: {shown[0]}"
            + (f" (and {len(problems.items) - 1} more)" if len(problems.items) > 1 else ""),
            code="invalid_batch",
            details={"problems": shown},
        )
    return batch
