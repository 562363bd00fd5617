"""The query language compiled for MongoDB: validated filters to filter documents, sorts to
computed keys, updates to update operators. Only the validated AST is read, never raw input."""

from __future__ import annotations

from typing import Any

from proxy.query.ast import (
    And,
    Cmp,
    ElemMatch,
    Eq,
    Exists,
    FieldCond,
    Filter,
    In,
    Never,
    Nor,
    Not,
    Or,
    Path,
    Pred,
    Regex,
    Size,
    SortKey,
    TypeIs,
    Update,
    is_index,
)
from proxy.query.common import TYPE_RANKS

_TYPES = {
    "null": "null",
    "number": "number",
    "string": "string",
    "object": "object",
    "array": "array",
    "bool": "bool",
}
NEVER: dict[str, Any] = {"_id": {"$in": []}}


def compile_filter(flt: Filter) -> dict[str, Any]:
    """A MongoDB filter document equivalent to ``flt`` (the language follows MongoDB's
    matching: arrays match through an element, type brackets, missing as null)."""
    if isinstance(flt, FieldCond):
        return _field(flt.path, flt.preds)
    if isinstance(flt, And):
        if not flt.children:
            return {}
        return _all([compile_filter(c) for c in flt.children])
    if isinstance(flt, Or):
        return {"$or": [compile_filter(c) for c in flt.children]} if flt.children else NEVER
    if isinstance(flt, Nor):
        return {"$nor": [compile_filter(c) for c in flt.children]} if flt.children else {}
    raise TypeError(f"not a filter node: {flt!r}")


