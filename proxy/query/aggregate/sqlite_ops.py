"""Aggregation's string, array and type operators and ``$filter``/``$map``, compiled to
SQLite SQL over JSON text (the expression compiler calls these)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from proxy.errors import UnsupportedByBackend
from proxy.query.aggregate.ast import Iterate
from proxy.query.aggregate.sqlite_values import (
    OpCompiler,
    Sql,
    elem_json,
    jbool,
    jtype,
    jval,
    not_type,
    nullish,
    ordered,
)
from proxy.query.sqlite.agg_functions import FN_JNUM, FN_TODOUBLE, FN_TOSTR
from proxy.query.sqlite.functions import FN_CMP
from proxy.query.sqlite.values import BARRIER

# U+0000 is left out: no stored string holds it (refused on the way in, as PostgreSQL does)
WHITESPACE = (
    "\t\n\x0b\x0c\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_INT32 = "BETWEEN -2147483648 AND 2147483647"

Op = Callable[[OpCompiler, str, Sequence[Sql]], Sql]


def _value(c: OpCompiler, args: Sequence[Sql], body: Callable[[list[str]], str]) -> Sql:
    return Sql(c.bind(args, body), missing=False)


# ---- strings ---------------------------------------------------------------------------


def concat(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    if not args:
        return Sql("'\"\"'", leaf=True, missing=False)

    def body(r: list[str]) -> str:
        null = " OR ".join(nullish(x) for x in r)
        bad = " OR ".join(not_type(x, "text") for x in r)
        joined = " || ".join(jval(x) for x in r)
        return (
            f"(CASE WHEN {null} THEN 'null' WHEN {bad} THEN {c.fail('$concat takes strings')} "
            f"ELSE json_quote({joined}) END)"
        )

    return _value(c, args, body)


def case_map(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    fn = "lower" if op == "toLower" else "upper"

    def body(r: list[str]) -> str:
        x = r[0]
        return (
            f"(CASE WHEN {nullish(x)} THEN '\"\"' WHEN {not_type(x, 'text')} THEN "
            f"{c.fail(f'${op} takes a string')} ELSE json_quote({fn}({jval(x)})) END)"
        )

    return _value(c, args, body)


def substr_cp(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    def body(r: list[str]) -> str:
        s, start, count = r
        bad = " OR ".join(f"{not_type(x, 'integer')} OR {jval(x)} < 0" for x in (start, count))
        return (
            f"(CASE WHEN {nullish(s)} THEN '\"\"' WHEN {not_type(s, 'text')} THEN "
            f"{c.fail('$substrCP takes a string')} WHEN {bad} THEN "
            f"{c.fail('$substrCP takes a non-negative integer start and count')} "
            f"ELSE json_quote(substr({jval(s)}, {jval(start)} + 1, {jval(count)})) END)"
        )

    return _value(c, args, body)


def str_len(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    def body(r: list[str]) -> str:
        x = r[0]
        return (
            f"(CASE WHEN {not_type(x, 'text')} THEN {c.fail('$strLenCP takes a string')} "
            f"ELSE CAST(length({jval(x)}) AS TEXT) END)"
        )

    return _value(c, args, body)


def split(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    def body(r: list[str]) -> str:
        s, sep = r
        parts = (
            f"(WITH RECURSIVE sp(rest, part, i, sep) AS (SELECT {jval(s)} || {jval(sep)}, "
            f"NULL, 0, {jval(sep)} UNION ALL SELECT substr(rest, instr(rest, sep) + "
            f"length(sep)), substr(rest, 1, instr(rest, sep) - 1), i + 1, sep FROM sp "
            f"WHERE rest <> '') SELECT json_group_array(part) FROM "
            f"{ordered('SELECT part, i FROM sp WHERE i > 0', 'i')})"
        )
        bad = f"{not_type(s, 'text')} OR {not_type(sep, 'text')}"
        return (
            f"(CASE WHEN {nullish(s)} OR {nullish(sep)} THEN 'null' WHEN {bad} THEN "
            f"{c.fail('$split takes strings')} WHEN {jval(sep)} = '' THEN "
            f"{c.fail('$split takes a non-empty separator')} ELSE {parts} END)"
        )

    return _value(c, args, body)


def trim(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    default = args[1].text == "'null'"

    def body(r: list[str]) -> str:
        s, chars = r
        bad = not_type(s, "text")
        if default:
            what = c.p.add(WHITESPACE)
            null = nullish(s)
        else:
            what = jval(chars)
            null = f"{nullish(s)} OR {nullish(chars)}"
            bad = f"{bad} OR {not_type(chars, 'text')}"
        return (
            f"(CASE WHEN {null} THEN 'null' WHEN {bad} THEN {c.fail('$trim takes strings')} "
            f"ELSE json_quote(trim({jval(s)}, {what})) END)"
        )

    return _value(c, args, body)


# ---- arrays ----------------------------------------------------------------------------


def _array_guard(c: OpCompiler, op: str, arrays: Sequence[str], others: Sequence[str]) -> str:
    null = " OR ".join(nullish(x) for x in (*arrays, *others))
    bad = " OR ".join(not_type(x, "array") for x in arrays)
    return f"WHEN {null} THEN 'null' WHEN {bad} THEN {c.fail(f'${op} takes an array')}"


def size(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    def body(r: list[str]) -> str:
        x = r[0]
        return (
            f"(CASE WHEN {not_type(x, 'array')} THEN {c.fail('$size takes an array')} "
            f"ELSE CAST(json_array_length({x}) AS TEXT) END)"
        )

    return _value(c, args, body)


def elem_at(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    def body(r: list[str]) -> str:
        a, i = r
        idx = (
            f"(CASE WHEN {jval(i)} < 0 THEN json_array_length({a}) + {jval(i)} ELSE {jval(i)} END)"
        )
        return (
            f"(CASE {_array_guard(c, op, [a], [i])} WHEN {not_type(i, 'integer')} THEN "
            f"{c.fail('$arrayElemAt takes an integer index')} ELSE {a} -> {idx} END)"
        )

    return Sql(c.bind(args, body))


def in_array(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    def body(r: list[str]) -> str:
        x, a = r
        e = c.names.fresh("e")
        found = f"EXISTS (SELECT 1 FROM json_each({a}) {e} WHERE {FN_CMP}({elem_json(e)}, {x}) = 0)"
        return (
            f"(CASE WHEN {not_type(a, 'array')} THEN {c.fail('$in takes an array')} "
            f"WHEN {x} IS NULL THEN 'false' ELSE {jbool(found)} END)"
        )

    return _value(c, args, body)


def _elements(c: OpCompiler, source: str, where: str) -> str:
    """JSON array of the elements of ``source`` (a FROM item with rows ``e``) in order."""
    rows = f"SELECT {elem_json('e')} AS v, e.key AS k FROM {source} WHERE {where}"
    return f"(SELECT json_group_array(json(v)) FROM {ordered(rows, 'k')})"


def slice_(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    def body(r: list[str]) -> str:
        a, rest = r[0], r[1:]
        n = jval(rest[-1])
        length = f"json_array_length({a})"
        if len(rest) == 1:
            bad = not_type(rest[0], "integer")
            where = f"CASE WHEN {n} >= 0 THEN e.key < {n} ELSE e.key >= {length} + {n} END"
        else:
            pos = jval(rest[0])
            bad = f"{not_type(rest[0], 'integer')} OR {not_type(rest[1], 'integer')} OR {n} <= 0"
            start = f"(CASE WHEN {pos} < 0 THEN max({length} + {pos}, 0) ELSE {pos} END)"
            where = f"e.key >= {start} AND e.key < {start} + {n}"
        return (
            f"(CASE {_array_guard(c, op, [a], rest)} WHEN {bad} THEN "
            f"{c.fail('$slice takes integer positions and counts')} "
            f"ELSE {_elements(c, f'json_each({a}) e', where)} END)"
        )

    return _value(c, args, body)


def concat_arrays(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    if not args:
        return Sql("'[]'", leaf=True, missing=False)

    def body(r: list[str]) -> str:
        rows = " UNION ALL ".join(f"SELECT {i} AS n, {x} AS a" for i, x in enumerate(r))
        items = (
            f"SELECT {elem_json('e')} AS v, x.n AS n, e.key AS k FROM ({rows}) x, json_each(x.a) e"
        )
        joined = f"(SELECT json_group_array(json(v)) FROM {ordered(items, 'n, k')})"
        return f"(CASE {_array_guard(c, op, r, [])} ELSE {joined} END)"

    return _value(c, args, body)


MAX_ITERATE_NESTING = 5  # $filter/$map inside one another (SQLite's parser stack is small)


def iterate(c: OpCompiler, expr: Iterate, doc: str, env: Mapping[str, str]) -> Sql:
    """``$filter`` / ``$map`` over the elements of ``input`` in order: a subquery whose own
    CTEs (siblings, not nested) hold the per-element columns."""
    if c.nesting >= MAX_ITERATE_NESTING:
        raise UnsupportedByBackend(
            f"the embedded store nests $filter/$map at most {MAX_ITERATE_NESTING} deep",
            details={"feature": "deeply nested $filter/$map"},
        )
    source = c.ref(c.compile(expr.input, doc, env))
    limit = c.ref(c.compile(expr.limit, doc, env)) if expr.limit is not None else None
    a = source.text
    refuse = c.fail(f"${expr.op} takes an array")
    checks = f"WHEN {nullish(a)} THEN 'null' WHEN {not_type(a, 'array')} THEN {refuse}"
    if limit is not None:
        lim = limit.text
        bad = f"NOT {nullish(lim)} AND ({not_type(lim, 'integer')} OR {jval(lim)} < 1)"
        checks += f" WHEN {bad} THEN {c.fail('$filter takes a positive integer limit')}"
    status = c.lift(f"(CASE {checks} END)")  # NULL: the input is an array
    m = c.names.fresh("m")
    with c.inner_scope() as scope:
        body = c.ref(c.compile(expr.body, doc, {**env, expr.var: f"{m}.v"}))
        keep = c.lift(c.truthy(body)) if expr.op == "filter" else ""
    elements = f"json_each(CASE WHEN json_type({a}) = 'array' THEN {a} END) e"
    ctes, last = scope.ctes(
        f"(SELECT {elem_json('e')} AS v, e.key AS k FROM {elements})", m, c.names
    )
    fin = c.names.fresh("it")
    if expr.op == "map":
        rows = f"SELECT json(COALESCE({body.text}, 'null')) AS v, {m}.k AS k FROM {last} {m}"
    elif limit is None:
        rows = f"SELECT {m}.v AS v, {m}.k AS k FROM {last} {m} WHERE {keep}"
    else:
        numbered = (
            f"SELECT {m}.v AS v, {m}.k AS k, row_number() OVER (ORDER BY {m}.k) AS rn "
            f"FROM {last} {m} WHERE {keep}"
        )
        rows = (
            f"SELECT v, k FROM ({numbered}) WHERE {nullish(limit.text)} OR rn <= {jval(limit.text)}"
        )
    ctes.append(f"{fin} AS ({rows} ORDER BY k {BARRIER})")
    result = (
        f"(WITH {', '.join(ctes)} SELECT COALESCE({status}, json_group_array(json(v))) FROM {fin})"
    )
    return Sql(result, missing=False)


# ---- types -----------------------------------------------------------------------------


def type_of(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    def body(r: list[str]) -> str:
        x = r[0]
        return (
            f"(CASE {jtype(x)} WHEN 'missing' THEN '\"missing\"' WHEN 'null' THEN '\"null\"' "
            f"WHEN 'true' THEN '\"bool\"' WHEN 'false' THEN '\"bool\"' WHEN 'text' THEN "
            f"'\"string\"' WHEN 'object' THEN '\"object\"' WHEN 'array' THEN '\"array\"' "
            f"WHEN 'real' THEN '\"double\"' ELSE (CASE WHEN {jval(x)} {_INT32} THEN '\"int\"' "
            f"ELSE '\"long\"' END) END)"
        )

    return _value(c, args, body)


def to_string(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    def body(r: list[str]) -> str:
        x = r[0]
        return (
            f"(CASE {jtype(x)} WHEN 'missing' THEN 'null' WHEN 'null' THEN 'null' WHEN 'text' "
            f"THEN {x} WHEN 'true' THEN '\"true\"' WHEN 'false' THEN '\"false\"' WHEN 'integer' "
            f"THEN {FN_TOSTR}({x}) WHEN 'real' THEN {FN_TOSTR}({x}) "
            f"ELSE {c.fail('$toString cannot convert an object or an array')} END)"
        )

    return _value(c, args, body)


def to_int(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    def body(r: list[str]) -> str:
        x = r[0]
        v = jval(x)
        fail = c.fail("$toInt cannot convert the value to a 32-bit integer")
        digits = f"(CASE WHEN substr({v}, 1, 1) IN ('+', '-') THEN substr({v}, 2) ELSE {v} END)"
        text_ok = (
            f"{digits} <> '' AND {digits} NOT GLOB '*[^0-9]*' AND CAST({v} AS INTEGER) {_INT32}"
        )
        return (
            f"(CASE {jtype(x)} WHEN 'missing' THEN 'null' WHEN 'null' THEN 'null' WHEN 'true' "
            f"THEN '1' WHEN 'false' THEN '0' WHEN 'integer' THEN (CASE WHEN {v} {_INT32} THEN "
            f"CAST({v} AS TEXT) ELSE {fail} END) WHEN 'real' THEN (CASE WHEN trunc({v}) {_INT32} "
            f"THEN CAST(CAST({v} AS INTEGER) AS TEXT) ELSE {fail} END) WHEN 'text' THEN (CASE "
            f"WHEN {text_ok} THEN CAST(CAST({v} AS INTEGER) AS TEXT) ELSE {fail} END) "
            f"ELSE {fail} END)"
        )

    return _value(c, args, body)


def to_double(c: OpCompiler, op: str, args: Sequence[Sql]) -> Sql:
    def body(r: list[str]) -> str:
        x = r[0]
        v = jval(x)
        fail = c.fail("$toDouble cannot convert the value to a number")
        return (
            f"(CASE {jtype(x)} WHEN 'missing' THEN 'null' WHEN 'null' THEN 'null' WHEN 'true' "
            f"THEN '1.0' WHEN 'false' THEN '0.0' WHEN 'integer' THEN {c.num(op, f'1.0 * {v}')} "
            f"WHEN 'real' THEN {x} WHEN 'text' THEN COALESCE({FN_JNUM}({FN_TODOUBLE}({v})), "
            f"{fail}) ELSE {fail} END)"
        )

    return _value(c, args, body)


OPS: dict[str, Op] = {
    "concat": concat,
    "toLower": case_map,
    "toUpper": case_map,
    "substrCP": substr_cp,
    "strLenCP": str_len,
    "split": split,
    "trim": trim,
    "size": size,
    "arrayElemAt": elem_at,
    "in": in_array,
    "slice": slice_,
    "concatArrays": concat_arrays,
    "type": type_of,
    "toString": to_string,
    "toInt": to_int,
    "toDouble": to_double,
}
