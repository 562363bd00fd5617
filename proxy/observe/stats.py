"""The stats recorder: per-operation counters of one sidecar process, bumped on the hot
path, read by the views and drained for the collector (design: docs/observability.md)."""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

from proxy.observe.batch import (
    COLLECTION_RE,
    ERROR_CODE_RE,
    INSTANCE_RE,
    OPERATION_RE,
    OTHER,
    PLAN_MAX_CHARS,
    SERVICE_RE,
    UNKNOWN_ERROR,
    build_batch,
    count_error,
)
from proxy.observe.buckets import BUCKET_BOUNDS_MS
from proxy.observe.counters import Delta, Key, OpWindow, Pair, PatternWindow, Total, Window
from proxy.observe.patterns import PATTERN_MAX_CHARS
from proxy.observe.views import (
    Visible,
    operations_view,
    patterns_view,
    totals_view,
    with_plan,
)

__all__ = ["Clock", "StatsRecorder"]

Clock = Callable[[], float]

_MAX_DURATION_MS: Final = 1e9


def _default_instance() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:150] or "host"
    if not host[0].isalnum():
        host = "h" + host
    return f"{host}:{os.getpid()}"


def _check_settings(
    service: str,
    instance: str,
    window_seconds: float,
    windows: int,
    slow_threshold_ms: float,
    max_patterns: int,
    max_slow: int,
) -> None:
    """Raise ValueError naming every bad setting of a recorder."""
    problems = []
    if not SERVICE_RE.fullmatch(service):
        problems.append(f"service name {service[:64]!r} does not match {SERVICE_RE.pattern}")
    if not INSTANCE_RE.fullmatch(instance):
        problems.append(f"instance {instance[:64]!r} does not match {INSTANCE_RE.pattern}")
    if not (window_seconds > 0 and windows >= 1 and max_patterns >= 1 and max_slow >= 0):
        problems.append("window_seconds, windows and max_patterns must be positive")
    if not slow_threshold_ms >= 0:
        problems.append("slow_threshold_ms must be >= 0")
    if problems:
        raise ValueError("; ".join(problems))


def _add(delta: Delta, pw: PatternWindow, durations: Sequence[float], documents: int) -> float:
    """Count ``durations`` into the delta, its total and the window's entries; their max."""
    n = len(durations)
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
    return max_ms


