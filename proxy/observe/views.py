"""What /api/db/performance and /api/db/stats show: the recent windows merged and ranked,
the lifetime totals, slow operations with their plans."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from proxy.observe.batch import Plans
from proxy.observe.buckets import summary
from proxy.observe.counters import Key, OpWindow, Pair, PatternWindow, Total, Window

__all__ = ["Visible", "operations_view", "patterns_view", "totals_view", "with_plan"]

Visible = Callable[[str], bool] | None  # which collections a view shows (None: every one)


def with_plan(entry: dict[str, Any], plans: Plans) -> dict[str, Any]:
    """A slow-log entry with the plan noted for its pattern (or None) attached."""
    noted = plans.get(entry["query_pattern"])
    index_used, plan = noted if noted is not None else (None, None)
    return {**entry, "index_used": index_used, "plan": plan}


def operations_view(recent: Iterable[Window], visible: Visible) -> list[dict[str, Any]]:
    """One summary row per (operation, collection) of ``recent``, most total time first."""
    merged: dict[Pair, OpWindow] = {}
    for window in recent:
        for pair, op in window.ops.items():
            if visible is not None and not visible(pair[0]):
                continue
            into = merged.get(pair)
            if into is None:
                into = merged[pair] = OpWindow()
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


def patterns_view(
    recent: Iterable[Window], top: int, visible: Visible, plans: Plans
) -> list[dict[str, Any]]:
    """The ``top`` patterns of ``recent`` by total time, with their noted plans."""
    merged: dict[Key, PatternWindow] = {}
    for window in recent:
        for key, pw in window.patterns.items():
            if visible is not None and not visible(key[0]):
                continue
            into = merged.get(key)
            if into is None:
                into = merged[key] = PatternWindow(OpWindow())
            into.calls += pw.calls
            into.errors += pw.errors
            into.total_ms += pw.total_ms
            into.max_ms = max(into.max_ms, pw.max_ms)
    ranked = sorted(merged.items(), key=lambda kv: -kv[1].total_ms)[: max(top, 0)]
    return [_pattern_row(key, pw, plans) for key, pw in ranked]


def _pattern_row(key: Key, pw: PatternWindow, plans: Plans) -> dict[str, Any]:
    collection, operation, pattern = key
    noted = plans.get(pattern)
    return {
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


def totals_view(totals: Mapping[Pair, Total], visible: Visible) -> dict[str, dict[str, Any]]:
    """``{collection: {operation: {"calls", "errors", "errors_by_code", "documents",
    "total_ms"}}}`` of the lifetime ``totals``."""
    collections: dict[str, dict[str, Any]] = {}
    for (collection, operation), t in sorted(totals.items()):
        if visible is not None and not visible(collection):
            continue
        collections.setdefault(collection, {})[operation] = {
            "calls": t.calls,
            "errors": sum(t.errors.values()),
            "errors_by_code": dict(sorted(t.errors.items())),
            "documents": t.documents,
            "total_ms": round(t.total_ms, 3),
        }
    return collections
