"""Grouping and accumulators of the aggregation reference ($group, $bucket.output), as the
"Accumulators" table and the $group bullet of docs/aggregation.md state them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.reference import MISSING
from tests.reference_aggregate_expr import evaluate, evaluate_group_key
from tests.reference_aggregate_ops import Env
from tests.reference_aggregate_values import is_number, max_value, min_value, same_value

Json = Any
Docs = list[dict[str, Json]]

__all__ = ["ACCUMULATORS", "accumulate", "group"]


def group(docs: Docs, key_expr: Json) -> list[tuple[Json, Docs]]:
    """(key, members) in the order of each group's first document; missing and null are
    one key, equal numbers (``1``, ``1.0``) one key."""
    groups: list[tuple[Json, Docs]] = []
    for d in docs:
        key = evaluate_group_key(key_expr, Env(d))
        for k, members in groups:
            if same_value(k, key):
                members.append(d)
                break
        else:
            groups.append((key, [d]))
    return groups


def _sum(vals: list[Json]) -> Json:
    return sum((v for v in vals if is_number(v)), 0)


def _avg(vals: list[Json]) -> Json:
    nums = [v for v in vals if is_number(v)]
    return sum(nums, 0) / len(nums) if nums else None


def _min(vals: list[Json]) -> Json:
    kept = [v for v in vals if v is not None and v is not MISSING]
    return min_value(kept) if kept else None


def _max(vals: list[Json]) -> Json:
    kept = [v for v in vals if v is not None and v is not MISSING]
    return max_value(kept) if kept else None


def _first(vals: list[Json]) -> Json:
    return None if vals[0] is MISSING else vals[0]


def _last(vals: list[Json]) -> Json:
    return None if vals[-1] is MISSING else vals[-1]


def _push(vals: list[Json]) -> Json:
    return [v for v in vals if v is not MISSING]


def _add_to_set(vals: list[Json]) -> Json:
    out: list[Json] = []
    for v in vals:
        if v is not MISSING and not any(same_value(v, o) for o in out):
            out.append(v)
    return out


def _count(vals: list[Json]) -> Json:
    return len(vals)


ACCUMULATORS: dict[str, Callable[[list[Json]], Json]] = {
    "$sum": _sum,
    "$avg": _avg,
    "$min": _min,
    "$max": _max,
    "$first": _first,
    "$last": _last,
    "$push": _push,
    "$addToSet": _add_to_set,
    "$count": _count,
}


def accumulate(fields: dict[str, Json], members: Docs) -> dict[str, Json]:
    """``{field: {accumulator: expr}}`` over the (non-empty) ``members``, in input order."""
    out = {}
    for name, spec in fields.items():
        ((op, expr),) = spec.items()
        if op not in ACCUMULATORS:
            raise ValueError(f"unknown accumulator {op}")
        vals = [MISSING if op == "$count" else evaluate(expr, Env(d)) for d in members]
        out[name] = ACCUMULATORS[op](vals)
    return out
