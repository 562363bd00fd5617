"""Aggregation pipelines compiled for MongoDB's own ``aggregate``: the validated stages
rewritten stage by stage, the caller's view (row rules, readable fields) first, the
contract's order (docs/aggregation.md, "Order") kept by a hidden stream-order field."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from proxy.query import mongo as mq
from proxy.query.aggregate.ast import (
    AddFields,
    Bucket,
    Count,
    Facet,
    Field,
    Group,
    Limit,
    Lookup,
    Match,
    Pipeline,
    Project,
    ReplaceRoot,
    Skip,
    Sort,
    Stage,
    Unset,
    Unwind,
    View,
)
from proxy.query.aggregate.mongo_expr import (
    ORDER,
    accumulators,
    expr,
    fail,
    group_key,
    set_in,
    unset_in,
    value,
)
from proxy.query.aggregate.pg_stages import raw_is_view

INDEX = "__dbproxy_i"  # $unwind's array index, before the stream is numbered again
NEW_ROOT = "__dbproxy_n"  # $replaceRoot's new root, before it replaces the document
HELD = "__dbproxy_h"  # a value to set at a dotted path, computed before any is set
JOINED = "__dbproxy_j"  # a $lookup's array, before it is set at a dotted ``as``
Stages = list[dict[str, Any]]


def compile_pipeline(pipeline: Pipeline, base: View, views: Mapping[str, View], cap: int) -> Stages:
    """MongoDB stages yielding the pipeline's output documents in the contract's order, at
    most ``cap + 1`` of them, without the hidden field."""
    stages = list(pipeline.stages)
    early: Stages = []
    while stages and isinstance(stages[0], Match) and raw_is_view(stages[0].filter, base.readable):
        match = mq.compile_filter(stages.pop(0).filter)  # type: ignore[union-attr]
        if match:
            early.append({"$match": match})
    # after the row rules, before the numbering: what the collection's indexes serve
    out = view_stages(base, numbered=True, early=early)
    out += compile_stages(stages, views)
    out += [{"$limit": cap + 1}, {"$unset": ORDER}]
    return out


def view_stages(view: View, *, numbered: bool, early: Stages | None = None) -> Stages:
    """The caller's view of a collection: its row rules (and the ``early`` stages), the
    stream numbered in ``_id`` order (``numbered``; else sorted), only the readable fields."""
    guard = mq.compile_filter(view.guard) if view.guard is not None else {}
    out: Stages = [{"$match": guard}] if guard else []
    out += early or []
    if numbered:
        out.append(renumber({"_id": 1}, first=True))
    else:
        out.append({"$sort": {"_id": 1}})
    if view.readable is not None:
        out.append({"$replaceWith": readable_doc(view.readable, keep_order=numbered)})
    return out


def renumber(sort: dict[str, int], *, first: bool = False) -> dict[str, Any]:
    """Sort by ``sort`` (then the stream order) and number the stream again."""
    order = dict(sort) if first else {**sort, ORDER: 1}
    return {"$setWindowFields": {"sortBy": order, "output": {ORDER: {"$documentNumber": {}}}}}


# ---- readable fields ------------------------------------------------------------------


def readable_doc(names: frozenset[str], *, keep_order: bool) -> Any:
    """The document with only ``names`` (a listed path covers everything under it; objects
    are entered, an object left empty is dropped; ``_id`` and ``_version`` always pass)."""
    tree: dict[str, Any] = {}
    for name in sorted(names, key=len):
        node = tree
        parts = name.split(".")
        for i, seg in enumerate(parts):
            if node.get(seg) is True:
                break
            if i == len(parts) - 1:
                node[seg] = True
            else:
                node = node.setdefault(seg, {})
    fields: dict[str, Any] = {"_id": "$_id", "_version": "$_version"}
    if keep_order:
        fields[ORDER] = "$" + ORDER
    for key, sub in tree.items():
        if key in ("_id", "_version"):
            continue
        fields[key] = "$" + key if sub is True else _part("$" + key, sub, 0)
    return fields


def _part(ref: str, tree: dict[str, Any], depth: int) -> Any:
    """The readable part of the value at ``ref``: an object's listed keys, else missing."""
    var = f"dbproxy_p{depth}"
    here = "$$" + var
    inner = {
        key: here + "." + key if sub is True else _part(here + "." + key, sub, depth + 1)
        for key, sub in tree.items()
    }
    built = f"dbproxy_b{depth}"
    kept = {"$cond": [{"$eq": ["$$" + built, {}]}, "$$REMOVE", "$$" + built]}
    on_object = {"$let": {"vars": {built: inner}, "in": kept}}
    test = {"$eq": [{"$type": here}, "object"]}
    bound = {"$ifNull": [ref, None]}
    return {"$let": {"vars": {var: bound}, "in": {"$cond": [test, on_object, "$$REMOVE"]}}}


