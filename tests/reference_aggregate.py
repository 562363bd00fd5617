"""Pure-Python reference evaluator of aggregation pipelines (raw JSON, docs/aggregation.md): the
oracle every backend is held to. Public: aggregate, ExpressionFailed, results_equal, promised."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from tests.reference import MISSING, matches
from tests.reference_aggregate_accumulate import accumulate, group
from tests.reference_aggregate_expr import evaluate
from tests.reference_aggregate_ops import Env
from tests.reference_aggregate_values import (
    ExpressionFailed,
    Unpromised,
    close_equal,
    compare,
    fail,
    get_path,
    get_through_objects,
    include_paths,
    set_path,
    strict_mode,
    unset_path,
)

__all__ = ["ExpressionFailed", "Unpromised", "aggregate", "promised", "results_equal"]

Json = Any
Docs = list[dict[str, Json]]
Collections = dict[str, Docs]


def _by_id(docs: Docs) -> Docs:
    return sorted(docs, key=lambda d: str(d["_id"]).encode("utf-8"))


def aggregate(collections: Collections, collection: str, pipeline: list[dict[str, Json]]) -> Docs:
    """Run the raw ``pipeline`` over ``collections[collection]`` (entered in ``_id`` order)."""
    return _run(collections, _by_id(collections.get(collection, [])), pipeline)


def promised(collections: Collections, collection: str, pipeline: list[dict[str, Json]]) -> bool:
    """False when the result (or failure) depends on what the contract leaves open
    (object-vs-object order, ``$toString`` of a non-integral double, ...): the differential
    tests ``assume()`` it."""
    try:
        with strict_mode():
            aggregate(collections, collection, pipeline)
    except Unpromised:
        return False
    except ExpressionFailed:
        pass
    return True


def results_equal(a: list[Json], b: list[Json]) -> bool:
    """List equality with type-aware deep equality, numbers at rel 1e-9 (abs 1e-12)."""
    return close_equal(a, b)


def _run(collections: Collections, docs: Docs, pipeline: list[dict[str, Json]]) -> Docs:
    for stage in pipeline:
        if not isinstance(stage, dict) or len(stage) != 1:
            raise ValueError(f"a stage is a one-key object: {stage!r}")
        ((name, spec),) = stage.items()
        if name not in _STAGES:
            raise ValueError(f"unknown stage {name}")
        docs = _STAGES[name](collections, docs, spec)
    return docs


def _env(doc: Json) -> Env:
    return Env(doc)


def _split(path: str) -> list[str]:
    return path.split(".")


# ---- document-wise stages -------------------------------------------------------------------


def _match(cols: Collections, docs: Docs, spec: Json) -> Docs:
    return [d for d in docs if matches(d, spec)]


def _add_fields(cols: Collections, docs: Docs, spec: Json) -> Docs:
    return [_set_fields(d, d, spec.items()) for d in docs]


def _set_fields(target: Json, source: Json, fields: Any) -> Json:
    """Every expression is evaluated on ``source`` (the input document), then set in order."""
    computed = [(path, evaluate(expr, _env(source))) for path, expr in fields]
    for path, value in computed:
        target = set_path(target, _split(path), value)
    return target


def _unset(cols: Collections, docs: Docs, spec: Json) -> Docs:
    paths = spec if isinstance(spec, list) else [spec]
    out = []
    for d in docs:
        for p in paths:
            d = unset_path(d, _split(p))
        out.append(d)
    return out


def _is_flag(v: Json, flag: bool) -> bool:
    """``$project``'s flags: true or any non-zero number includes, false or 0 excludes
    (MongoDB: "non-zero integers are also treated as true")."""
    if isinstance(v, bool):
        return v is flag
    if isinstance(v, int | float):
        return (v != 0) is flag
    return False


def _project(cols: Collections, docs: Docs, spec: Json) -> Docs:
    if not spec:
        raise ValueError("$project {} is refused")
    others = {k: v for k, v in spec.items() if k != "_id"}
    if all(_is_flag(v, False) for v in spec.values()) or (
        others and all(_is_flag(v, False) for v in others.values())
    ):
        return _unset(cols, docs, [k for k, v in spec.items() if _is_flag(v, False)])
    keep_id = not _is_flag(spec.get("_id", 1), False)
    included = [k for k, v in spec.items() if _is_flag(v, True)]
    computed = [(k, v) for k, v in spec.items() if not _is_flag(v, True) and not _is_flag(v, False)]
    if keep_id and "_id" not in spec:
        included.append("_id")
    tree: dict[str, Any] = {}
    for path in included:
        node = tree
        *heads, last = _split(path)
        for seg in heads:
            node = node.setdefault(seg, {})
        node[last] = True
    return [_set_fields(include_paths(d, tree), d, computed) for d in docs]


def _replace_root(cols: Collections, docs: Docs, spec: Json) -> Docs:
    return _replace_with(cols, docs, spec["newRoot"])


def _replace_with(cols: Collections, docs: Docs, spec: Json) -> Docs:
    out = []
    for d in docs:
        v = evaluate(spec, _env(d))
        if not isinstance(v, dict):
            raise fail("$replaceRoot", f"the new root must be an object, not {v!r}")
        out.append(v)
    return out


def _skip(cols: Collections, docs: Docs, spec: Json) -> Docs:
    return docs[spec:]


def _limit(cols: Collections, docs: Docs, spec: Json) -> Docs:
    return docs[:spec]


# ---- $sort ----------------------------------------------------------------------------------

_BELOW_NULL = object()


def _sort_candidates(v: Json, segs: list[str]) -> list[Any]:
    """The values a sort path reaches: through objects, into arrays of objects; an array
    reached gives its elements (one level), an empty one ``_BELOW_NULL``; missing is null."""
    if not segs:
        if isinstance(v, list):
            return list(v) if v else [_BELOW_NULL]
        return [None if v is MISSING else v]
    if isinstance(v, dict):
        return _sort_candidates(v.get(segs[0], MISSING), segs[1:])
    if isinstance(v, list):
        return [c for e in v if isinstance(e, dict) for c in _sort_candidates(e, segs)] or [None]
    return [None]


def _sort_value(doc: Json, path: str, descending: bool) -> Any:
    cands = _sort_candidates(doc, _split(path))
    reached = [c for c in cands if c is not _BELOW_NULL]
    if not reached:
        return _BELOW_NULL  # only empty arrays
    best = reached[0]
    for c in reached[1:]:
        if (compare(c, best) > 0) if descending else (compare(c, best) < 0):
            best = c
    return best


def _sort_cmp(a: Any, b: Any) -> int:
    if a is _BELOW_NULL or b is _BELOW_NULL:
        return (b is _BELOW_NULL) - (a is _BELOW_NULL)
    return compare(a, b)


def _sort(cols: Collections, docs: Docs, spec: Json) -> Docs:
    out = list(docs)
    for path, direction in reversed(list(spec.items())):
        keyed = [(_sort_value(d, path, direction == -1), d) for d in out]
        keyed.sort(key=_cmp_key(lambda kd: kd[0]), reverse=direction == -1)
        out = [d for _, d in keyed]
    return out


def _cmp_key(get: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return functools.cmp_to_key(lambda x, y: _sort_cmp(get(x), get(y)))


# ---- $unwind, $count, $lookup, $facet -----------------------------------------------------


def _unwind(cols: Collections, docs: Docs, spec: Json) -> Docs:
    if isinstance(spec, str):
        spec = {"path": spec}
    segs = _split(spec["path"][1:])
    index = spec.get("includeArrayIndex")
    preserve = spec.get("preserveNullAndEmptyArrays", False)
    out = []
    for d in docs:
        v = get_through_objects(d, segs)
        if isinstance(v, list) and v:
            for i, e in enumerate(v):
                u = set_path(d, segs, e)
                out.append(u if index is None else set_path(u, _split(index), i))
        elif isinstance(v, list) or v is None or v is MISSING:
            if preserve:
                u = unset_path(d, segs) if isinstance(v, list) else d
                out.append(u if index is None else set_path(u, _split(index), None))
        else:
            out.append(d if index is None else set_path(d, _split(index), None))
    return out


def _count(cols: Collections, docs: Docs, spec: Json) -> Docs:
    return [{spec: len(docs)}] if docs else []


def _lookup(cols: Collections, docs: Docs, spec: Json) -> Docs:
    foreign = _by_id(cols.get(spec["from"], []))
    out = []
    for d in docs:
        local = _lookup_values(d, _split(spec["localField"]))
        flt = {spec["foreignField"]: {"$in": local}}
        out.append(set_path(d, _split(spec["as"]), [f for f in foreign if matches(f, flt)]))
    return out


def _lookup_values(doc: Json, segs: list[str]) -> list[Json]:
    """``L`` of ``{foreignField: {$in: L}}``: the local value read as the expression path
    ``"$localField"``; an array gives its elements, missing and null give null."""
    v = get_path(doc, segs)
    if isinstance(v, list):
        return list(v)
    return [None if v is MISSING else v]


def _facet(cols: Collections, docs: Docs, spec: Json) -> Docs:
    return [{name: _run(cols, list(docs), sub) for name, sub in spec.items()}]


# ---- grouping stages ------------------------------------------------------------------------


def _group(cols: Collections, docs: Docs, spec: Json) -> Docs:
    fields = {k: v for k, v in spec.items() if k != "_id"}
    return [
        {"_id": key, **accumulate(fields, members)} for key, members in group(docs, spec["_id"])
    ]


def _sort_by_count(cols: Collections, docs: Docs, spec: Json) -> Docs:
    grouped = _group(cols, docs, {"_id": spec, "count": {"$sum": 1}})
    return _sort(cols, grouped, {"count": -1})


def _bucket(cols: Collections, docs: Docs, spec: Json) -> Docs:
    bounds = spec["boundaries"]
    output = spec.get("output", {"count": {"$sum": 1}})
    buckets: list[Docs] = [[] for _ in bounds[:-1]]
    default: Docs = []
    for d in docs:
        v = evaluate(spec["groupBy"], _env(d))
        i = _bucket_index(v, bounds)
        if i is not None:
            buckets[i].append(d)
        elif "default" in spec:
            default.append(d)
        else:
            raise fail("$bucket", f"{v!r} is outside the boundaries and there is no default")
    out = [{"_id": bounds[i], **accumulate(output, m)} for i, m in enumerate(buckets) if m]
    if default:
        out.append({"_id": spec["default"], **accumulate(output, default)})
    return out


def _bucket_index(v: Json, bounds: list[Json]) -> int | None:
    same_type = isinstance(v, str) if isinstance(bounds[0], str) else _numeric(v)
    if not same_type:
        return None
    for i in range(len(bounds) - 1):
        if bounds[i] <= v < bounds[i + 1]:
            return i
    return None


def _numeric(v: Json) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_Stage = Callable[[Collections, Docs, Json], Docs]
_STAGES: dict[str, _Stage] = {
    "$match": _match,
    "$addFields": _add_fields,
    "$set": _add_fields,
    "$unset": _unset,
    "$project": _project,
    "$replaceRoot": _replace_root,
    "$replaceWith": _replace_with,
    "$group": _group,
    "$sort": _sort,
    "$skip": _skip,
    "$limit": _limit,
    "$unwind": _unwind,
    "$count": _count,
    "$sortByCount": _sort_by_count,
    "$lookup": _lookup,
    "$facet": _facet,
    "$bucket": _bucket,
}