class StatsRecorder:
    """Recent windows, lifetime totals and the delta since the last ``drain_batch`` of one
    process, bounded by ``max_patterns`` and ``max_slow`` (see docs/observability.md)."""

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
        flush_pending: Callable[[], None] | None = None,
    ) -> None:
        instance = _default_instance() if instance is None else instance
        _check_settings(
            service, instance, window_seconds, windows, slow_threshold_ms, max_patterns, max_slow
        )
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
        self._window = Window()
        self._ring: deque[tuple[int, Window]] = deque([(index, self._window)])
        self._slow_prefix = uuid.uuid4().hex[:16]
        self._slow_seq = 0
        self._totals: dict[Pair, Total] = {}
        self._registry: set[Key] = set()  # every pattern key held by a window or the delta
        self._tracked = 0  # keys of the registry that are not "<other>" patterns
        self._delta: dict[Key, Delta] = {}
        self._slow: deque[dict[str, Any]] = deque(maxlen=max_slow)
        self._new_slow: deque[dict[str, Any]] = deque(maxlen=max_slow)
        self._plans: dict[str, tuple[bool | None, str | None]] = {}
        # a buffer in front of this recorder (the HTTP layer's), emptied before any read
        self.flush_pending = flush_pending

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
        """Count one finished operation: counters only, no I/O, no growth beyond the
        bounds; a slow one is also kept in the bounded slow log."""
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
        """``record`` for several operations of one key and outcome (``documents`` is
        their sum): the counters are touched once, the buckets once per duration."""
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
        max_ms = _add(delta, pw, durations, documents)
        if not success:
            code = error_code or UNKNOWN_ERROR
            count_error(delta.errors, code, n)
            count_error(delta.total.errors, code, n)
            pw.errors += n
            pw.op.errors += n
        if max_ms > self.slow_threshold_ms:
            each = documents // n
            for d in durations:
                if d > self.slow_threshold_ms:
                    self._note_slow(now, key, d, each, success, error_code)

    def note_plan(self, pattern: str, index_used: bool | None, plan_summary: str) -> None:
        """Remember what the planner said about ``pattern`` (EXPLAIN, sampled by the
        caller): shown with its slow operations and top patterns, shipped with batches."""
        plans = self._plans
        if pattern not in plans and len(plans) >= self.max_patterns:
            del plans[next(iter(plans))]  # the oldest plan goes first
        plans.pop(pattern, None)
        plans[pattern] = (index_used, plan_summary.replace("\x00", "")[:PLAN_MAX_CHARS] or None)

    def plan(self, pattern: str) -> tuple[bool | None, str | None] | None:
        """``(index_used, plan_summary)`` noted for ``pattern``, or None."""
        return self._plans.get(pattern)

    # -- bounds (off the common path: only on first sight of a key) -----------------------

    def _admit_pair(self, pair: Pair) -> tuple[Pair, Total]:
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
            total = self._totals[canonical] = Total()
        return canonical, total

    def _enter(self, key: Key) -> tuple[Key, Delta]:
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
            delta = self._delta[key] = Delta(total)
        return key, delta

    def _enter_window(self, key: Key) -> PatternWindow:
        window = self._window
        pair = (key[0], key[1])
        op = window.ops.get(pair)
        if op is None:
            op = window.ops[pair] = OpWindow()
        pw = window.patterns[key] = PatternWindow(op)
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
        self._window = Window()
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

    # -- views ------------------------------------------------------------------------

    def _catch_up(self) -> None:
        """Empty the buffer in front of this recorder, if any, before a read."""
        if self.flush_pending is not None:
            self.flush_pending()

    @property
    def pattern_count(self) -> int:
        """How many distinct pattern keys are held now ("<other>" ones included)."""
        self._catch_up()
        return len(self._registry)

    def _recent(self, now: float | None) -> list[Window]:
        index = int((self._clock() if now is None else now) // self.window_seconds)
        return [w for i, w in self._ring if index - self.windows < i <= index]

    def performance(
        self, now: float | None = None, top: int = 20, *, visible: Visible = None
    ) -> dict[str, Any]:
        """p50/p95/p99 per (operation, collection) over the recent windows, the ``top``
        patterns by total time, the slow operations (newest first); ``visible``: see views."""
        self._catch_up()
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
            "operations": operations_view(recent, visible),
            "top_patterns": patterns_view(recent, top, visible, self._plans),
            "slow_queries": [with_plan(e, self._plans) for e in reversed(slow)],
        }

    def totals(self, *, visible: Visible = None) -> dict[str, Any]:
        """Lifetime counters: ``{"service", "instance", "collections": {collection:
        {operation: {...}}}}`` of the collections ``visible`` accepts (None: every one)."""
        self._catch_up()
        collections = totals_view(self._totals, visible)
        return {"service": self.service, "instance": self.instance, "collections": collections}

    # -- shipping -----------------------------------------------------------------------

    def drain_batch(self) -> dict[str, Any] | None:
        """Everything recorded since the previous drain as a JSON-able batch, and a new
        delta started; None when nothing happened."""
        self._catch_up()
        now = self._clock()
        delta, self._delta = self._delta, {}
        slow = [with_plan(e, self._plans) for e in self._new_slow]
        self._new_slow.clear()
        started, self._drained_at = self._drained_at, now
        if not delta and not slow:
            return None
        return build_batch(self.service, self.instance, (started, now), delta, slow, self._plans)
