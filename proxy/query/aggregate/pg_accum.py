"""PostgreSQL SQL of the accumulators of ``$group`` and ``$bucket`` (docs/aggregation.md,
"Accumulators"): built-in aggregates per type bracket, ordered ones by the input order."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.query.aggregate.ast import Accumulator, Lit
from proxy.query.aggregate.pg_expr import NULL, ExprCompiler, is_type, num, txt

Order = Sequence[tuple[str, bool]]


def order_sql(order: Order, flip: bool = False) -> str:
    return ", ".join(f"{e}{' DESC' if d != flip else ''}" for e, d in order)


def _ordered(order: Order, flip: bool = False) -> str:
    return f" ORDER BY {order_sql(order, flip)}" if order else ""


def counts(acc: Accumulator) -> bool:
    """``$sum`` / ``$count`` of a constant: no argument to evaluate per row."""
    return acc.op in ("sum", "count") and isinstance(acc.arg, Lit)


def accumulator_sql(
    c: ExprCompiler,
    acc: Accumulator,
    x: str | None,
    v: str | None,
    order: Order,
    declared_number: bool = False,
) -> str:
    """One aggregate expression (jsonb) over the rows of a group: ``x`` the argument's
    jsonb value in a row, ``v`` its number (numeric, NULL when it is none: missing, null or
    another type), each computed once per row (proxy.query.aggregate.pg_group), None when
    this accumulator does not read it; ``order`` is the rows' input order (SQL over their
    columns). ``declared_number``: by an enforced schema the argument is a number or
    missing (never null, never another type), so ``$min``/``$max`` are its number bracket
    alone; a value stored around dbproxy that breaks the schema fails the statement
    (expression_failed, when ``v`` casts it)."""
    op = acc.op
    if counts(acc):
        assert isinstance(acc.arg, Lit)
        k = c.lit(acc.arg.value)
        return f"to_jsonb(count(*) * CASE WHEN {is_type(k, 'number')} THEN {num(k)} ELSE 0 END)"
    if op in ("sum", "count"):
        return f"to_jsonb(COALESCE(sum({v}), 0))"
    if op == "avg":
        return f"COALESCE(to_jsonb(avg({v})), {NULL})"
    if op in ("min", "max"):
        if declared_number:
            return f"COALESCE(to_jsonb({op}({v})), {NULL})"
        assert x is not None and v is not None
        return _min_max(c, x, v, op)
    assert x is not None
    if op == "first":
        return f"(array_agg(COALESCE({x}, {NULL}){_ordered(order)}))[1]"
    if op == "last":
        return f"(array_agg(COALESCE({x}, {NULL}){_ordered(order, flip=True)}))[1]"
    pushed = (
        f"COALESCE(jsonb_agg({x}{_ordered(order)}) FILTER (WHERE {x} IS NOT NULL), '[]'::jsonb)"
    )
    if op == "push":
        return pushed
    if op == "addToSet":
        return f"{c.schema}.dbproxy_agg_distinct({pushed})"
    raise TypeError(f"unknown accumulator ${op}")


def _min_max(c: ExprCompiler, x: str, v: str, op: str) -> str:
    """The smallest / largest value in the type order (numbers < strings < objects < arrays
    < booleans), null and missing ignored: built-in aggregates for numbers (``v``) and
    strings, the rare brackets (objects, arrays, booleans) through one comparing aggregate
    that only their rows reach (each aggregate costs every row its call: fewer is faster).
    A row whose ``v`` is a number skips the type tests of the other brackets."""
    other = f"{v} IS NULL AND "
    strings = f'CASE WHEN {other}{is_type(x, "string")} THEN {txt(x)} END COLLATE "C"'
    rare = (
        f"{c.schema}.dbproxy_agg_{op}({x}) "
        f"FILTER (WHERE {other}jsonb_typeof({x}) IN ('object', 'array', 'boolean'))"
    )
    if op == "min":
        parts = [f"to_jsonb(min({v}))", f"to_jsonb(min({strings}))", rare]
    else:
        parts = [rare, f"to_jsonb(max({strings}))", f"to_jsonb(max({v}))"]
    return f"COALESCE({', '.join(parts)}, {NULL})"
