"""Query statistics: request shapes, the counters the hot path bumps, their windowed views,
and the delta batches shipped to the central collector (batch format and buckets shared).

The hot path calls ``StatsRecorder.record`` once per operation: a handful of dict look-ups
and integer increments, no I/O, no growth per call. Everything heavier (percentiles, sorting,
encoding) happens in the views and in ``drain_batch``, called by the periodic pusher task.
Not thread-safe: one recorder per event loop (per worker process).
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import orjson

__all__ = [
    "BATCH_VERSION",
    "BUCKET_BOUNDS_MS",
    "COLLECTION_RE",
    "ERROR_CODE_RE",
    "INSTANCE_RE",
    "NUM_BUCKETS",
    "OPERATION_RE",
    "OTHER",
    "PATTERN_MAX_CHARS",
    "PLAN_MAX_CHARS",
    "SERVICE_RE",
    "Clock",
    "StatsRecorder",
    "bucket_index",
    "percentile",
    "query_pattern",
    "summary",
]

Clock = Callable[[], float]

BATCH_VERSION: Final = 1
OTHER: Final = "<other>"  # stands for whatever did not fit a bound (patterns, collections)
UNKNOWN_ERROR: Final = "unknown"
PATTERN_MAX_CHARS: Final = 500
PLAN_MAX_CHARS: Final = 500
_TRUNCATION: Final = "..."
_MAX_SHAPE_DEPTH: Final = 32
_MAX_ERROR_CODES: Final = 64  # distinct codes per key, "unknown" (where more fold) included
_MAX_DURATION_MS: Final = 1e9

# Latency buckets: ten per decade from 0.1 ms to ~63 s, plus one overflow bucket. Bucket i
# holds durations in (BOUNDS[i-1], BOUNDS[i]] (bucket 0 from 0); bucket NUM_BUCKETS-1 holds
# everything above the last bound. Sidecar and collector share this table; the batch format
# carries bucket indexes, so changing it means a new BATCH_VERSION.
BUCKET_BOUNDS_MS: Final[tuple[float, ...]] = tuple(
    round(0.1 * 10 ** (i / 10), 4) for i in range(59)
)
NUM_BUCKETS: Final = len(BUCKET_BOUNDS_MS) + 1

# Names that may appear in a batch (the collector checks the same expressions).
SERVICE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
INSTANCE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,199}")
COLLECTION_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}|<other>")
OPERATION_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}|<other>")
ERROR_CODE_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")

Key = tuple[str, str, str]  # (collection, operation, pattern)
Pair = tuple[str, str]  # (collection, operation)


# ---- request shapes ------------------------------------------------------------------------

_REQUEST_KEYS: Final = frozenset(
    {"filter", "sort", "update", "fields", "limit", "skip", "next", "pipeline", "upsert"}
)
_LOGICAL: Final = frozenset({"$and", "$or", "$nor"})


class _Full(Exception):
    """The shape grew past PATTERN_MAX_CHARS: stop walking the body."""


class _Writer:
    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size > PATTERN_MAX_CHARS:
            raise _Full


def _key_text(key: object) -> str:
    return orjson.dumps(key if isinstance(key, str) else str(key)).decode()


def _shape(value: Any, out: _Writer, depth: int = 0) -> None:
    """Structure kept, values replaced: objects keep their (sorted) keys and operators, any
    array of values is ``[?]``, the arrays of ``$and``/``$or``/``$nor`` keep one shape per
    clause."""
    if isinstance(value, Mapping) and depth < _MAX_SHAPE_DEPTH:
        out.add("{")
        for n, key in enumerate(sorted(value, key=str)):
            if n:
                out.add(",")
            out.add(_key_text(key))
            out.add(":")
            child = value[key]
            if key in _LOGICAL and isinstance(child, list):
                _shape_each(child, out, depth + 1)
            else:
                _shape(child, out, depth + 1)
        out.add("}")
    elif isinstance(value, list | tuple):
        out.add("[?]")
    else:
        out.add("?")


def _shape_each(items: Sequence[Any], out: _Writer, depth: int) -> None:
    out.add("[")
    for n, item in enumerate(items):
        if n:
            out.add(",")
        _shape(item, out, depth)
    out.add("]")


def _sort_text(sort: Any) -> str:
    """``-age,name`` from any accepted spelling: that string, ``{"age": -1}``, or a list of
    names / ``[name, direction]`` pairs. Field names are structure, so they are kept."""
    if isinstance(sort, str):
        return ",".join(part.strip() for part in sort.split(",") if part.strip())
    if isinstance(sort, Mapping):
        items: Iterable[Any] = sort.items()
    elif isinstance(sort, list | tuple):
        items = sort
    else:
        return "?"
    keys = []
    for item in items:
        if isinstance(item, str):
            keys.append(item)
        elif isinstance(item, list | tuple) and len(item) == 2:
            name, direction = item
            descending = direction in (-1, "-1", "desc", "descending")
            keys.append(("-" if descending else "") + str(name))
        else:
            keys.append("?")
    return ",".join(keys)


def _fields_text(fields: Any) -> str:
    if isinstance(fields, str):
        names = [f.strip() for f in fields.split(",") if f.strip()]
    elif isinstance(fields, list | tuple):
        names = [str(f) for f in fields]
    else:
        return "?"
    return ",".join(sorted(set(names)))


def _write_request(body: Mapping[str, Any], out: _Writer) -> None:
    flt = body.get("filter")
    if flt is not None:
        out.add(" ")
        _shape(flt, out)
    if body.get("update") is not None:
        out.add(" update=")
        _shape(body["update"], out)
    pipeline = body.get("pipeline")
    if pipeline is not None:
        out.add(" pipeline=")
        if isinstance(pipeline, list):
            _shape_each(pipeline, out, 1)
        else:
            _shape(pipeline, out)
    if body.get("sort"):
        out.add(" sort=" + _sort_text(body["sort"]))
    if body.get("fields"):
        out.add(" fields=" + _fields_text(body["fields"]))


def query_pattern(operation: str, collection: str, body: Any) -> str:
    """The normalized shape of a request, e.g. ``find users {"age":{"$gt":?},"tags":?}
    sort=-age``: values become ``?``, arrays of values ``[?]`` whatever their length, object
    keys are sorted, operators and field names are kept. At most PATTERN_MAX_CHARS long.

    ``body`` is either a request object whose keys are all among ``filter``, ``sort``,
    ``update``, ``fields``, ``pipeline``, ``limit``, ``skip``, ``next``, ``upsert`` (only the
    first five shape the pattern), or a bare filter / update document / document, shaped as
    a whole, or None (the pattern is then ``"<operation> <collection>"``). Pass parsed JSON,
    not text."""
    out = _Writer()
    try:
        out.add(f"{operation} {collection}")
        if isinstance(body, Mapping) and body and all(k in _REQUEST_KEYS for k in body):
            _write_request(body, out)
        elif body is not None:
            out.add(" ")
            _shape(body, out)
    except _Full:
        text = "".join(out.parts)
        return text[: PATTERN_MAX_CHARS - len(_TRUNCATION)] + _TRUNCATION
    return "".join(out.parts)


# ---- buckets and percentiles ---------------------------------------------------------------


def bucket_index(duration_ms: float) -> int:
    """The latency bucket of ``duration_ms`` (see BUCKET_BOUNDS_MS)."""
    return bisect_left(BUCKET_BOUNDS_MS, duration_ms)


def percentile(counts: Sequence[int], q: float, max_ms: float | None = None) -> float | None:
    """The ``q`` quantile (0..1) of the durations counted in ``counts`` (one count per
    bucket), interpolated linearly inside the bucket it falls in; never above ``max_ms``
    when that is known. None when nothing was counted."""
    total = sum(counts)
    if total == 0:
        return None
    rank = min(max(q, 0.0), 1.0) * total
    seen = 0
    for i, n in enumerate(counts):
        if n == 0:
            continue
        if seen + n >= rank:
            lower = BUCKET_BOUNDS_MS[i - 1] if i > 0 else 0.0
            if i < len(BUCKET_BOUNDS_MS):
                upper = BUCKET_BOUNDS_MS[i]
            else:  # overflow bucket: its top is the largest duration seen, when known
                upper = max(lower, max_ms) if max_ms is not None else lower
            value = lower + (upper - lower) * max(rank - seen, 0.0) / n
            return min(value, max_ms) if max_ms is not None else value
        seen += n
    return max_ms  # unreachable unless counts changed under us


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# ---- counters ------------------------------------------------------------------------------


class _Total:
    """Lifetime counters of one (collection, operation)."""

    __slots__ = ("calls", "documents", "errors", "total_ms")

    def __init__(self) -> None:
        self.calls = 0
        self.documents = 0
        self.total_ms = 0.0
        self.errors: dict[str, int] = {}


class _OpWindow:
    """One window of one (collection, operation): calls and a dense latency histogram."""

    __slots__ = ("buckets", "calls", "errors", "max_ms", "total_ms")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.buckets = [0] * NUM_BUCKETS


class _PatternWindow:
    """One window of one pattern: enough to rank patterns by total time. ``op`` is the
    window's entry of the pattern's (collection, operation), bumped alongside."""

    __slots__ = ("calls", "errors", "max_ms", "op", "total_ms")

    def __init__(self, op: _OpWindow) -> None:
        self.calls = 0
        self.errors = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.op = op


class _Delta:
    """Everything about one pattern since the last drain (a sparse histogram). ``total`` is
    the lifetime entry of the pattern's (collection, operation), bumped alongside."""

    __slots__ = ("buckets", "calls", "documents", "errors", "max_ms", "total", "total_ms")

    def __init__(self, total: _Total) -> None:
        self.calls = 0
        self.documents = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.errors: dict[str, int] = {}
        self.buckets: dict[int, int] = {}
        self.total = total


