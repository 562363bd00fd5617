"""Values of the aggregation reference: the expression type order, truthiness, field paths and
the path edits ($addFields/$unset/$project) of docs/aggregation.md ("Values", "Stages")."""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.reference import MISSING, type_name, values_equal

Json = Any

_RANK = {"null": 1, "number": 2, "string": 3, "object": 4, "array": 5, "bool": 6}


class ExpressionFailed(Exception):
    """A run-time failure the contract names ``expression_failed``."""


class Unpromised(Exception):
    """Raised in strict mode when a result would depend on what the contract leaves open
    (object-vs-object ordering, ``$toString`` of a non-integral double, ...)."""


_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("strict", default=False)


@contextmanager
def strict_mode() -> Iterator[None]:
    """Within the block, ``unpromised()`` raises ``Unpromised``."""
    token = _STRICT.set(True)
    try:
        yield
    finally:
        _STRICT.reset(token)


def unpromised(what: str) -> None:
    """Mark that the result depends on something the contract does not promise."""
    if _STRICT.get():
        raise Unpromised(what)


def null_wins(op: str, vals: list[Json], accepts: Any) -> bool:
    """True when a null/missing argument makes the result null. The contract does not say
    which wins when there is also an argument of the wrong type: unpromised then."""
    if not any(is_nullish(v) for v in vals):
        return False
    if any(not is_nullish(v) and not accepts(v) for v in vals):
        unpromised(f"{op} of null and a value of the wrong type")
    return True


def fail(op: str, why: str) -> ExpressionFailed:
    return ExpressionFailed(f"{op}: {why}")


# ---- types --------------------------------------------------------------------------


def is_number(v: Json) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def is_integer(v: Json) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_nullish(v: Json) -> bool:
    return v is None or v is MISSING


def truthy(v: Json) -> bool:
    """``false``, null, missing and 0 are false; everything else is true."""
    if v is MISSING or v is None or v is False:
        return False
    return not (is_number(v) and v == 0)


# ---- order --------------------------------------------------------------------------


def _rank(v: Json) -> int:
    return 0 if v is MISSING else _RANK[type_name(v)]


def compare(a: Json, b: Json) -> int:
    """-1 / 0 / 1 in the expression order: missing < null < numbers < strings < objects <
    arrays < booleans. Objects by their sorted-key form (unpromised between two objects)."""
    ra, rb = _rank(a), _rank(b)
    if ra != rb:
        return -1 if ra < rb else 1
    if ra in (0, 1):
        return 0
    if isinstance(a, list):
        for x, y in zip(a, b, strict=False):
            c = compare(x, y)
            if c:
                return c
        return (len(a) > len(b)) - (len(a) < len(b))
    if isinstance(a, dict):
        unpromised("object-vs-object comparison")
        return compare(_sorted_form(a), _sorted_form(b))
    return int(a > b) - int(a < b)


def _sorted_form(obj: dict[str, Json]) -> list[Json]:
    return [[k, obj[k]] for k in sorted(obj)]


order_key = functools.cmp_to_key(compare)


def min_value(vals: list[Json]) -> Json:
    return functools.reduce(lambda x, y: y if compare(y, x) < 0 else x, vals)


def max_value(vals: list[Json]) -> Json:
    return functools.reduce(lambda x, y: y if compare(y, x) > 0 else x, vals)


def same_value(a: Json, b: Json) -> bool:
    """Type-aware equality (``1 == 1.0``, ``True != 1``, key order ignored)."""
    return values_equal(a, b)


# ---- field paths ----------------------------------------------------------------------


def get_path(v: Json, segs: list[str]) -> Json:
    """Expression field path: objects by key, arrays mapped (objects entered, arrays mapped
    recursively, scalars skipped, missing dropped); a path into a scalar is missing."""
    if not segs:
        return v
    if isinstance(v, dict):
        return get_path(v[segs[0]], segs[1:]) if segs[0] in v else MISSING
    if isinstance(v, list):
        out = []
        for e in v:
            if isinstance(e, dict | list):
                r = get_path(e, segs)
                if r is not MISSING:
                    out.append(r)
        return out
    return MISSING


def get_through_objects(v: Json, segs: list[str]) -> Json:
    """Follow ``segs`` through objects only ($unwind)."""
    for seg in segs:
        if not isinstance(v, dict) or seg not in v:
            return MISSING
        v = v[seg]
    return v


def set_path(v: Json, segs: list[str], value: Json) -> Json:
    """A copy of ``v`` with ``segs`` set to ``value`` as ``$addFields`` does: into objects,
    over arrays (each element), a scalar replaced by an object. A missing value unsets."""
    if value is MISSING:
        return unset_path(v, segs)
    if not segs:
        return value
    if isinstance(v, list):
        return [set_path(e, segs, value) for e in v]
    out = dict(v) if isinstance(v, dict) else {}
    out[segs[0]] = set_path(out.get(segs[0], MISSING), segs[1:], value)
    return out


def unset_path(v: Json, segs: list[str]) -> Json:
    """A copy of ``v`` without ``segs``: removed from objects, and from each object element
    of arrays on the way."""
    if isinstance(v, list):
        _nested_arrays(v, "$unset")
        return [unset_path(e, segs) for e in v]
    if not isinstance(v, dict) or segs[0] not in v:
        return v
    out = dict(v)
    if len(segs) == 1:
        del out[segs[0]]
    else:
        out[segs[0]] = unset_path(out[segs[0]], segs[1:])
    return out


def _nested_arrays(v: list[Json], stage: str) -> None:
    if any(isinstance(e, list) for e in v):
        unpromised(f"{stage} of a path through an array of arrays")


def include_paths(v: Json, tree: dict[str, Any]) -> Json:
    """``$project`` inclusion of stored paths: ``tree`` maps a segment to ``True`` (keep the
    value) or a subtree; arrays on the way keep their object elements' sub-fields and drop
    their scalar elements. Missing for a scalar."""
    if isinstance(v, list):
        _nested_arrays(v, "$project")
        return [r for e in v if (r := include_paths(e, tree)) is not MISSING]
    if not isinstance(v, dict):
        return MISSING
    out: dict[str, Json] = {}
    for seg, sub in tree.items():
        if seg not in v:
            continue
        r = v[seg] if sub is True else include_paths(v[seg], sub)
        if r is not MISSING:
            out[seg] = r
    return out


# ---- result comparison --------------------------------------------------------------------


def close_equal(a: Json, b: Json) -> bool:
    """Type-aware deep equality with numbers compared at rel 1e-9 / abs 1e-12."""
    if a is MISSING or b is MISSING:
        return a is b
    ta, tb = type_name(a), type_name(b)
    if ta != tb:
        return False
    if ta == "number":
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if ta == "object":
        return a.keys() == b.keys() and all(close_equal(a[k], b[k]) for k in a)
    if ta == "array":
        return len(a) == len(b) and all(close_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
