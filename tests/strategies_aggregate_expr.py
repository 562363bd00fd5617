"""Hypothesis strategies for aggregation expressions: valid raw expressions over the fields of
``strategies_aggregate.documents()``, typed loosely so that most evaluate and some fail."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

Json = Any
Strategy = st.SearchStrategy

__all__ = ["KINDS", "expressions", "pick", "typed"]

NUMBERS = (-2, -1, 0, 1, 2, 3, 5, 0.5, -1.5, 2.25, 1.0)
STRINGS = ("", "a", "b", "ab", "B", "é", " a ", "a-b")
#: Field references by the kind of value they mostly hold.
FIELDS = {
    "num": ("$a", "$c.x", "$arr.x", "$cnt"),
    "str": ("$b", "$c.y", "$_id"),
    "arr": ("$tags", "$arr", "$arr.x", "$a"),
    "bool": ("$c.f",),
    "any": ("$a", "$b", "$c", "$tags", "$arr", "$c.x", "$nope", "$$ROOT.b"),
}
KINDS = ("num", "str", "arr", "bool", "any")
Scope = tuple[str, ...]  # the variable names bound by enclosing $filter/$map


def _leaf(kind: str, scope: Scope) -> Strategy[Json]:
    fields = list(FIELDS[kind])
    for name in scope:
        fields += [f"$${name}", f"$${name}.x"]
    literal: Strategy[Json] = {
        "num": st.sampled_from(NUMBERS),
        "str": st.sampled_from(STRINGS),
        "arr": st.lists(st.sampled_from((*NUMBERS[:4], *STRINGS[:3], None)), max_size=3),
        "bool": st.booleans(),
        "any": st.sampled_from((None, 1, 2.5, "a", True)),
    }[kind]
    return st.one_of(st.sampled_from(fields), literal)


def expressions(depth: int = 2, kind: str = "any", scope: Scope = ()) -> Strategy[Json]:
    """Valid raw expressions (``depth`` levels of operators) mostly of ``kind``."""
    return typed(kind, depth, scope)


def typed(kind: str, depth: int, scope: Scope = ()) -> Strategy[Json]:
    """An expression mostly of ``kind``: at ``depth`` 0 a field or a literal, else one time in
    three a leaf, two in three an operator (its arguments one level less deep)."""
    if depth <= 0:
        return _leaf(kind, scope)
    if kind == "any":
        return pick(_leaf("any", scope), *(typed(k, depth, scope) for k in KINDS[:4]))
    builder = {"num": _number_ops, "str": _string_ops, "arr": _array_ops, "bool": _bool_ops}[kind]
    ops = builder(depth - 1, scope)
    return pick(_leaf(kind, scope), ops, ops)


def pick(*choices: Strategy[Json]) -> Strategy[Json]:
    """One of ``choices``, each equally likely (``st.one_of`` favours the first ones)."""
    return st.sampled_from(choices).flatmap(lambda s: s)


def _op(name: str, *args: Strategy[Json]) -> Strategy[Json]:
    return st.tuples(*args).map(lambda xs: {name: list(xs)})


def _u(name: str) -> Any:
    """A one-argument operator: bare (``{"$abs": x}``) unless ``x`` is an array literal,
    which must be wrapped (``{"$size": [[1, 2]]}``) not to read as an argument list."""
    return lambda x: {name: [x]} if isinstance(x, list) else {name: x}


def _int(lo: int, hi: int) -> Strategy[int]:
    return st.integers(lo, hi)


def _number_ops(d: int, scope: Scope) -> Strategy[Json]:
    n = typed("num", d, scope)
    return pick(
        st.lists(n, max_size=3).map(lambda xs: {"$add": xs}),
        st.lists(n, min_size=1, max_size=3).map(lambda xs: {"$multiply": xs}),
        _op("$subtract", n, n),
        _op("$divide", n, st.sampled_from((1, 2, 4, -0.5, "$a"))),
        _op("$mod", n, st.sampled_from((2, 3, -2, "$a"))),
        n.map(_u("$abs")),
        n.map(_u("$floor")),
        n.map(_u("$ceil")),
        st.one_of(n.map(_u("$round")), _op("$round", n, _int(-1, 2))),
        typed("arr", d, scope).map(_u("$size")),
        typed("str", d, scope).map(_u("$strLenCP")),
        _op("$arrayElemAt", typed("arr", d, scope), _int(-2, 2)),
        _op("$cmp", typed("any", d, scope), typed("any", d, scope)),
        st.sampled_from(("num", "str", "bool")).flatmap(
            lambda k: typed(k, d, scope).map(_u("$toInt"))
        ),
        typed("any", d, scope).map(_u("$toDouble")),
        _op("$cond", typed("bool", d, scope), n, n),
        _op("$ifNull", n, n),
    )


def _string_ops(d: int, scope: Scope) -> Strategy[Json]:
    s = typed("str", d, scope)
    to_string_arg = st.one_of(s, typed("bool", d, scope), typed("num", d, scope).map(_u("$floor")))
    return pick(
        st.lists(s, max_size=3).map(lambda xs: {"$concat": xs}),
        s.map(_u("$toLower")),
        s.map(_u("$toUpper")),
        _op("$substrCP", s, _int(0, 2), _int(0, 3)),
        st.builds(
            lambda x, chars: {"$trim": {"input": x, **chars}},
            s,
            st.one_of(st.just({}), st.sampled_from(("a", " ", "ab")).map(lambda c: {"chars": c})),
        ),
        to_string_arg.map(_u("$toString")),
        typed("any", d, scope).map(_u("$type")),
        _op("$arrayElemAt", _op("$split", s, st.sampled_from(("a", "-", " "))), _int(-1, 1)),
        _op("$cond", typed("bool", d, scope), s, s),
        st.builds(lambda xs: {"$ifNull": xs}, st.lists(s, min_size=2, max_size=3)),
        st.builds(
            _switch,
            st.lists(st.tuples(typed("bool", d, scope), s), min_size=1, max_size=2),
            st.one_of(st.none(), s),
        ),
    )


def _switch(branches: list[tuple[Json, Json]], default: Json) -> Json:
    spec: dict[str, Json] = {"branches": [{"case": c, "then": t} for c, t in branches]}
    if default is not None:
        spec["default"] = default
    return {"$switch": spec}


def _array_ops(d: int, scope: Scope) -> Strategy[Json]:
    a = typed("arr", d, scope)
    var = st.sampled_from(("this", "v"))
    return pick(
        _op("$split", typed("str", d, scope), st.sampled_from(("a", "-", " "))),
        var.flatmap(lambda name: _filter(a, name, d, scope)),
        var.flatmap(lambda name: _map(a, name, d, scope)),
        st.one_of(_op("$slice", a, _int(-3, 3)), _op("$slice", a, _int(-3, 3), _int(1, 3))),
        st.lists(a, max_size=3).map(lambda xs: {"$concatArrays": xs}),
        st.lists(typed("any", d, scope), max_size=3),
        _op("$cond", typed("bool", d, scope), a, a),
    )


def _spec(name: str, **fields: Json) -> dict[str, Json]:
    return {**({} if name == "this" else {"as": name}), **fields}


def _filter(a: Strategy[Json], name: str, d: int, scope: Scope) -> Strategy[Json]:
    inner = (*scope, name)
    return st.builds(
        lambda x, cond, limit: {"$filter": _spec(name, input=x, cond=cond, **limit)},
        a,
        typed("bool", d, inner),
        st.one_of(st.just({}), _int(1, 3).map(lambda n: {"limit": n})),
    )


def _map(a: Strategy[Json], name: str, d: int, scope: Scope) -> Strategy[Json]:
    inner = (*scope, name)
    body = st.sampled_from(("num", "str", "any")).flatmap(lambda k: typed(k, d, inner))
    return st.builds(lambda x, e: {"$map": _spec(name, input=x, **{"in": e})}, a, body)


def _bool_ops(d: int, scope: Scope) -> Strategy[Json]:
    b = typed("bool", d, scope)
    comparand = st.sampled_from(("num", "str", "any")).flatmap(lambda k: typed(k, d, scope))
    cmp = st.sampled_from(("$eq", "$ne", "$gt", "$gte", "$lt", "$lte"))
    return pick(
        st.builds(lambda op, x, y: {op: [x, y]}, cmp, comparand, comparand),
        st.builds(
            lambda op, xs: {op: xs}, st.sampled_from(("$and", "$or")), st.lists(b, max_size=3)
        ),
        st.one_of(b.map(_u("$not")), typed("any", d, scope).map(_u("$not"))),
        _op("$in", typed("any", d, scope), typed("arr", d, scope)),
        st.builds(lambda c, t, e: {"$cond": {"if": c, "then": t, "else": e}}, b, b, b),
    )
