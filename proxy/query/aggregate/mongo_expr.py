"""Aggregation expressions and accumulators compiled for MongoDB's own pipeline: from the
validated AST only; where docs/aggregation.md narrows MongoDB (a non-string to ``$toLower``)
the compiled expression tests the type and fails as the contract says."""

from __future__ import annotations

import re
from typing import Any

from proxy.query.aggregate.ast import (
    Accumulator,
    Arr,
    Call,
    Expr,
    Field,
    Iterate,
    Lit,
    Obj,
    Switch,
    Var,
)

ORDER = "__dbproxy_o"  # every document's place in the stream (an integer, 1 up)
FAIL_MARK = "dbproxy!"
_PATH_DEPTH = 3  # arrays within arrays a field path maps (deeper ones give [])
# operators that answer the same for a missing argument as for null
_NULL_IS_MISSING = frozenset(
    [
        "add",
        "multiply",
        "subtract",
        "divide",
        "mod",
        "abs",
        "floor",
        "ceil",
        "round",
        "concat",
        "split",
        "trim",
        "arrayElemAt",
        "slice",
        "concatArrays",
        "toString",
        "toInt",
        "toDouble",
        "size",
        "strLenCP",
    ]
)
FAILED = re.compile(r"dbproxy!([A-Za-z$ ]{1,80})!")


def fail(message: str) -> Any:
    """An expression that fails when evaluated (a conversion of a text that is no number;
    it reads the current document, so the server cannot fold it ahead of time). The
    server's error text carries ``message``, which ``FAILED`` finds again."""
    marked = {"$concat": [FAIL_MARK + message + "!", {"$substrCP": [{"$type": "$$ROOT"}, 0, 0]}]}
    return {"$toInt": marked}


def _let(name: str, value: Any, body: Any) -> Any:
    return {"$let": {"vars": {name: value}, "in": body}}


def _type_in(ref: str, kinds: list[str]) -> Any:
    return {"$in": [{"$type": ref}, kinds]}


def without_order(doc: Any) -> Any:
    """``doc`` (an object) without the stream-order field."""
    pairs = {"$cond": [{"$eq": [doc, {"$literal": {}}]}, [], {"$objectToArray": doc}]}
    kept = {
        "$filter": {
            "input": pairs,
            "as": "dbproxy_kv",
            "cond": {"$ne": ["$$dbproxy_kv.k", ORDER]},
        }
    }
    return {"$arrayToObject": [kept]}


def expr(e: Expr) -> Any:
    """One expression as MongoDB writes it."""
    if isinstance(e, Field):
        if not e.path:
            return without_order("$$CURRENT")
        return path("$" + e.path[0], e.path[1:])
    if isinstance(e, Var):
        return path("$$" + e.name, e.path)
    if isinstance(e, Lit):
        return {"$literal": e.value}
    if isinstance(e, Call):
        return _call(e)
    if isinstance(e, Obj):
        return {k: expr(v) for k, v in e.fields}
    if isinstance(e, Arr):  # an item giving missing is null
        return [x.value if isinstance(x, Lit) else {"$ifNull": [expr(x), None]} for x in e.items]
    if isinstance(e, Switch):
        branches = [{"case": expr(c), "then": expr(t)} for c, t in e.branches]
        if e.default is None:
            # a never-true case that reads the document: without it a constant $switch
            # with no true case fails when the pipeline is optimised, over no input too
            never = {"$eq": [{"$type": "$$ROOT"}, "missing"]}
            branches.insert(0, {"case": never, "then": None})
        spec: dict[str, Any] = {"branches": branches}
        if e.default is not None:
            spec["default"] = expr(e.default)
        return {"$switch": spec}
    if isinstance(e, Iterate):
        return _iterate(e)
    raise TypeError(f"not an expression: {e!r}")


def path(start: Any, segs: tuple[str, ...]) -> Any:
    """``start`` followed by ``segs`` as the contract (and MongoDB's documentation) reads a
    field path: objects by key; an array mapped, its objects entered and its arrays mapped
    again, what gives missing dropped. Written out, not left to the server's own path
    reading, which some servers do not map through arrays."""
    if not segs:
        return start
    return {"$arrayElemAt": [_found(start, segs, 0), 0]}  # [] → missing


