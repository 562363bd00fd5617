"""Pure-Python reference evaluator of the dbproxy query language.

This module is the oracle of the differential tests: every backend must agree with it. It
implements ``docs/query-language.md`` literally and simply; clarity beats speed everywhere.

Public API
----------
``MISSING``                              sentinel for an absent field
``type_name(v)``                         "null" | "bool" | "number" | "string" | "object" | "array"
``values_equal(a, b)``                   type-aware equality (``True != 1``, ``1 == 1.0``)
``value_key(v)``                         total-order key following the sort ranks
``compare_values(a, b)``                 -1 / 0 / 1 using ``value_key``
``values(doc, path)`` / ``candidates(doc, path)``
``validate_filter(flt)``                 raises ``InvalidQuery`` / ``ForbiddenOperator``
``matches(doc, flt)``                    filter evaluation (validates first)
``sort_value(doc, path)`` / ``sort_key(doc, path)`` / ``apply_sort(docs, sort)``
``project(doc, fields)``
``apply_update(doc, update)``            returns a new document, raises ``UpdateTypeError``
``update_paths_conflict(update)``        True when two target paths overlap
``merge_patch(target, patch)``           RFC 7396

Limits (node count, depth, list sizes, regex length, 16 path segments) are deliberately
not enforced here: they are configurable and the random tests stay far below them.
"""

from __future__ import annotations

import copy
import enum
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

from proxy.errors import ForbiddenOperator, InvalidQuery

__all__ = [
    "FORBIDDEN_OPERATORS",
    "LOGICAL_OPERATORS",
    "MISSING",
    "TYPE_ALIASES",
    "UPDATE_OPERATORS",
    "VALUE_OPERATORS",
    "UpdateTypeError",
    "apply_sort",
    "apply_update",
    "candidates",
    "compare_values",
    "is_operator_object",
    "matches",
    "merge_patch",
    "project",
    "sort_key",
    "sort_value",
    "type_name",
    "update_paths_conflict",
    "validate_filter",
    "validate_path",
    "value_key",
    "values",
    "values_equal",
]

Json = Any


class _Missing(enum.Enum):
    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "MISSING"


#: An absent field. Never equal to anything but itself; sorts like null.
MISSING = _Missing.MISSING


class UpdateTypeError(ValueError):
    """An update operator met a value of the wrong type (``$inc`` on a string, ``$push`` on
    a number, a path through a scalar, ...). The whole update is rejected."""


LOGICAL_OPERATORS = frozenset({"$and", "$or", "$nor"})
VALUE_OPERATORS = frozenset(
    {
        "$eq",
        "$ne",
        "$gt",
        "$gte",
        "$lt",
        "$lte",
        "$in",
        "$nin",
        "$exists",
        "$type",
        "$regex",
        "$options",
        "$all",
        "$size",
        "$elemMatch",
        "$not",
    }
)
#: Server-side code: rejected with ``forbidden_operator`` wherever they appear.
FORBIDDEN_OPERATORS = frozenset({"$where", "$function", "$accumulator"})
UPDATE_OPERATORS = frozenset(
    {
        "$set",
        "$unset",
        "$inc",
        "$mul",
        "$min",
        "$max",
        "$push",
        "$pull",
        "$addToSet",
        "$rename",
    }
)
TYPE_ALIASES: dict[str, str] = {
    "null": "null",
    "number": "number",
    "double": "number",
    "int": "number",
    "long": "number",
    "decimal": "number",
    "string": "string",
    "object": "object",
    "array": "array",
    "bool": "bool",
    "boolean": "bool",
}
_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
_RANKS = {"null": 1, "number": 2, "string": 3, "object": 4, "array": 5, "bool": 6}
#: MongoDB refuses to pad an array by more than this many nulls.
_MAX_PADDING = 10_000  # the highest index an update may pad an array to


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------