# ---- stages ---------------------------------------------------------------------------


def compile_stages(stages: list[Stage], views: Mapping[str, View]) -> Stages:
    out: Stages = []
    for stage in stages:
        out += _stage(stage, views)
    return out


def _stage(s: Stage, views: Mapping[str, View]) -> Stages:
    if isinstance(s, Match):
        match = mq.compile_filter(s.filter)
        return [{"$match": match}] if match else []
    if isinstance(s, AddFields):
        return set_fields([(p, value(e)) for p, e in s.fields])
    if isinstance(s, Unset):
        return _unset(s)
    if isinstance(s, Project):
        return [_project(s)]
    if isinstance(s, ReplaceRoot):
        return _replace_root(s)
    if isinstance(s, Group):
        return _group(s)
    if isinstance(s, Sort):
        keys = {".".join(k.path): -1 if k.descending else 1 for k in s.keys}
        return [renumber(keys)]
    if isinstance(s, Skip):
        return [{"$skip": s.n}]
    if isinstance(s, Limit):
        return [{"$limit": s.n}]
    if isinstance(s, Unwind):
        return _unwind(s)
    if isinstance(s, Count):
        # what MongoDB documents $count to be (some servers answer 0 over no input)
        count = {"$group": {"_id": None, s.field: {"$sum": 1}}}
        return [count, {"$project": {"_id": False, s.field: True}}, {"$set": {ORDER: 1}}]
    if isinstance(s, Lookup):
        return _lookup(s, views[s.collection])
    if isinstance(s, Facet):
        facets = {
            name: [*compile_stages(list(sub), views), {"$unset": ORDER}] for name, sub in s.facets
        }
        return [{"$facet": facets}, {"$set": {ORDER: 1}}]
    if isinstance(s, Bucket):
        return _bucket(s)
    raise TypeError(f"not a stage: {s!r}")


def set_fields(
    fields: list[tuple[tuple[str, ...], Any]], temporary: tuple[str, ...] = ()
) -> Stages:
    """``$addFields`` of computed values: every value computed over the input document
    first; a dotted path then set by an expression (``set_in``: some servers do not set
    through a scalar or an array's scalars as MongoDB documents); ``temporary`` fields go."""
    first: dict[str, Any] = {}
    later: Stages = []
    gone = list(temporary)
    for i, (path, val) in enumerate(fields):
        if len(path) == 1:
            first[path[0]] = val
            continue
        held = f"{HELD}{i}"
        if isinstance(val, str) and val.startswith("$") and val[1:] in temporary:
            held = val[1:]
        else:
            first[held] = val
            gone.append(held)
        later.append({"$set": {path[0]: set_in("$" + path[0], path[1:], "$" + held)}})
    out: Stages = [{"$set": first}] if first else []
    out += later
    if gone:
        out.append({"$unset": gone})
    return out