def _found(start: Any, segs: tuple[str, ...], depth: int) -> Any:
    """``[value]`` of the path, or ``[]`` when it gives missing (a missing value is never
    passed between expressions: some servers mistype it)."""
    if not segs:
        return [start]
    var, seg, rest = f"dbproxy_f{depth}", segs[0], segs[1:]
    here = "$$" + var
    on_object = {"$cond": [has_key(here, seg), _found(f"{here}.{seg}", rest, depth + 1), []]}
    if depth >= _PATH_DEPTH:
        mapped: Any = [[]]
    else:
        each = {"$concatArrays": ["$$value", _found("$$this", segs, depth + 1)]}
        mapped = [{"$reduce": {"input": here, "initialValue": [], "in": each}}]
    body = {
        "$cond": [
            {"$eq": [{"$type": here}, "object"]},
            on_object,
            {"$cond": [{"$isArray": here}, mapped, []]},
        ]
    }
    return {"$let": {"vars": {var: {"$ifNull": [start, None]}}, "in": body}}


def has_key(obj: str, key: str) -> Any:
    """Whether the object ``obj`` holds ``key`` (some servers read a missing key of a
    variable as null)."""
    keys = {"$map": {"input": {"$objectToArray": obj}, "as": "dbproxy_kv", "in": "$$dbproxy_kv.k"}}
    return {"$in": [key, keys]}


def set_in(current: Any, segs: tuple[str, ...], new: str, depth: int = 0) -> Any:
    """``current`` with ``segs`` set to ``new`` as ``$addFields`` sets a dotted path
    (MongoDB's documentation): into objects, over arrays (each element; a scalar element
    becomes an object), a scalar replaced by an object. ``new`` is never missing."""
    if not segs:
        return new
    var, seg, rest = f"dbproxy_t{depth}", segs[0], segs[1:]
    here = "$$" + var
    child = {"$cond": [has_key(here, seg), f"{here}.{seg}", "$$REMOVE"]}
    on_object = {"$mergeObjects": [here, {seg: set_in(child, rest, new, depth + 1)}]}
    fresh = {seg: set_in("$$REMOVE", rest, new, depth + 1)}
    if depth < _PATH_DEPTH:
        each = set_in("$$" + var + "e", segs, new, depth + 1)
        mapped: Any = {"$map": {"input": here, "as": var + "e", "in": each}}
    else:
        mapped = here
    body = {
        "$cond": [
            {"$eq": [{"$type": here}, "object"]},
            on_object,
            {"$cond": [{"$isArray": here}, mapped, fresh]},
        ]
    }
    return {"$let": {"vars": {var: {"$ifNull": [current, None]}}, "in": body}}


def unset_in(current: Any, segs: tuple[str, ...], depth: int = 0) -> Any:
    """``current`` without ``segs`` as ``$unset`` removes a dotted path (MongoDB's
    documentation): from objects, and from each object element of arrays on the way."""
    var, seg, rest = f"dbproxy_u{depth}", segs[0], segs[1:]
    here = "$$" + var
    if rest:
        child = f"{here}.{seg}"
        inner = {"$mergeObjects": [here, {seg: unset_in(child, rest, depth + 1)}]}
        on_object: Any = {"$cond": [has_key(here, seg), inner, here]}
    else:
        pairs = {"$cond": [{"$eq": [here, {"$literal": {}}]}, [], {"$objectToArray": here}]}
        kept = {
            "$filter": {
                "input": pairs,
                "as": "dbproxy_kv",
                "cond": {"$ne": ["$$dbproxy_kv.k", seg]},
            }
        }
        on_object = {"$arrayToObject": [kept]}
    if depth < _PATH_DEPTH:
        each = unset_in("$$" + var + "e", segs, depth + 1)
        mapped: Any = {"$map": {"input": here, "as": var + "e", "in": each}}
    else:
        mapped = here
    body = {
        "$cond": [
            {"$eq": [{"$type": here}, "object"]},
            on_object,
            {"$cond": [{"$isArray": here}, mapped, here]},
        ]
    }
    return {"$let": {"vars": {var: current}, "in": body}}


def value(e: Expr) -> Any:
    """An expression where a stage reads a field's value (``$project``, ``$addFields``):
    an object there would read as a nested specification, so it is wrapped."""
    if isinstance(e, Obj):
        return {"$mergeObjects": [expr(e)]}
    return expr(e)