def type_name(v: Json) -> str:
    """The type bracket of a JSON value (MISSING has none: ``ValueError``)."""
    if v is None:
        return "null"
    if isinstance(v, bool):  # before int: bool is a subclass of int
        return "bool"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, dict):
        return "object"
    if isinstance(v, list):
        return "array"
    raise ValueError(f"not a JSON value: {v!r}")


def values_equal(a: Json, b: Json) -> bool:
    """Type-aware deep equality: numbers across int/float, never bool vs number, object
    key order ignored, arrays element-wise. MISSING equals only MISSING."""
    if a is MISSING or b is MISSING:
        return a is b
    ta, tb = type_name(a), type_name(b)
    if ta != tb:
        return False
    if ta == "object":
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    if ta == "array":
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def value_key(v: Json) -> tuple[Any, ...]:
    """A key whose natural Python order is the language's value order: rank first (missing
    and null share rank 1), then numbers by value, strings by code point, booleans
    false < true. Objects (sorted by key, then pairwise) and arrays (element-wise,
    shorter first on a common prefix) get a deterministic order; backends may differ
    there, the spec leaves it to the database."""
    if v is MISSING or v is None:
        return (1,)
    t = type_name(v)
    if t == "array":
        return (5, tuple(value_key(x) for x in v))
    if t == "object":
        return (4, tuple((k, value_key(v[k])) for k in sorted(v)))
    return (_RANKS[t], v)


def compare_values(a: Json, b: Json) -> int:
    """-1, 0 or 1 in the order of ``value_key``."""
    ka, kb = value_key(a), value_key(b)
    return (ka > kb) - (ka < kb)


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------


def _is_index(seg: str) -> bool:
    # str.isdigit() alone also accepts e.g. "²"; the spec means ASCII digits.
    return seg.isascii() and seg.isdigit()


def validate_path(path: object) -> list[str]:
    """Split a field path, raising ``InvalidQuery`` for an invalid one."""
    if not isinstance(path, str) or path == "":
        raise InvalidQuery(f"invalid field path {path!r}")
    segs = path.split(".")
    for seg in segs:
        if seg == "" or seg.startswith("$"):
            raise InvalidQuery(f"invalid field path {path!r}")
    return segs


def values(doc: Json, path: str) -> list[Json]:
    """The values reached by ``path`` (array fan-out one level per segment), literally the
    algorithm of the spec. Items are JSON values or MISSING; never empty."""
    current: list[Json] = [doc]
    for seg in path.split("."):
        nxt: list[Json] = []
        for x in current:
            if isinstance(x, dict):
                nxt.append(x.get(seg, MISSING))
            elif isinstance(x, list):
                if _is_index(seg):
                    i = int(seg)
                    nxt.append(x[i] if i < len(x) else MISSING)
                else:
                    for e in x:
                        if isinstance(e, dict):
                            nxt.append(e.get(seg, MISSING))
                        # elements that are not objects are skipped
            else:  # scalar or MISSING
                nxt.append(MISSING)
        current = nxt
    if not current:
        current = [MISSING]
    return current


def _candidates_of(vals: Iterable[Json]) -> list[Json]:
    out: list[Json] = []
    for v in vals:
        out.append(v)
        if isinstance(v, list):
            out.extend(v)
    return out


def candidates(doc: Json, path: str) -> list[Json]:
    """``values(doc, path)`` plus the elements of every array among them (one level)."""
    return _candidates_of(values(doc, path))


# --------------------------------------------------------------------------------------
# Filter validation
# --------------------------------------------------------------------------------------


def is_operator_object(v: Json) -> bool:
    """A non-empty object whose keys all start with ``$`` (an object mixing ``$`` keys
    and plain keys is invalid: ``InvalidQuery``)."""
    if not isinstance(v, dict) or not v:
        return False
    dollar = [k.startswith("$") for k in v]
    if all(dollar):
        return True
    if any(dollar):
        raise InvalidQuery("an object may not mix operators and field names")
    return False