def _all(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Documents that must all hold, as one document when their keys differ (the plain
    form: MongoDB's ``$elemMatch`` takes it where some servers refuse ``$and``)."""
    out: dict[str, Any] = {}
    for part in parts:
        if any(k in out for k in part):
            return {"$and": parts}
        out.update(part)
    return out


def both(a: dict[str, Any], b: dict[str, Any] | None) -> dict[str, Any]:
    """``a`` and ``b`` together (``b`` a row rule, possibly absent)."""
    if not b:
        return a
    if not a:
        return b
    return {"$and": [a, b]}


def _null_eq(path: Path) -> dict[str, Any]:
    """``{path: null}`` as the language (and MongoDB's documentation) means it: also when a
    prefix of the path is an array without an object element (the rest is missing there),
    which some servers do not match on their own."""
    alts: list[dict[str, Any]] = [{path.dotted: {"$eq": None}}]
    segs = path.segments
    for i in range(1, len(segs)):
        if is_index(segs[i]):
            continue
        prefix = ".".join(segs[:i])
        alts.append({prefix: {"$type": "array", "$not": {"$elemMatch": {"$type": "object"}}}})
    return alts[0] if len(alts) == 1 else {"$or": alts}


def _field(path: Path, preds: tuple[Pred, ...]) -> dict[str, Any]:
    name = path.dotted
    if len(path.segments) > 1 and any(_is_null_test(p) for p in preds):
        docs = [_null_test(path, p) if _is_null_test(p) else {name: pred_ops(p)} for p in preds]
        return docs[0] if len(docs) == 1 else {"$and": docs}
    parts = [pred_ops(p) for p in preds]
    merged: dict[str, Any] = {}
    for ops in parts:
        if any(k in merged for k in ops):
            return {"$and": [{name: ops} for ops in parts]}
        merged.update(ops)
    return {name: merged}


def _is_null_test(pred: Pred) -> bool:
    if isinstance(pred, Eq):
        return pred.value is None
    if isinstance(pred, In):
        return None in pred.values
    return isinstance(pred, Not) and len(pred.preds) == 1 and _is_null_test(pred.preds[0])


def _null_test(path: Path, pred: Pred) -> dict[str, Any]:
    if isinstance(pred, Eq):
        return _null_eq(path)
    if isinstance(pred, In):
        rest = [v for v in pred.values if v is not None]
        if not rest:
            return _null_eq(path)
        return {"$or": [{path.dotted: {"$in": rest}}, _null_eq(path)]}
    assert isinstance(pred, Not)
    return {"$nor": [_null_test(path, pred.preds[0])]}


def pred_ops(pred: Pred) -> dict[str, Any]:
    """One predicate as an operator document (``{"$gt": 1}``)."""
    if isinstance(pred, Eq):
        return {"$eq": pred.value}
    if isinstance(pred, Cmp):
        return {"$" + pred.op: pred.value}
    if isinstance(pred, In):
        return {"$in": list(pred.values)}
    if isinstance(pred, Exists):
        return {"$exists": pred.present}
    if isinstance(pred, TypeIs):
        return {"$type": [_TYPES[t] for t in pred.types]}
    if isinstance(pred, Regex):
        out: dict[str, Any] = {"$regex": pred.pattern}
        if pred.options:
            out["$options"] = pred.options
        return out
    if isinstance(pred, Size):
        return {"$size": pred.n}
    if isinstance(pred, ElemMatch):
        if pred.filter is not None:
            return {"$elemMatch": compile_filter(pred.filter)}
        return {"$elemMatch": _merged(pred.preds or ())}
    if isinstance(pred, Not):
        if len(pred.preds) == 1 and isinstance(pred.preds[0], Eq):
            return {"$ne": pred.preds[0].value}
        if len(pred.preds) == 1 and isinstance(pred.preds[0], In):
            return {"$nin": list(pred.preds[0].values)}
        return {"$not": _merged(pred.preds)}
    if isinstance(pred, Never):
        return {"$in": []}
    raise TypeError(f"not a predicate: {pred!r}")


def _merged(preds: tuple[Pred, ...]) -> dict[str, Any]:
    """Several predicates of one value as one operator document; several equalities (from
    ``$all``) become one ``$all``, which means the same."""
    out: dict[str, Any] = {}
    equal = [p.value for p in preds if isinstance(p, Eq)]
    if len(equal) > 1:
        out["$all"] = equal
    for p in preds:
        if isinstance(p, Eq) and len(equal) > 1:
            continue
        out.update(pred_ops(p))  # operators are an object's keys: only $eq repeats
    return out


# ---- sort keys ------------------------------------------------------------------------

RANK_KEY = "__dbproxy_r{}"
VALUE_KEY = "__dbproxy_v{}"


def sort_value_expr(path: Path) -> Any:
    """An aggregation expression for the plain navigation of the sort rules: objects by
    key, a numeric segment indexes an array, no fan-out; missing otherwise."""
    expr: Any = "$$ROOT"
    for seg in path.segments:
        # "$$x.<seg>" only on an object (no fan-out); $getField is not used, as some
        # servers answer it wrongly for a missing field
        field = "$$x." + seg
        on_object = {"$cond": [{"$eq": [{"$type": "$$x"}, "object"]}, field, "$$REMOVE"]}
        if is_index(seg) and len(seg) < 10:
            on_array = {"$arrayElemAt": ["$$x", int(seg)]}
            step: Any = {"$cond": [{"$isArray": "$$x"}, on_array, on_object]}
        else:
            step = on_object
        expr = {"$let": {"vars": {"x": expr}, "in": step}}
    return expr


def rank_expr(value: Any) -> Any:
    """The type bracket of a value (missing and null share rank 1)."""
    branches = [
        {"case": {"$in": [{"$type": value}, list(kinds)]}, "then": TYPE_RANKS[name]}
        for name, kinds in (
            ("number", ("double", "int", "long", "decimal")),
            ("string", ("string",)),
            ("object", ("object",)),
            ("array", ("array",)),
            ("bool", ("bool",)),
        )
    ]
    return {"$switch": {"branches": branches, "default": TYPE_RANKS["null"]}}


def sort_stages(keys: tuple[SortKey, ...]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The ``$set`` stage computing each key's (rank, scalar value) and the ``$sort`` order
    over them, ``_id`` last. Objects and arrays order by rank alone (then ``_id``)."""
    fields: dict[str, Any] = {}
    order: dict[str, int] = {}
    for i, key in enumerate(keys):
        direction = -1 if key.descending else 1
        value = sort_value_expr(key.path)
        fields[RANK_KEY.format(i)] = rank_expr(value)
        scalar = {"$cond": [{"$in": [{"$type": value}, ["object", "array"]]}, None, value]}
        fields[VALUE_KEY.format(i)] = {"$ifNull": [scalar, None]}
        order[RANK_KEY.format(i)] = direction
        order[VALUE_KEY.format(i)] = direction
    order["_id"] = 1
    return ([{"$set": fields}] if fields else []), order


def after_filter(order: dict[str, int], values: list[Any]) -> dict[str, Any]:
    """Rows strictly after the cursor row in ``order`` (the nested OR chain)."""
    names = list(order)
    out: dict[str, Any] | None = None
    for i in reversed(range(len(names))):
        name, value = names[i], values[i]
        op = "$lt" if order[name] < 0 else "$gt"
        strict = _strictly(name, op, value)
        out = strict if out is None else {"$or": [strict, {"$and": [{name: value}, out]}]}
    return out or {}


def _strictly(name: str, op: str, value: Any) -> dict[str, Any]:
    """After ``value`` among rows of the same rank (the chain compared the rank first): one
    type bracket, so the comparison operators are exact; a null key (null, missing, an
    object or an array) ties with every row of its rank."""
    if value is None:
        return NEVER
    return {name: {op: value}}


# ---- updates --------------------------------------------------------------------------


def compile_update(update: Update) -> dict[str, Any]:
    """The update operators of ``update``, plus the ``_version`` bump."""
    out: dict[str, dict[str, Any]] = {}
    for op in update.ops:
        name = op.path.dotted
        if op.op == "unset":
            out.setdefault("$unset", {})[name] = ""
        elif op.op in ("push", "addToSet"):
            out.setdefault("$" + op.op, {})[name] = {"$each": list(op.value)}
        elif op.op == "pull":
            if isinstance(op.value, tuple):
                cond: Any = _merged(op.value)
            else:
                cond = {"$in": [op.value]}
            out.setdefault("$pull", {})[name] = cond
        elif op.op == "rename":
            out.setdefault("$rename", {})[name] = op.value.dotted
        else:
            out.setdefault("$" + op.op, {})[name] = op.value
    out.setdefault("$inc", {})["_version"] = 1
    return out
