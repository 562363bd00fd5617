"""Expression operators of the aggregation reference (arithmetic, comparison, logic, strings,
arrays, types), one small function each, as the table of docs/aggregation.md states them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any

from tests.reference_aggregate_values import (
    compare,
    fail,
    is_integer,
    is_nullish,
    is_number,
    null_wins,
    same_value,
    truthy,
)

Json = Any


@dataclass(frozen=True)
class Env:
    """The current document and the variables bound by enclosing ``$filter``/``$map``."""

    root: Json
    variables: dict[str, Json] = field(default_factory=dict)

    def bind(self, name: str, value: Json) -> Env:
        return Env(self.root, {**self.variables, name: value})


Eval = Callable[[Json, Env], Json]
Operator = Callable[[Json, Env, Eval], Json]
OPERATORS: dict[str, Operator] = {}


def _op(name: str) -> Callable[[Operator], Operator]:
    def register(fn: Operator) -> Operator:
        OPERATORS[name] = fn
        return fn

    return register


def _args(arg: Json) -> list[Json]:
    return arg if isinstance(arg, list) else [arg]


def _all(arg: Json, env: Env, ev: Eval) -> list[Json]:
    return [ev(a, env) for a in _args(arg)]


def _numbers(op: str, vals: list[Json]) -> list[int | float]:
    for v in vals:
        if not is_number(v):
            raise fail(op, f"needs numbers, not {v!r}")
    return vals


# ---- arithmetic -------------------------------------------------------------------------


@_op("$literal")
def _literal(arg: Json, env: Env, ev: Eval) -> Json:
    return arg


@_op("$add")
def _add(arg: Json, env: Env, ev: Eval) -> Json:
    vals = _all(arg, env, ev)
    if null_wins("$add", vals, is_number):
        return None
    return sum(_numbers("$add", vals), 0)


@_op("$multiply")
def _multiply(arg: Json, env: Env, ev: Eval) -> Json:
    vals = _all(arg, env, ev)
    if null_wins("$multiply", vals, is_number):
        return None
    return math.prod(_numbers("$multiply", vals))


def _pair(op: str, arg: Json, env: Env, ev: Eval) -> tuple[Json, Json] | None:
    a, b = _all(arg, env, ev)
    if null_wins(op, [a, b], is_number):
        return None
    _numbers(op, [a, b])
    return a, b


@_op("$subtract")
def _subtract(arg: Json, env: Env, ev: Eval) -> Json:
    p = _pair("$subtract", arg, env, ev)
    return None if p is None else p[0] - p[1]


@_op("$divide")
def _divide(arg: Json, env: Env, ev: Eval) -> Json:
    p = _pair("$divide", arg, env, ev)
    if p is None:
        return None
    if p[1] == 0:
        raise fail("$divide", "division by zero")
    return float(p[0]) / p[1] if is_integer(p[0]) and is_integer(p[1]) else p[0] / p[1]


@_op("$mod")
def _mod(arg: Json, env: Env, ev: Eval) -> Json:
    p = _pair("$mod", arg, env, ev)
    if p is None:
        return None
    a, b = p
    if b == 0:
        raise fail("$mod", "division by zero")
    if is_integer(a) and is_integer(b):
        r = abs(a) % abs(b)
        return -r if a < 0 else r
    return math.fmod(a, b)


def _unary_number(op: str, arg: Json, env: Env, ev: Eval, fn: Callable[[Any], Any]) -> Json:
    (v,) = _all(arg, env, ev)
    if is_nullish(v):
        return None
    _numbers(op, [v])
    return v if is_integer(v) else float(fn(v))


@_op("$abs")
def _abs(arg: Json, env: Env, ev: Eval) -> Json:
    (v,) = _all(arg, env, ev)
    if is_nullish(v):
        return None
    return abs(_numbers("$abs", [v])[0])


@_op("$floor")
def _floor(arg: Json, env: Env, ev: Eval) -> Json:
    return _unary_number("$floor", arg, env, ev, math.floor)


@_op("$ceil")
def _ceil(arg: Json, env: Env, ev: Eval) -> Json:
    return _unary_number("$ceil", arg, env, ev, math.ceil)


@_op("$round")
def _round(arg: Json, env: Env, ev: Eval) -> Json:
    vals = _all(arg, env, ev)
    x, place = (vals[0], 0) if len(vals) == 1 else vals
    if is_nullish(x) or is_nullish(place):
        return None
    _numbers("$round", [x])
    if not is_integer(place) or not -20 <= place <= 100:
        raise fail("$round", f"place must be an integer in -20..100, not {place!r}")
    if is_integer(x) and place >= 0:
        return x
    # A double is rounded as its shortest decimal form (what it reads as).
    d = Decimal(x) if is_integer(x) else Decimal(repr(x))
    q = d.quantize(Decimal(1).scaleb(-place), rounding=ROUND_HALF_EVEN, context=Context(prec=200))
    return int(q) if is_integer(x) else float(q)


# ---- comparison and logic -------------------------------------------------------------------

_COMPARISONS: dict[str, Callable[[int], bool]] = {
    "$eq": lambda c: c == 0,
    "$ne": lambda c: c != 0,
    "$gt": lambda c: c > 0,
    "$gte": lambda c: c >= 0,
    "$lt": lambda c: c < 0,
    "$lte": lambda c: c <= 0,
}


def _comparison(name: str, test: Callable[[int], bool]) -> None:
    def op(arg: Json, env: Env, ev: Eval) -> Json:
        a, b = _all(arg, env, ev)
        if name in ("$eq", "$ne"):  # equality needs no order (objects: key order ignored)
            return test(0 if same_value(a, b) else 1)
        return test(compare(a, b))

    OPERATORS[name] = op


for _name, _test in _COMPARISONS.items():
    _comparison(_name, _test)


@_op("$cmp")
def _cmp(arg: Json, env: Env, ev: Eval) -> Json:
    a, b = _all(arg, env, ev)
    return compare(a, b)


@_op("$and")
def _and(arg: Json, env: Env, ev: Eval) -> Json:
    return all(truthy(ev(a, env)) for a in _args(arg))  # short-circuits, as MongoDB


@_op("$or")
def _or(arg: Json, env: Env, ev: Eval) -> Json:
    return any(truthy(ev(a, env)) for a in _args(arg))


@_op("$not")
def _not(arg: Json, env: Env, ev: Eval) -> Json:
    (v,) = _all(arg, env, ev)
    return not truthy(v)


@_op("$cond")
def _cond(arg: Json, env: Env, ev: Eval) -> Json:
    if isinstance(arg, dict):
        arg = [arg["if"], arg["then"], arg["else"]]
    cond, then, other = arg
    return ev(then, env) if truthy(ev(cond, env)) else ev(other, env)


@_op("$ifNull")
def _if_null(arg: Json, env: Env, ev: Eval) -> Json:
    *firsts, last = arg
    for e in firsts:
        v = ev(e, env)
        if not is_nullish(v):
            return v
    return ev(last, env)


@_op("$switch")
def _switch(arg: Json, env: Env, ev: Eval) -> Json:
    for branch in arg["branches"]:
        if truthy(ev(branch["case"], env)):
            return ev(branch["then"], env)
    if "default" not in arg:
        raise fail("$switch", "no branch is true and there is no default")
    return ev(arg["default"], env)