def _unknown_operator(op: str) -> InvalidQuery:
    if op in FORBIDDEN_OPERATORS:
        return ForbiddenOperator(f"operator {op} is not allowed")
    return InvalidQuery(f"unknown operator {op}")


@functools.lru_cache(maxsize=1024)
def _compile_regex(pattern: str, options: str) -> re.Pattern[str]:
    flags = 0
    for ch in options:
        if ch not in _REGEX_FLAGS:
            raise InvalidQuery(f"invalid regex option {ch!r}")
        flags |= _REGEX_FLAGS[ch]
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise InvalidQuery(f"invalid regular expression: {exc}") from None


def _is_scalar_comparand(v: Json) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def _size_arg(n: Json) -> int:
    # MongoDB accepts an integral double ($size: 2.0) and rejects 2.5 and negatives.
    if isinstance(n, bool) or not isinstance(n, int | float):
        raise InvalidQuery("$size needs a non-negative integer")
    if isinstance(n, float) and not n.is_integer():
        raise InvalidQuery("$size needs a non-negative integer")
    if n < 0:
        raise InvalidQuery("$size needs a non-negative integer")
    return int(n)


def _type_args(t: Json) -> set[str]:
    names = t if isinstance(t, list) else [t]
    if not names:
        raise InvalidQuery("$type needs a type name or a non-empty list of them")
    out = set()
    for name in names:
        if not isinstance(name, str) or name not in TYPE_ALIASES:
            raise InvalidQuery(f"unknown type {name!r}")
        out.add(TYPE_ALIASES[name])
    return out


def _elem_match_is_value_form(f: dict[str, Json]) -> bool:
    # As MongoDB: value form when the keys are (value) operators. An empty object and a
    # document starting with $and/$or/$nor are the document form.
    return bool(f) and all(k.startswith("$") and k not in LOGICAL_OPERATORS for k in f)


def _validate_ops(ops: dict[str, Json]) -> None:
    for op, arg in ops.items():
        if op not in VALUE_OPERATORS:
            raise _unknown_operator(op)
        if op in ("$gt", "$gte", "$lt", "$lte"):
            if not _is_scalar_comparand(arg):
                raise InvalidQuery(f"{op} needs a number, string, boolean or null")
        elif op in ("$in", "$nin"):
            if not isinstance(arg, list):
                raise InvalidQuery(f"{op} needs an array")
        elif op == "$all":
            if not isinstance(arg, list) or not arg:
                raise InvalidQuery("$all needs a non-empty array")
        elif op == "$exists":
            if not isinstance(arg, bool):
                raise InvalidQuery("$exists needs true or false")
        elif op == "$type":
            _type_args(arg)
        elif op == "$size":
            _size_arg(arg)
        elif op == "$regex":
            options = ops.get("$options", "")
            if not isinstance(arg, str) or not isinstance(options, str):
                raise InvalidQuery("$regex and $options need strings")
            _compile_regex(arg, options)
        elif op == "$options":
            if "$regex" not in ops:
                raise InvalidQuery("$options needs a $regex")
        elif op == "$elemMatch":
            if not isinstance(arg, dict):
                raise InvalidQuery("$elemMatch needs an object")
            if _elem_match_is_value_form(arg):
                _validate_ops(arg)
            else:
                validate_filter(arg)
        elif op == "$not":
            if isinstance(arg, str):
                _compile_regex(arg, "")
            elif is_operator_object(arg):
                _validate_ops(arg)
            else:
                raise InvalidQuery("$not needs an operator object or a regex")
        # $eq / $ne: any JSON value


def validate_filter(flt: Json) -> None:
    """Raise ``InvalidQuery`` (or ``ForbiddenOperator``) if ``flt`` is not a valid filter.

    Limits are not checked (see the module docstring)."""
    if not isinstance(flt, dict):
        raise InvalidQuery("a filter must be an object")
    for key, val in flt.items():
        if key.startswith("$"):
            if key not in LOGICAL_OPERATORS:
                raise _unknown_operator(key)
            if not isinstance(val, list) or not val:
                raise InvalidQuery(f"{key} needs a non-empty array of filters")
            for sub in val:
                validate_filter(sub)
        else:
            validate_path(key)
            if is_operator_object(val):
                _validate_ops(val)