def _iterate(e: Iterate) -> Any:
    source = {"$ifNull": [expr(e.input), None]}  # missing as null, as for _NULL_IS_MISSING
    if e.op == "map":
        return {"$map": {"input": source, "as": e.var, "in": expr(e.body)}}
    spec: dict[str, Any] = {"input": source, "as": e.var, "cond": expr(e.body)}
    if e.limit is not None:
        spec["limit"] = expr(e.limit)
    return {"$filter": spec}


def _call(e: Call) -> Any:
    op, args = e.op, [expr(a) for a in e.args]
    if op in _NULL_IS_MISSING:  # a computed missing as null (some servers mistype it)
        args = [
            a if isinstance(x, Lit) else {"$ifNull": [a, None]}
            for a, x in zip(args, e.args, strict=True)
        ]
    if op in ("toLower", "toUpper"):
        return _strings_only(op, args[0], {"$" + op: "$$dbproxy_s"}, "")
    if op == "substrCP":
        body = {"$substrCP": ["$$dbproxy_s", args[1], args[2]]}
        return _strings_only(op, args[0], body, "")
    if op == "trim":
        spec = {"input": args[0]}
        if not (isinstance(e.args[1], Lit) and e.args[1].value is None):
            spec["chars"] = args[1]
        return {"$trim": spec}
    if op == "not":
        return {"$not": [args[0]]}
    if op in ("abs", "floor", "ceil", "strLenCP", "size", "type", "toString", "toInt", "toDouble"):
        return {"$" + op: [args[0]]}
    return {"$" + op: args}


def _strings_only(op: str, arg: Any, body: Any, on_null: Any) -> Any:
    """``body`` over ``$$dbproxy_s`` when ``arg`` is a string, ``on_null`` when it is null
    or missing, else a failure (MongoDB would convert a number)."""
    s = "$$dbproxy_s"
    checked = {
        "$cond": [
            _type_in(s, ["string"]),
            body,
            {"$cond": [_type_in(s, ["null"]), on_null, fail(f"${op} needs a string")]},
        ]
    }
    return _let("dbproxy_s", {"$ifNull": [arg, None]}, checked)


# ---- $group ---------------------------------------------------------------------------


def group_key(e: Expr) -> Any:
    """A ``$group`` key: missing is null, also in each part of an object key."""
    if isinstance(e, Obj):
        return {k: group_key(v) for k, v in e.fields}
    if isinstance(e, Lit | Arr):
        return expr(e)
    return {"$ifNull": [expr(e), None]}


def accumulators(
    items: tuple[tuple[str, Accumulator], ...],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The accumulators of a ``$group``/``$bucket`` output, and the ``$set`` that finishes
    them (``$addToSet`` keeps each value at its first appearance: a ``$push``, then the
    repeats removed in order)."""
    out: dict[str, Any] = {}
    after: dict[str, Any] = {}
    for name, acc in items:
        arg = _accumulated(acc.arg)
        if acc.op in ("first", "last", "push", "addToSet") and not isinstance(acc.arg, Field):
            # made to read the document: some servers refuse a constant there, or fold it
            # and read it as the array operator of the same name
            on_doc = {"$eq": [{"$type": "$$ROOT"}, "object"]}
            arg = {"$cond": [on_doc, expr(acc.arg), None]}
        if acc.op == "count":
            out[name] = {"$sum": 1}
        elif acc.op == "addToSet":
            out[name] = {"$push": arg}
            after[name] = _distinct("$" + name)
        else:
            out[name] = {"$" + acc.op: arg}
    out[ORDER] = {"$min": "$" + ORDER}
    return out, after


def _accumulated(e: Expr) -> Any:
    """An accumulator's argument; a plain constant as itself (some servers refuse a
    ``$literal`` there)."""
    if isinstance(e, Lit) and (
        e.value is None
        or isinstance(e.value, bool | int | float)
        or (isinstance(e.value, str) and not e.value.startswith("$"))
    ):
        return e.value
    return expr(e)


def _distinct(array: str) -> Any:
    keep = {
        "$cond": [
            {"$in": ["$$this", "$$value"]},
            "$$value",
            {"$concatArrays": ["$$value", ["$$this"]]},
        ]
    }
    return {"$reduce": {"input": array, "initialValue": [], "in": keep}}
