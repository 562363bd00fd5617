"""The recorder's counters: lifetime totals, per-window entries and the delta since the
last drain, one small slotted class each."""

from __future__ import annotations

from proxy.observe.buckets import NUM_BUCKETS

__all__ = ["Delta", "Key", "OpWindow", "Pair", "PatternWindow", "Total", "Window"]

Key = tuple[str, str, str]  # (collection, operation, pattern)
Pair = tuple[str, str]  # (collection, operation)


class Total:
    """Lifetime counters of one (collection, operation)."""

    __slots__ = ("calls", "documents", "errors", "total_ms")

    def __init__(self) -> None:
        self.calls = 0
        self.documents = 0
        self.total_ms = 0.0
        self.errors: dict[str, int] = {}


class OpWindow:
    """One window of one (collection, operation): calls and a dense latency histogram."""

    __slots__ = ("buckets", "calls", "errors", "max_ms", "total_ms")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.buckets = [0] * NUM_BUCKETS


class PatternWindow:
    """One window of one pattern (enough to rank patterns by total time); ``op`` is the
    window's entry of the pattern's (collection, operation), bumped alongside."""

    __slots__ = ("calls", "errors", "max_ms", "op", "total_ms")

    def __init__(self, op: OpWindow) -> None:
        self.calls = 0
        self.errors = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.op = op


class Delta:
    """One pattern since the last drain (a sparse histogram); ``total`` is the lifetime
    entry of the pattern's (collection, operation), bumped alongside."""

    __slots__ = ("buckets", "calls", "documents", "errors", "max_ms", "total", "total_ms")

    def __init__(self, total: Total) -> None:
        self.calls = 0
        self.documents = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.errors: dict[str, int] = {}
        self.buckets: dict[int, int] = {}
        self.total = total


class Window:
    """One time window: its (collection, operation) entries and its pattern entries."""

    __slots__ = ("ops", "patterns")

    def __init__(self) -> None:
        self.ops: dict[Pair, OpWindow] = {}
        self.patterns: dict[Key, PatternWindow] = {}