# --------------------------------------------------------------------------------------
# Filter evaluation
# --------------------------------------------------------------------------------------


def _eq_holds(v: Json, cands: list[Json]) -> bool:
    if v is None:
        return any(c is None or c is MISSING for c in cands)
    return any(values_equal(c, v) for c in cands)


def _cmp_holds(op: str, v: Json, cands: list[Json]) -> bool:
    if v is None:
        return _eq_holds(None, cands) if op in ("$gte", "$lte") else False
    bracket = type_name(v)
    for c in cands:
        if c is MISSING or type_name(c) != bracket:
            continue
        if (
            (op == "$gt" and c > v)
            or (op == "$gte" and c >= v)
            or (op == "$lt" and c < v)
            or (op == "$lte" and c <= v)
        ):
            return True
    return False


def _regex_holds(pattern: str, options: str, cands: list[Json]) -> bool:
    rx = _compile_regex(pattern, options)
    return any(isinstance(c, str) and rx.search(c) is not None for c in cands)


def _elem_satisfies(e: Json, f: dict[str, Json]) -> bool:
    if _elem_match_is_value_form(f):
        # operator semantics on e alone: no further array expansion
        return _ops_hold(f, [e], [e])
    return isinstance(e, dict) and _matches(e, f)


def _op_holds(
    op: str, arg: Json, ops: dict[str, Json], vals: list[Json], cands: list[Json]
) -> bool:
    if op == "$eq":
        return _eq_holds(arg, cands)
    if op == "$ne":
        return not _eq_holds(arg, cands)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        return _cmp_holds(op, arg, cands)
    if op == "$in":
        return any(_eq_holds(v, cands) for v in arg)
    if op == "$nin":
        return not any(_eq_holds(v, cands) for v in arg)
    if op == "$exists":
        return any(v is not MISSING for v in vals) is arg
    if op == "$type":
        wanted = _type_args(arg)
        return any(c is not MISSING and type_name(c) in wanted for c in cands)
    if op == "$regex":
        return _regex_holds(arg, ops.get("$options", ""), cands)
    if op == "$options":
        return True  # consumed by $regex
    if op == "$all":
        return all(_eq_holds(v, cands) for v in arg)
    if op == "$size":
        n = _size_arg(arg)
        return any(isinstance(v, list) and len(v) == n for v in vals)
    if op == "$elemMatch":
        return any(isinstance(v, list) and any(_elem_satisfies(e, arg) for e in v) for v in vals)
    if op == "$not":
        if isinstance(arg, str):
            return not _regex_holds(arg, "", cands)
        return not _ops_hold(arg, vals, cands)
    raise _unknown_operator(op)


def _ops_hold(ops: dict[str, Json], vals: list[Json], cands: list[Json]) -> bool:
    return all(_op_holds(op, arg, ops, vals, cands) for op, arg in ops.items())


def _matches(doc: dict[str, Json], flt: dict[str, Json]) -> bool:
    for key, val in flt.items():
        if key == "$and":
            ok = all(_matches(doc, sub) for sub in val)
        elif key == "$or":
            ok = any(_matches(doc, sub) for sub in val)
        elif key == "$nor":
            ok = not any(_matches(doc, sub) for sub in val)
        else:
            vals = values(doc, key)
            cands = _candidates_of(vals)
            ok = _ops_hold(val, vals, cands) if is_operator_object(val) else _eq_holds(val, cands)
        if not ok:
            return False
    return True


def matches(doc: dict[str, Json], flt: dict[str, Json]) -> bool:
    """Does ``doc`` match filter ``flt``? Raises ``InvalidQuery``/``ForbiddenOperator``
    for an invalid filter, whatever the document."""
    validate_filter(flt)
    return _matches(doc, flt)