class _Window:
    __slots__ = ("ops", "patterns")

    def __init__(self) -> None:
        self.ops: dict[Pair, _OpWindow] = {}
        self.patterns: dict[Key, _PatternWindow] = {}


def _count_error(errors: dict[str, int], code: str, n: int = 1) -> None:
    if code in errors:
        errors[code] += n
    else:
        if not ERROR_CODE_RE.fullmatch(code) or len(errors) >= _MAX_ERROR_CODES - 1:
            code = UNKNOWN_ERROR
        errors[code] = errors.get(code, 0) + n


def _default_instance() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:150] or "host"
    if not host[0].isalnum():
        host = "h" + host
    return f"{host}:{os.getpid()}"


# ---- the recorder --------------------------------------------------------------------------


class StatsRecorder:
    """Per-operation counters of one sidecar process: recent windows for the local views,
    lifetime totals, and the delta since the last ``drain_batch`` for the collector.

    Memory is bounded: at most ``max_patterns`` distinct patterns (more fold into the
    pattern ``"<other>"`` of their collection and operation), at most ``max_patterns``
    (collection, operation) pairs (more fold into collection ``"<other>"``), at most
    ``max_slow`` slow operations. ``clock`` returns seconds since the epoch (it also stamps
    slow operations and batches)."""

    def __init__(
        self,
        service: str,
        clock: Clock = time.time,
        window_seconds: float = 60.0,
        windows: int = 5,
        slow_threshold_ms: float = 200.0,
        max_patterns: int = 1000,
        max_slow: int = 100,
        *,
        instance: str | None = None,
    ) -> None:
        problems = []
        if not SERVICE_RE.fullmatch(service):
            problems.append(f"service name {service[:64]!r} does not match {SERVICE_RE.pattern}")
        instance = _default_instance() if instance is None else instance
        if not INSTANCE_RE.fullmatch(instance):
            problems.append(f"instance {instance[:64]!r} does not match {INSTANCE_RE.pattern}")
        if not (window_seconds > 0 and windows >= 1 and max_patterns >= 1 and max_slow >= 0):
            problems.append("window_seconds, windows and max_patterns must be positive")
        if not slow_threshold_ms >= 0:
            problems.append("slow_threshold_ms must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))
        self.service = service
        self.instance = instance
        self.window_seconds = float(window_seconds)
        self.windows = windows
        self.slow_threshold_ms = float(slow_threshold_ms)
        self.max_patterns = max_patterns
        self.max_slow = max_slow
        self._clock = clock
        now = clock()
        self._started_at = now
        self._drained_at = now
        index = int(now // self.window_seconds)
        self._next_window = (index + 1) * self.window_seconds
        self._window = _Window()
        self._ring: deque[tuple[int, _Window]] = deque([(index, self._window)])
        self._slow_prefix = uuid.uuid4().hex[:16]
        self._slow_seq = 0
        self._totals: dict[Pair, _Total] = {}
        self._registry: set[Key] = set()  # every pattern key held by a window or the delta
        self._tracked = 0  # keys of the registry that are not "<other>" patterns
        self._delta: dict[Key, _Delta] = {}
        self._slow: deque[dict[str, Any]] = deque(maxlen=max_slow)
        self._new_slow: deque[dict[str, Any]] = deque(maxlen=max_slow)
        self._plans: dict[str, tuple[bool | None, str | None]] = {}
        # a buffer in front of this recorder (the HTTP layer's), emptied before any read
        self.flush_pending: Callable[[], None] | None = None

    # -- hot path ----------------------------------------------------------------------

    def record(
        self,
        collection: str,
        operation: str,
        duration_ms: float,
        documents: int,
        pattern: str,
        success: bool,
        error_code: str | None,
    ) -> None:
        """Count one finished operation. Only increments counters (no I/O, no growth
        beyond the bounds); a slow one is also kept in the bounded slow log."""
        self.record_many(
            collection, operation, pattern, (duration_ms,), documents, success, error_code
        )

    def record_many(
        self,
        collection: str,
        operation: str,
        pattern: str,
        durations_ms: Sequence[float],
        documents: int,
        success: bool,
        error_code: str | None,
    ) -> None:
        """``record`` for several operations of the same key and outcome at once
        (``documents`` is their sum): the counters are touched once, the buckets once per
        duration. What a buffered hot path hands over."""
        n = len(durations_ms)
        if not n:
            return
        now = self._clock()
        if now >= self._next_window:
            self._rotate(now)
        cap = _MAX_DURATION_MS
        durations = [
            d if 0.0 <= d < cap else (cap if d >= cap else 0.0)  # NaN, negative, absurd
            for d in durations_ms
        ]
        if documents < 0:
            documents = 0
        key = (collection, operation, pattern)
        delta = self._delta.get(key)
        if delta is None:  # first call of this pattern since the last drain
            key, delta = self._enter(key)
        pw = self._window.patterns.get(key)
        if pw is None:  # first call of this pattern in this window
            pw = self._enter_window(key)
        sum_ms = sum(durations)
        max_ms = max(durations)

        buckets = delta.buckets
        op = pw.op
        op_buckets = op.buckets
        for d in durations:
            bucket = bisect_left(BUCKET_BOUNDS_MS, d)
            buckets[bucket] = buckets.get(bucket, 0) + 1
            op_buckets[bucket] += 1
        delta.calls += n
        delta.documents += documents
        delta.total_ms += sum_ms
        if max_ms > delta.max_ms:
            delta.max_ms = max_ms
        total = delta.total
        total.calls += n
        total.documents += documents
        total.total_ms += sum_ms
        pw.calls += n
        pw.total_ms += sum_ms
        if max_ms > pw.max_ms:
            pw.max_ms = max_ms
        op.calls += n
        op.total_ms += sum_ms
        if max_ms > op.max_ms:
            op.max_ms = max_ms

        if not success:
            code = error_code or UNKNOWN_ERROR
            _count_error(delta.errors, code, n)
            _count_error(total.errors, code, n)
            pw.errors += n
            op.errors += n
        if max_ms > self.slow_threshold_ms:
            each = documents // n
            for d in durations:
                if d > self.slow_threshold_ms:
                    self._note_slow(now, key, d, each, success, error_code)

    def note_plan(self, pattern: str, index_used: bool | None, plan_summary: str) -> None:
        """Remember what the planner said about ``pattern`` (EXPLAIN, sampled by the caller):
        shown with its slow operations and top-pattern entries, shipped with its batches."""
        plans = self._plans
        if pattern not in plans and len(plans) >= self.max_patterns:
            del plans[next(iter(plans))]  # the oldest plan goes first
        plans.pop(pattern, None)
        plans[pattern] = (index_used, plan_summary.replace("\x00", "")[:PLAN_MAX_CHARS] or None)

    def plan(self, pattern: str) -> tuple[bool | None, str | None] | None:
        """``(index_used, plan_summary)`` noted for ``pattern``, or None."""
        return self._plans.get(pattern)

    # -- bounds (off the common path: only on first sight of a key) -----------------------

    def _admit_pair(self, pair: Pair) -> tuple[Pair, _Total]:
        collection, operation = pair
        if not OPERATION_RE.fullmatch(operation):
            operation = OTHER
        if not COLLECTION_RE.fullmatch(collection):
            collection = OTHER
        canonical = (collection, operation)
        if canonical == pair and len(self._totals) >= self.max_patterns:
            canonical = (OTHER, operation)
        total = self._totals.get(canonical)
        if total is None:
            total = self._totals[canonical] = _Total()
        return canonical, total

    def _enter(self, key: Key) -> tuple[Key, _Delta]:
        """The canonical key (names checked, bounds applied) and its delta entry."""
        pair = (key[0], key[1])
        total = self._totals.get(pair)
        if total is None:
            pair, total = self._admit_pair(pair)
        key = (pair[0], pair[1], key[2])
        if key not in self._registry:
            key = self._admit_pattern(key)
        delta = self._delta.get(key)
        if delta is None:
            delta = self._delta[key] = _Delta(total)
        return key, delta

    def _enter_window(self, key: Key) -> _PatternWindow:
        window = self._window
        pair = (key[0], key[1])
        op = window.ops.get(pair)
        if op is None:
            op = window.ops[pair] = _OpWindow()
        pw = window.patterns[key] = _PatternWindow(op)
        return pw

    def _admit_pattern(self, key: Key) -> Key:
        pattern = key[2]
        valid = 0 < len(pattern) <= PATTERN_MAX_CHARS and "\x00" not in pattern
        if pattern != OTHER and (not valid or self._tracked >= self.max_patterns):
            key = (key[0], key[1], OTHER)
            if key in self._registry:
                return key
        if key[2] != OTHER:
            self._tracked += 1
        self._registry.add(key)
        return key

    def _rotate(self, now: float) -> None:
        index = int(now // self.window_seconds)
        self._next_window = (index + 1) * self.window_seconds
        self._window = _Window()
        self._ring.append((index, self._window))
        expired = False
        while self._ring[0][0] <= index - self.windows:
            self._ring.popleft()
            expired = True
        if expired:  # forget patterns no window and no pending delta holds any more
            registry = set(self._delta)
            for _, window in self._ring:
                registry.update(window.patterns)
            self._registry = registry
            self._tracked = sum(1 for key in registry if key[2] != OTHER)

    def _note_slow(
        self,
        now: float,
        key: Key,
        duration_ms: float,
        documents: int,
        success: bool,
        error_code: str | None,
    ) -> None:
        self._slow_seq += 1
        code = None if success else error_code or UNKNOWN_ERROR
        if code is not None and not ERROR_CODE_RE.fullmatch(code):
            code = UNKNOWN_ERROR
        entry: dict[str, Any] = {
            "query_id": f"{self._slow_prefix}{self._slow_seq:x}",
            "timestamp": now,
            "service_name": self.service,
            "collection": key[0],
            "operation_type": key[1],
            "execution_time_ms": round(duration_ms, 3),
            "documents_processed": documents,
            "query_pattern": key[2],
            "success": success,
            "error_code": code,
        }
        self._slow.append(entry)
        if self.max_slow:
            self._new_slow.append(entry)

    def _with_plan(self, entry: dict[str, Any]) -> dict[str, Any]:
        noted = self._plans.get(entry["query_pattern"])
        index_used, plan = noted if noted is not None else (None, None)
        return {**entry, "index_used": index_used, "plan": plan}

    # -- views ------------------------------------------------------------------------

    @property
    def pattern_count(self) -> int:
        """How many distinct pattern keys are held now ("<other>" ones included)."""
        if self.flush_pending is not None:
            self.flush_pending()
        return len(self._registry)

    def _recent(self, now: float | None) -> list[_Window]:
        index = int((self._clock() if now is None else now) // self.window_seconds)
        return [w for i, w in self._ring if index - self.windows < i <= index]

    def performance(
        self,
        now: float | None = None,
        top: int = 20,
        *,
        visible: Callable[[str], bool] | None = None,
    ) -> dict[str, Any]:
        """p50/p95/p99 per (operation, collection) over the recent windows, the ``top``
        patterns by total time, and the slow operations (newest first). ``visible``: only
        the collections it accepts (the ranking is of those alone; None: every one)."""
        if self.flush_pending is not None:
            self.flush_pending()
        recent = self._recent(now)
        slow: Sequence[dict[str, Any]] = self._slow
        if visible is not None:
            slow = [e for e in slow if visible(e["collection"])]
        return {
            "service": self.service,
            "instance": self.instance,
            "window_seconds": self.window_seconds,
            "windows": self.windows,
            "slow_threshold_ms": self.slow_threshold_ms,
            "operations": self._operations_view(recent, visible),
            "top_patterns": self._patterns_view(recent, top, visible),
            "slow_queries": [self._with_plan(e) for e in reversed(slow)],
        }

    def _operations_view(
        self, recent: list[_Window], visible: Callable[[str], bool] | None
    ) -> list[dict[str, Any]]:
        merged: dict[Pair, _OpWindow] = {}
        for window in recent:
            for pair, op in window.ops.items():
                if visible is not None and not visible(pair[0]):
                    continue
                into = merged.get(pair)
                if into is None:
                    into = merged[pair] = _OpWindow()
                into.calls += op.calls
                into.errors += op.errors
                into.total_ms += op.total_ms
                into.max_ms = max(into.max_ms, op.max_ms)
                into.buckets = [a + b for a, b in zip(into.buckets, op.buckets, strict=True)]
        rows = [
            {
                "operation": operation,
                "collection": collection,
                **summary(op.calls, op.errors, op.total_ms, op.max_ms, op.buckets),
            }
            for (collection, operation), op in merged.items()
        ]
        rows.sort(key=lambda r: (-r["total_ms"], r["collection"], r["operation"]))
        return rows

    def _patterns_view(
        self, recent: list[_Window], top: int, visible: Callable[[str], bool] | None
    ) -> list[dict[str, Any]]:
        merged: dict[Key, _PatternWindow] = {}
        for window in recent:
            for key, pw in window.patterns.items():
                if visible is not None and not visible(key[0]):
                    continue
                into = merged.get(key)
                if into is None:
                    into = merged[key] = _PatternWindow(_OpWindow())
                into.calls += pw.calls
                into.errors += pw.errors
                into.total_ms += pw.total_ms
                into.max_ms = max(into.max_ms, pw.max_ms)
        ranked = sorted(merged.items(), key=lambda kv: -kv[1].total_ms)[: max(top, 0)]
        rows = []
        for (collection, operation, pattern), pw in ranked:
            noted = self._plans.get(pattern)
            rows.append(
                {
                    "collection": collection,
                    "operation": operation,
                    "pattern": pattern,
                    "calls": pw.calls,
                    "errors": pw.errors,
                    "total_ms": round(pw.total_ms, 3),
                    "mean_ms": round(pw.total_ms / pw.calls, 3),
                    "max_ms": round(pw.max_ms, 3),
                    "index_used": noted[0] if noted else None,
                    "plan": noted[1] if noted else None,
                }
            )
        return rows

    def totals(self, *, visible: Callable[[str], bool] | None = None) -> dict[str, Any]:
        """Lifetime counters: ``{"service", "instance", "collections": {collection:
        {operation: {"calls", "errors", "errors_by_code", "documents", "total_ms"}}}}``
        (``visible``: only the collections it accepts; None: every one)."""
        if self.flush_pending is not None:
            self.flush_pending()
        collections: dict[str, dict[str, Any]] = {}
        for (collection, operation), t in sorted(self._totals.items()):
            if visible is not None and not visible(collection):
                continue
            collections.setdefault(collection, {})[operation] = {
                "calls": t.calls,
                "errors": sum(t.errors.values()),
                "errors_by_code": dict(sorted(t.errors.items())),
                "documents": t.documents,
                "total_ms": round(t.total_ms, 3),
            }
        return {"service": self.service, "instance": self.instance, "collections": collections}

    # -- shipping -----------------------------------------------------------------------

    def drain_batch(self) -> dict[str, Any] | None:
        """Everything recorded since the previous drain, as a JSON-able batch (format in
        the module of the collector store), and start a new delta. None when nothing
        happened."""
        if self.flush_pending is not None:
            self.flush_pending()
        now = self._clock()
        delta, self._delta = self._delta, {}
        slow = [self._with_plan(e) for e in self._new_slow]
        self._new_slow.clear()
        started, self._drained_at = self._drained_at, now
        if not delta and not slow:
            return None
        patterns = []
        for (collection, operation, pattern), d in delta.items():
            noted = self._plans.get(pattern)
            patterns.append(
                {
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
            )
        return {
            "version": BATCH_VERSION,
            "batch_id": uuid.uuid4().hex,
            "service": self.service,
            "instance": self.instance,
            "started_at": started,
            "ended_at": max(now, started),
            "patterns": patterns,
            "slow": [_slow_for_batch(e) for e in slow],
        }


def _slow_for_batch(entry: Mapping[str, Any]) -> dict[str, Any]:
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


def summary(
    calls: int, errors: int, total_ms: float, max_ms: float, buckets: Sequence[int]
) -> dict[str, Any]:
    """The numbers shown for one (operation, collection): counts and percentiles."""
    return {
        "calls": calls,
        "errors": errors,
        "total_ms": round(total_ms, 3),
        "mean_ms": round(total_ms / calls, 3) if calls else None,
        "p50_ms": _round(percentile(buckets, 0.50, max_ms)),
        "p95_ms": _round(percentile(buckets, 0.95, max_ms)),
        "p99_ms": _round(percentile(buckets, 0.99, max_ms)),
        "max_ms": round(max_ms, 3),
    }
