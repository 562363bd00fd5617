"""String, array, type and conversion operators of the aggregation reference (registered in
``reference_aggregate_ops.OPERATORS``), as the table of docs/aggregation.md states them."""

from __future__ import annotations

import re
from typing import Any

from tests.reference import MISSING
from tests.reference_aggregate_ops import Env, Eval, _all, _op
from tests.reference_aggregate_values import (
    fail,
    is_integer,
    is_nullish,
    is_number,
    null_wins,
    same_value,
    truthy,
    unpromised,
)

Json = Any
LOADED = True

WHITESPACE = (
    "\u0000\u0009\u000a\u000b\u000c\u000d\u0020\u00a0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)
_INT_STRING = re.compile(r"[+-]?[0-9]+")
_DECIMAL_STRING = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_INT32 = (-(2**31), 2**31 - 1)


def _string(op: str, v: Json) -> str:
    if not isinstance(v, str):
        raise fail(op, f"needs a string, not {v!r}")
    return v


def _array(op: str, v: Json) -> list[Json]:
    if not isinstance(v, list):
        raise fail(op, f"needs an array, not {v!r}")
    return v


def _int(op: str, v: Json, minimum: int | None = None) -> int:
    if not is_integer(v) or (minimum is not None and v < minimum):
        raise fail(op, f"needs an integer{'' if minimum is None else f' >= {minimum}'}: {v!r}")
    return int(v)


# ---- strings ------------------------------------------------------------------------------


@_op("$concat")
def _concat(arg: Json, env: Env, ev: Eval) -> Json:
    vals = _all(arg, env, ev)
    if null_wins("$concat", vals, lambda v: isinstance(v, str)):
        return None
    return "".join(_string("$concat", v) for v in vals)


def _ascii_case(op: str, arg: Json, env: Env, ev: Eval, upper: bool) -> Json:
    (v,) = _all(arg, env, ev)
    if is_nullish(v):
        return ""
    s = _string(op, v)
    src, dst = "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return s.translate(str.maketrans(src, dst) if upper else str.maketrans(dst, src))


@_op("$toLower")
def _to_lower(arg: Json, env: Env, ev: Eval) -> Json:
    return _ascii_case("$toLower", arg, env, ev, upper=False)


@_op("$toUpper")
def _to_upper(arg: Json, env: Env, ev: Eval) -> Json:
    return _ascii_case("$toUpper", arg, env, ev, upper=True)


@_op("$substrCP")
def _substr_cp(arg: Json, env: Env, ev: Eval) -> Json:
    s, start, count = _all(arg, env, ev)
    start = _int("$substrCP", start, 0)
    count = _int("$substrCP", count, 0)
    if is_nullish(s):
        return ""
    return _string("$substrCP", s)[start : start + count]


@_op("$strLenCP")
def _str_len_cp(arg: Json, env: Env, ev: Eval) -> Json:
    (v,) = _all(arg, env, ev)
    return len(_string("$strLenCP", v))


@_op("$split")
def _split(arg: Json, env: Env, ev: Eval) -> Json:
    s, sep = _all(arg, env, ev)
    if is_nullish(s) or is_nullish(sep):
        return None
    s, sep = _string("$split", s), _string("$split", sep)
    if sep == "":
        raise fail("$split", "the separator may not be empty")
    return s.split(sep)


@_op("$trim")
def _trim(arg: Json, env: Env, ev: Eval) -> Json:
    s = ev(arg["input"], env)
    chars = ev(arg["chars"], env) if "chars" in arg else WHITESPACE
    if is_nullish(chars):  # the AST writes an absent chars as Lit(None): ambiguous
        unpromised("$trim with null chars")
    if is_nullish(s) or is_nullish(chars):
        return None
    return _string("$trim", s).strip(_string("$trim", chars))


# ---- arrays -------------------------------------------------------------------------------


@_op("$size")
def _size(arg: Json, env: Env, ev: Eval) -> Json:
    (v,) = _all(arg, env, ev)
    return len(_array("$size", v))


@_op("$arrayElemAt")
def _array_elem_at(arg: Json, env: Env, ev: Eval) -> Json:
    arr, i = _all(arg, env, ev)
    if is_nullish(arr) or is_nullish(i):
        return None
    arr, i = _array("$arrayElemAt", arr), _int("$arrayElemAt", i)
    return arr[i] if -len(arr) <= i < len(arr) else MISSING


@_op("$in")
def _in(arg: Json, env: Env, ev: Eval) -> Json:
    x, arr = _all(arg, env, ev)
    arr = _array("$in", arr)
    return x is not MISSING and any(same_value(x, e) for e in arr)


def _iterate(arg: Json, env: Env, ev: Eval) -> tuple[list[Json] | None, str]:
    v = ev(arg["input"], env)
    if is_nullish(v):
        return None, ""
    return _array("$" + ("filter" if "cond" in arg else "map"), v), arg.get("as", "this")


@_op("$filter")
def _filter(arg: Json, env: Env, ev: Eval) -> Json:
    arr, name = _iterate(arg, env, ev)
    limit = ev(arg["limit"], env) if "limit" in arg else None
    if arr is None:
        return None
    if "limit" in arg and is_nullish(limit):
        unpromised("$filter with a null limit")  # MongoDB: no limit
        limit = None
    if limit is not None:
        limit = _int("$filter", limit, 1)
    out = [e for e in arr if truthy(ev(arg["cond"], env.bind(name, e)))]
    return out if limit is None else out[:limit]


@_op("$map")
def _map(arg: Json, env: Env, ev: Eval) -> Json:
    arr, name = _iterate(arg, env, ev)
    if arr is None:
        return None
    return [None if (v := ev(arg["in"], env.bind(name, e))) is MISSING else v for e in arr]


@_op("$slice")
def _slice(arg: Json, env: Env, ev: Eval) -> Json:
    vals = _all(arg, env, ev)
    if any(is_nullish(v) for v in vals):
        return None
    arr = _array("$slice", vals[0])
    if len(vals) == 2:
        n = _int("$slice", vals[1])
        return arr[:n] if n >= 0 else arr[max(len(arr) + n, 0) :]
    pos, n = _int("$slice", vals[1]), _int("$slice", vals[2], 1)
    start = pos if pos >= 0 else max(len(arr) + pos, 0)
    return arr[start : start + n]


@_op("$concatArrays")
def _concat_arrays(arg: Json, env: Env, ev: Eval) -> Json:
    vals = _all(arg, env, ev)
    if null_wins("$concatArrays", vals, lambda v: isinstance(v, list)):
        return None
    return [e for v in vals for e in _array("$concatArrays", v)]


# ---- types and conversions --------------------------------------------------------------


def type_of(v: Json) -> str:
    if v is MISSING:
        return "missing"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int" if _INT32[0] <= v <= _INT32[1] else "long"
    if isinstance(v, float):
        return "double"
    if isinstance(v, str):
        return "string"
    return "object" if isinstance(v, dict) else "array"


@_op("$type")
def _type(arg: Json, env: Env, ev: Eval) -> Json:
    (v,) = _all(arg, env, ev)
    return type_of(v)


@_op("$toString")
def _to_string(arg: Json, env: Env, ev: Eval) -> Json:
    (v,) = _all(arg, env, ev)
    if is_nullish(v) or isinstance(v, str):
        return None if v is MISSING else v
    if isinstance(v, bool):
        return "true" if v else "false"
    if is_integer(v):
        return str(v)
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 2**53:
            if v == 0 and str(v).startswith("-"):
                unpromised("$toString of -0.0")
            return str(int(v))
        unpromised("$toString of a non-integral (or huge) double")
        return repr(v)
    raise fail("$toString", f"cannot convert {v!r}")


@_op("$toInt")
def _to_int(arg: Json, env: Env, ev: Eval) -> Json:
    (v,) = _all(arg, env, ev)
    if is_nullish(v):
        return None
    if isinstance(v, bool):
        return int(v)
    if is_integer(v) or isinstance(v, float):
        n = int(v)  # toward zero
    elif isinstance(v, str) and _INT_STRING.fullmatch(v):
        n = int(v)
    else:
        raise fail("$toInt", f"cannot convert {v!r}")
    if not _INT32[0] <= n <= _INT32[1]:
        raise fail("$toInt", f"{v!r} is outside 32 bits")
    return n


@_op("$toDouble")
def _to_double(arg: Json, env: Env, ev: Eval) -> Json:
    (v,) = _all(arg, env, ev)
    if is_nullish(v):
        return None
    if isinstance(v, bool):
        return float(v)
    if is_number(v):
        return float(v)
    if isinstance(v, str) and _DECIMAL_STRING.fullmatch(v):
        d = float(v)
        if d not in (float("inf"), float("-inf")):
            return d
    raise fail("$toDouble", f"cannot convert {v!r}")