# --------------------------------------------------------------------------------------
# Sort
# --------------------------------------------------------------------------------------


def sort_value(doc: Json, path: str) -> Json:
    """Plain navigation: objects by key, numeric segments index arrays, no fan-out;
    anything else is MISSING."""
    cur: Json = doc
    for seg in path.split("."):
        if isinstance(cur, dict) and seg in cur:
            cur = cur[seg]
        elif isinstance(cur, list) and _is_index(seg) and int(seg) < len(cur):
            cur = cur[int(seg)]
        else:
            return MISSING
    return cur


def sort_key(doc: Json, path: str) -> tuple[Any, ...]:
    """Ascending sort key of ``doc`` for ``path`` (see ``value_key``)."""
    return value_key(sort_value(doc, path))


def _sort_key_of(path: str, doc: Json) -> tuple[Any, ...]:
    return sort_key(doc, path)


def apply_sort(docs: Sequence[dict[str, Json]], sort: Sequence[tuple[str, int]]) -> list[Json]:
    """Sort ``docs`` by ``sort`` = [(path, 1 | -1), ...] with ``_id`` ascending appended as
    the final tie-break. Returns a new list of the same document objects."""
    for path, direction in sort:
        validate_path(path)
        if isinstance(direction, bool) or direction not in (1, -1):
            raise InvalidQuery(f"sort direction must be 1 or -1, not {direction!r}")
    out = sorted(docs, key=lambda d: sort_key(d, "_id"))
    # Stable sorts from the least significant key to the most significant one
    # (``reverse=True`` keeps equal elements in their original order).
    for path, direction in reversed(sort):
        out.sort(key=functools.partial(_sort_key_of, path), reverse=direction == -1)
    return out


# --------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------

_ALWAYS_PROJECTED = ("_id", "_version")
_WHOLE = True


def project(doc: dict[str, Json], fields: Sequence[str]) -> dict[str, Json]:
    """Keep only ``fields`` (plus ``_id`` and ``_version``). A path into a missing field
    (or through a scalar) is omitted entirely; the first array met is kept whole.
    Overlapping paths (``a`` and ``a.b``) give the union, i.e. the larger one."""
    tree: dict[str, Any] = {}  # segment -> subtree | _WHOLE

    def add(segs: list[str]) -> None:
        node = tree
        for i, seg in enumerate(segs):
            if i == len(segs) - 1:
                node[seg] = _WHOLE
                return
            child = node.setdefault(seg, {})
            if child is _WHOLE:
                return
            node = child

    for path in [*_ALWAYS_PROJECTED, *fields]:
        segs = validate_path(path)
        cur: Json = doc
        kept: list[str] = []
        for seg in segs:
            if not isinstance(cur, dict) or seg not in cur:
                kept = []  # missing, or through a scalar: omitted
                break
            cur = cur[seg]
            kept.append(seg)
            if isinstance(cur, list):
                break  # projection does not go through arrays: keep the whole array
        if kept:
            add(kept)

    def build(node: dict[str, Any], src: dict[str, Json]) -> dict[str, Json]:
        return {
            k: copy.deepcopy(src[k]) if sub is _WHOLE else build(sub, src[k])
            for k, sub in node.items()
        }

    return build(tree, doc)


# --------------------------------------------------------------------------------------
# Updates
# --------------------------------------------------------------------------------------


def _paths_overlap(p: str, q: str) -> bool:
    a, b = p.split("."), q.split(".")
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _update_target_paths(update: dict[str, Json]) -> list[str]:
    paths: list[str] = []
    for op, fields in update.items():
        if not isinstance(fields, dict):
            continue
        for path, arg in fields.items():
            paths.append(path)
            if op == "$rename" and isinstance(arg, str):
                paths.append(arg)
    return paths


def update_paths_conflict(update: dict[str, Json]) -> bool:
    """True if two target paths of the update are equal or one is a prefix of the other
    (``a`` and ``a.b``), counting both sides of ``$rename``. MongoDB rejects those."""
    paths = _update_target_paths(update)
    return any(
        _paths_overlap(paths[i], paths[j])
        for i in range(len(paths))
        for j in range(i + 1, len(paths))
    )


