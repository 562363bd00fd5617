"""Latency buckets shared by the sidecar and the collector, and the percentiles and
per-operation summary read from them (layout: docs/observability.md, "Latency buckets")."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any, Final

__all__ = ["BUCKET_BOUNDS_MS", "NUM_BUCKETS", "bucket_index", "percentile", "summary"]

# ten per decade from 0.1 ms to ~63 s, plus one overflow bucket (changing it: new BATCH_VERSION)
BUCKET_BOUNDS_MS: Final[tuple[float, ...]] = tuple(
    round(0.1 * 10 ** (i / 10), 4) for i in range(59)
)
NUM_BUCKETS: Final = len(BUCKET_BOUNDS_MS) + 1


def bucket_index(duration_ms: float) -> int:
    """The latency bucket of ``duration_ms`` (see BUCKET_BOUNDS_MS)."""
    return bisect_left(BUCKET_BOUNDS_MS, duration_ms)


def percentile(counts: Sequence[int], q: float, max_ms: float | None = None) -> float | None:
    """The ``q`` quantile (0..1) of ``counts`` (one per bucket), interpolated inside its
    bucket and never above ``max_ms`` when known; None when nothing was counted."""
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