def _unset(s: Unset) -> Stages:
    """Top-level paths by ``$unset``; a dotted one by an expression (some servers do not
    remove it from the object elements of an array on the way)."""
    top = [p[0] for p in s.paths if len(p) == 1]
    out: Stages = [{"$unset": top}] if top else []
    for p in s.paths:
        if len(p) > 1:
            field = "$" + p[0]
            undone = {
                "$cond": [
                    {"$eq": [{"$type": field}, "missing"]},
                    "$$REMOVE",
                    unset_in(field, p[1:]),
                ]
            }
            out.append({"$set": {p[0]: undone}})
    return out


def _project(s: Project) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for path, e in s.fields:
        spec[".".join(path)] = True if e is None else value(e)
    if s.exclude_id:
        spec["_id"] = False
    spec[ORDER] = True
    return {"$project": spec}


def _replace_root(s: ReplaceRoot) -> Stages:
    """A non-object new root fails on the server; an object keeps the stream order. The
    root is computed by a ``$set`` first (some servers refuse ``$objectToArray`` of a
    variable within ``$replaceWith``)."""
    new = "$" + NEW_ROOT
    keep = {"$mergeObjects": [new, {ORDER: "$" + ORDER}]}
    checked = {"$cond": [{"$eq": [{"$type": new}, "object"]}, keep, new]}
    return [{"$set": {NEW_ROOT: value(s.expr)}}, {"$replaceWith": checked}]


def _group(s: Group) -> Stages:
    accs, after = accumulators(s.accumulators)
    out: Stages = [{"$group": {"_id": group_key(s.key), **accs}}, {"$sort": {ORDER: 1}}]
    if after:
        out.append({"$set": after})
    return out


def _unwind(s: Unwind) -> Stages:
    spec = {
        "path": "$" + ".".join(s.path),
        "includeArrayIndex": INDEX,
        "preserveNullAndEmptyArrays": s.preserve,
    }
    out: Stages = [{"$unwind": spec}, renumber({ORDER: 1, INDEX: 1}, first=True)]
    if s.index_field is not None:
        out += set_fields([(s.index_field, "$" + INDEX)], temporary=(INDEX,))
    else:
        out.append({"$unset": INDEX})
    return out


def _lookup(s: Lookup, view: View) -> Stages:
    """The equality form, the looked-up collection seen through the caller's view of it
    (its row rules and readable fields applied by the server), in ``_id`` order. A local
    value that is an empty array matches nothing (some servers match null to it); a
    dotted ``as`` is set as ``$addFields`` sets."""
    found = {
        "$lookup": {
            "from": s.collection,
            "localField": ".".join(s.local),
            "foreignField": ".".join(s.foreign),
            "pipeline": view_stages(view, numbered=False),
            "as": JOINED,
        }
    }
    local = expr(Field(s.local))
    none = {"$cond": [{"$eq": [local, {"$literal": []}]}, {"$literal": []}, "$" + JOINED]}
    return [found, {"$set": {JOINED: none}}, *set_fields([(s.as_, "$" + JOINED)], (JOINED,))]


def _bucket(s: Bucket) -> Stages:
    """``$bucket`` as MongoDB documents it, written as a ``$group`` on the bucket's index
    (some servers drop a null ``default``): buckets in boundary order, the default last."""
    bounds = list(s.boundaries)
    v = "$$dbproxy_g"
    branches = [
        {
            "case": {"$and": [{"$gte": [v, {"$literal": lo}]}, {"$lt": [v, {"$literal": hi}]}]},
            "then": i,
        }
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds))
    ]
    other = (
        len(bounds) - 1
        if s.has_default
        else fail("$bucket: a value outside the boundaries and no default")
    )
    index = {
        "$let": {
            "vars": {"dbproxy_g": {"$ifNull": [expr(s.group_by), None]}},
            "in": {"$switch": {"branches": branches, "default": other}},
        }
    }
    accs, after = accumulators(s.output)
    ids = [*bounds[:-1], s.default]
    out: Stages = [
        {"$group": {"_id": index, **accs}},
        renumber({"_id": 1}, first=True),
        {"$set": {"_id": {"$arrayElemAt": [{"$literal": ids}, "$_id"]}}},
    ]
    if after:
        out.append({"$set": after})
    return out