def _is_number(v: Json) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _validate_update(update: Json) -> None:
    if not isinstance(update, dict) or not update:
        raise InvalidQuery("an update must be a non-empty object of update operators")
    for op, fields in update.items():
        if op not in UPDATE_OPERATORS:
            if op in FORBIDDEN_OPERATORS:
                raise ForbiddenOperator(f"operator {op} is not allowed")
            raise InvalidQuery(f"unknown update operator {op!r}")
        if not isinstance(fields, dict):
            raise InvalidQuery(f"{op} needs an object of field paths")
        for path, arg in fields.items():
            segs = validate_path(path)
            if segs[0] in _ALWAYS_PROJECTED:
                raise InvalidQuery(f"{segs[0]} cannot be updated")
            if op in ("$inc", "$mul") and not _is_number(arg):
                raise InvalidQuery(f"{op} needs a number")
            if op in ("$push", "$addToSet"):
                _each(arg)
            if op == "$pull" and is_operator_object(arg):
                _validate_ops(arg)
            if op == "$rename":
                if not isinstance(arg, str):
                    raise InvalidQuery("$rename needs a string path")
                dsegs = validate_path(arg)
                if dsegs[0] in _ALWAYS_PROJECTED:
                    raise InvalidQuery(f"{dsegs[0]} cannot be updated")
    if update_paths_conflict(update):
        raise InvalidQuery("two update paths conflict")


def _each(arg: Json) -> list[Json]:
    """The items a $push / $addToSet argument adds."""
    if isinstance(arg, dict) and any(k.startswith("$") for k in arg):
        if set(arg) != {"$each"} or not isinstance(arg["$each"], list):
            raise InvalidQuery("only {'$each': [...]} is supported as a modifier")
        return list(arg["$each"])
    return [arg]


def _resolve_parent(doc: dict[str, Json], segs: list[str], create: bool) -> Json:
    """The container holding the last segment, or MISSING. With ``create``, missing
    intermediates become objects (arrays are padded with nulls, as MongoDB does) and a
    path that cannot be created raises ``UpdateTypeError``."""
    cur: Json = doc
    for seg in segs[:-1]:
        if isinstance(cur, dict):
            if seg not in cur:
                if not create:
                    return MISSING
                cur[seg] = {}
            cur = cur[seg]
        elif isinstance(cur, list) and _is_index(seg):
            i = int(seg)
            if i >= len(cur):
                if not create:
                    return MISSING
                _put(cur, seg, {})
            cur = cur[i]
        else:
            if create:
                raise UpdateTypeError(f"cannot create field {seg!r} in {cur!r}")
            return MISSING
    if create and not (isinstance(cur, dict) or (isinstance(cur, list) and _is_index(segs[-1]))):
        raise UpdateTypeError(f"cannot create field {segs[-1]!r} in {cur!r}")
    return cur


def _get(parent: Json, seg: str) -> Json:
    if isinstance(parent, dict):
        return parent.get(seg, MISSING)
    if isinstance(parent, list) and _is_index(seg) and int(seg) < len(parent):
        return parent[int(seg)]
    return MISSING


def _put(parent: Json, seg: str, value: Json) -> None:
    if isinstance(parent, dict):
        parent[seg] = value
        return
    if not (isinstance(parent, list) and _is_index(seg)):
        raise UpdateTypeError(f"cannot create field {seg!r} in {parent!r}")
    i = int(seg)
    if i > len(parent) and i > _MAX_PADDING:
        raise UpdateTypeError("an update may extend an array up to index 10000 only")
    while len(parent) <= i:
        parent.append(None)
    parent[i] = value


