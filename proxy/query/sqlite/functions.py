"""The Python helpers the SQLite store registers on every connection, and their SQL names:
canonical JSON, the value order, arithmetic, RE2 matching."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import orjson

from proxy import numbers
from proxy.errors import NumberOutOfRange
from proxy.query import regex

# Names of the helpers the backend registers on every connection.
FN_REGEXP = "dbp_regexp"  # (pattern, options, text) -> 0/1
FN_CANON = "dbp_canon"  # (json text) -> canonical json text
FN_CMP = "dbp_cmp"  # (json text, json text) -> -1/0/1 in the language's value order
FN_ARITH = "dbp_arith"  # ('inc'|'mul', json number, json number) -> json number
FN_FAIL = "dbp_fail"  # (code, message) -> raises; not deterministic
COLLATION = "dbp_json"  # container order for ORDER BY and keyset comparisons


def loads(raw: str | bytes) -> Any:
    """Parse JSON text written by orjson or by SQLite (numbers past 64 bits included)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def canonical(value: Any) -> str:
    """JSON text equal for equal values: sorted keys, ``1.0`` written as ``1``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    items = sorted(value.items())
    return "{" + ",".join(f"{orjson.dumps(k).decode()}:{canonical(v)}" for k, v in items) + "}"


def canonical_json(raw: str | None) -> str | None:
    """``dbp_canon``: NULL-safe, as SQLite may evaluate both sides of an AND."""
    return None if raw is None else canonical(loads(raw))


def order_key(value: Any) -> tuple[Any, ...]:
    """Sort key of a JSON value: type bracket, then numbers by value, strings by code point,
    booleans false < true, arrays element-wise, objects by their sorted (key, value) pairs."""
    if value is None:
        return (1,)
    if isinstance(value, bool):
        return (6, value)
    if isinstance(value, int | float):
        return (2, value)
    if isinstance(value, str):
        return (3, value)
    if isinstance(value, list):
        return (5, tuple(order_key(v) for v in value))
    return (4, tuple((k, order_key(value[k])) for k in sorted(value)))


@functools.lru_cache(maxsize=4096)
def _order_key_of(raw: str) -> tuple[Any, ...]:
    return order_key(loads(raw))


def compare_json(a: str, b: str) -> int:
    """-1, 0 or 1: the order of two JSON texts (the ``dbp_json`` collation)."""
    ka, kb = _order_key_of(a), _order_key_of(b)
    return (ka > kb) - (ka < kb)


def compare_json_sql(a: str | None, b: str | None) -> int | None:
    """``dbp_cmp``: ``compare_json``, NULL when either side is NULL (MISSING)."""
    return None if a is None or b is None else compare_json(a, b)


def arith(op: str, current: str, operand: str) -> str:
    """``$inc``/``$mul`` on two JSON numbers, with JSON's (IEEE double / integer) rules: a
    result outside signed 64 bits or beyond double range is refused (number_out_of_range)."""
    a, b = loads(current), loads(operand)
    result = a + b if op == "inc" else a * b
    if isinstance(result, int):
        if not numbers.INT64_MIN <= result <= numbers.INT64_MAX:
            raise NumberOutOfRange(
                f"${op} gives an integer outside signed 64 bits "
                f"({numbers.INT64_MIN} to {numbers.INT64_MAX})"
            )
        return str(result)
    if not math.isfinite(result):
        raise NumberOutOfRange(f"${op} gives a number beyond the range of a double")
    return orjson.dumps(result).decode()


compile_regex = regex.compile_regex  # RE2, compiled once per (pattern, options)
regex_search = regex.search