def _apply_one(doc: dict[str, Json], op: str, path: str, arg: Json) -> None:
    segs = path.split(".")
    last = segs[-1]

    if op == "$unset":
        parent = _resolve_parent(doc, segs, create=False)
        if isinstance(parent, dict):
            parent.pop(last, None)
        elif _get(parent, last) is not MISSING:
            parent[int(last)] = None  # MongoDB nulls array elements instead of removing
        return

    if op == "$pull":
        parent = _resolve_parent(doc, segs, create=False)
        current = _get(parent, last)
        if isinstance(current, list):
            if is_operator_object(arg):
                keep = [e for e in current if not _ops_hold(arg, [e], [e])]
            else:
                keep = [e for e in current if not values_equal(e, arg)]
            _put(parent, last, keep)
        return

    if op == "$rename":
        _rename(doc, segs, arg.split("."))
        return

    parent = _resolve_parent(doc, segs, create=True)
    current = _get(parent, last)
    if op == "$set":
        new = copy.deepcopy(arg)
    elif op in ("$inc", "$mul"):
        if current is MISSING:
            new = arg if op == "$inc" else (0.0 if isinstance(arg, float) else 0)
        elif not _is_number(current):
            raise UpdateTypeError(f"{op} on a non-number at {path!r}")
        else:
            new = current + arg if op == "$inc" else current * arg
    elif op in ("$min", "$max"):
        c = compare_values(arg, current)
        if current is MISSING or (c < 0 if op == "$min" else c > 0):
            new = copy.deepcopy(arg)
        else:
            return
    elif op in ("$push", "$addToSet"):
        if current is MISSING:
            current = []
        elif not isinstance(current, list):
            raise UpdateTypeError(f"{op} on a non-array at {path!r}")
        new = list(current)
        for item in _each(arg):
            if op == "$push" or not any(values_equal(item, e) for e in new):
                new.append(copy.deepcopy(item))
    else:  # pragma: no cover - _validate_update rejects it
        raise InvalidQuery(f"unknown update operator {op!r}")
    _put(parent, last, new)


def _rename(doc: dict[str, Json], src: list[str], dst: list[str]) -> None:
    # MongoDB: a missing source is a no-op; an existing source inside an array, or a
    # destination through an array, is an error; the destination is created like $set
    # (and overwritten if present).
    cur: Json = doc
    through_array = False
    for seg in src[:-1]:
        nxt = _get(cur, seg)
        if nxt is MISSING:
            return  # missing source
        through_array = through_array or isinstance(cur, list)
        cur = nxt
    if _get(cur, src[-1]) is MISSING:
        return
    if through_array or isinstance(cur, list):
        raise UpdateTypeError("$rename: the source cannot be an array element")
    value = cur.pop(src[-1])
    target: Json = doc
    for seg in dst[:-1]:
        if not isinstance(target, dict):
            raise UpdateTypeError(f"$rename: cannot create field {seg!r} in {target!r}")
        target = target.setdefault(seg, {})
        if isinstance(target, list):
            raise UpdateTypeError("$rename: the destination cannot be an array element")
    if not isinstance(target, dict):
        raise UpdateTypeError(f"$rename: cannot create field {dst[-1]!r} in {target!r}")
    target[dst[-1]] = value


def apply_update(doc: dict[str, Json], update: dict[str, Json]) -> dict[str, Json]:
    """Apply a MongoDB-style update document to a copy of ``doc`` and return it.

    Raises ``InvalidQuery`` for a malformed update (unknown operator, conflicting paths,
    non-numeric ``$inc`` argument, ``_id``/``_version`` as a target, ...) and
    ``UpdateTypeError`` when the document's values do not fit the operator. ``doc`` is
    never modified."""
    _validate_update(update)
    out = copy.deepcopy(doc)
    for op, fields in update.items():
        for path, arg in fields.items():
            _apply_one(out, op, path, arg)
    return out


# --------------------------------------------------------------------------------------
# JSON Merge Patch
# --------------------------------------------------------------------------------------


def merge_patch(target: Json, patch: Json) -> Json:
    """RFC 7396 MergePatch(target, patch), without modifying either argument."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result
