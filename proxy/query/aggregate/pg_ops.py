"""PostgreSQL SQL of the aggregation operators (``$add`` … ``$toDouble``), each a function of
the compiled operands; every type error goes through dbproxy_refuse (docs/aggregation.md)."""

from __future__ import annotations

from collections.abc import Callable

from proxy.numbers import DOUBLE_MAX_EXACT
from proxy.query.aggregate.pg_values import (
    DEFAULT_CHARS,
    NULL,
    OpCompiler,
    integral,
    is_type,
    nullish,
    num,
    truthy,
    txt,
)

Op = Callable[[OpCompiler, list[str]], str]
INT32 = (-(2**31), 2**31 - 1)
WHITESPACE = "".join(
    map(chr, [9, 10, 11, 12, 13, 32, 0xA0, 0x1680, *range(0x2000, 0x200B)])
) + "".join(map(chr, [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]))
_DECIMAL = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,4})?$"


def _any_nullish(xs: list[str]) -> str:
    return " OR ".join(nullish(x) for x in xs)


def _all(xs: list[str], kind: str) -> str:
    return " AND ".join(is_type(x, kind) for x in xs)


def _numeric(
    name: str, n_args: int | None, result: Callable[..., str], zero_check: bool = False
) -> Op:
    """An operator on numbers: null/missing → null, a non-number fails, else ``result``."""

    def op(c: OpCompiler, args: list[str]) -> str:
        if not args:
            return c.lit(0 if name == "add" else 1)

        def body(*xs: str) -> str:
            whens = f"WHEN {_any_nullish(list(xs))} THEN {NULL} "
            whens += f"WHEN NOT ({_all(list(xs), 'number')}) THEN "
            whens += c.fail(f"${name} needs numbers")
            if zero_check:
                whens += f" WHEN {num(xs[1])} = 0 THEN " + c.fail(f"${name} by zero")
            return f"(CASE {whens} ELSE to_jsonb({result(*[num(x) for x in xs])}) END)"

        return c.bind(args, body)

    return op


def _round(c: OpCompiler, args: list[str]) -> str:
    def body(x: str, place: str) -> str:
        ok = (
            f"{is_type(place, 'number')} AND {integral(place)} AND {num(place)} BETWEEN -20 AND 100"
        )
        return (
            f"(CASE WHEN {nullish(x)} OR {nullish(place)} THEN {NULL} "
            f"WHEN NOT {is_type(x, 'number')} THEN {c.fail('$round needs a number')} "
            f"WHEN NOT ({ok}) THEN {c.fail('$round: place must be an integer from -20 to 100')} "
            f"ELSE to_jsonb({c.schema}.dbproxy_agg_round({num(x)}, {num(place)}::int)) END)"
        )

    return c.bind(args, body)


def _compare(sql_op: str | None) -> Op:
    def op(c: OpCompiler, args: list[str]) -> str:
        cmp = f"{c.schema}.dbproxy_agg_cmp({args[0]}, {args[1]})"
        return f"to_jsonb({cmp} {sql_op} 0)" if sql_op else f"to_jsonb({cmp})"

    return op


def _and(c: OpCompiler, args: list[str]) -> str:
    return f"to_jsonb({' AND '.join(truthy(a) for a in args)})" if args else "'true'::jsonb"


def _or(c: OpCompiler, args: list[str]) -> str:
    return f"to_jsonb({' OR '.join(truthy(a) for a in args)})" if args else "'false'::jsonb"


def _not(c: OpCompiler, args: list[str]) -> str:
    return f"to_jsonb(NOT {truthy(args[0])})"


def _cond(c: OpCompiler, args: list[str]) -> str:
    return f"(CASE WHEN {truthy(args[0])} THEN {args[1]} ELSE {args[2]} END)"


def _if_null(c: OpCompiler, args: list[str]) -> str:
    firsts = ", ".join(f"NULLIF({a}, {NULL})" for a in args[:-1])
    return f"COALESCE({firsts}, {args[-1]})"


def _concat(c: OpCompiler, args: list[str]) -> str:
    if not args:
        return "'\"\"'::jsonb"

    def body(*xs: str) -> str:
        joined = " || ".join(txt(x) for x in xs)
        return (
            f"(CASE WHEN {_any_nullish(list(xs))} THEN {NULL} "
            f"WHEN NOT ({_all(list(xs), 'string')}) THEN {c.fail('$concat needs strings')} "
            f"ELSE to_jsonb({joined}) END)"
        )

    return c.bind(args, body)


def _case(upper: bool) -> Op:
    lo, up = "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    name = "$toUpper" if upper else "$toLower"

    def op(c: OpCompiler, args: list[str]) -> str:
        src, dst = (lo, up) if upper else (up, lo)

        def body(x: str) -> str:
            return (
                f"(CASE WHEN {nullish(x)} THEN '\"\"'::jsonb "
                f"WHEN NOT {is_type(x, 'string')} THEN {c.fail(f'{name} needs a string')} "
                f"ELSE to_jsonb(translate({txt(x)}, '{src}', '{dst}')) END)"
            )

        return c.bind(args, body)

    return op


def _non_negative_int(x: str) -> str:
    return f"{is_type(x, 'number')} AND {integral(x)} AND {num(x)} >= 0"


def _substr(c: OpCompiler, args: list[str]) -> str:
    def body(s: str, start: str, count: str) -> str:
        ok = f"{_non_negative_int(start)} AND {_non_negative_int(count)}"
        # beyond int range is past any string's end
        first = f"least({num(start)}, 2147483646)::int + 1"
        n = f"least({num(count)}, 2147483646)::int"
        return (
            f"(CASE WHEN NOT ({ok}) THEN "
            f"{c.fail('$substrCP: start and count must be non-negative integers')} "
            f"WHEN {nullish(s)} THEN '\"\"'::jsonb "
            f"WHEN NOT {is_type(s, 'string')} THEN {c.fail('$substrCP needs a string')} "
            f"ELSE to_jsonb(substr({txt(s)}, {first}, {n})) END)"
        )

    return c.bind(args, body)


def _strlen(c: OpCompiler, args: list[str]) -> str:
    def body(s: str) -> str:
        return (
            f"(CASE WHEN {is_type(s, 'string')} THEN to_jsonb(length({txt(s)})) "
            f"ELSE {c.fail('$strLenCP needs a string')} END)"
        )

    return c.bind(args, body)


def _split(c: OpCompiler, args: list[str]) -> str:
    def body(s: str, sep: str) -> str:
        return (
            f"(CASE WHEN {nullish(s)} OR {nullish(sep)} THEN {NULL} "
            f"WHEN NOT ({_all([s, sep], 'string')}) THEN {c.fail('$split needs strings')} "
            f"WHEN {txt(sep)} = '' THEN {c.fail('$split: the separator may not be empty')} "
            f"WHEN {txt(s)} = '' THEN '[\"\"]'::jsonb "
            f"ELSE to_jsonb(string_to_array({txt(s)}, {txt(sep)})) END)"
        )

    return c.bind(args, body)


def _trim(c: OpCompiler, args: list[str]) -> str:
    """``chars`` null or missing (or absent) strips whitespace (docs/aggregation.md)."""
    default = args[1] == DEFAULT_CHARS
    operands = args[:1] if default else args
    whitespace = c.p.add(WHITESPACE, "text")

    def body(s: str, chars: str | None = None) -> str:
        head = (
            f"(CASE WHEN {nullish(s)} THEN {NULL} "
            f"WHEN NOT {is_type(s, 'string')} THEN {c.fail('$trim needs a string')} "
        )
        if chars is None:
            return f"{head}ELSE to_jsonb(btrim({txt(s)}, {whitespace})) END)"
        return (
            f"{head}WHEN {nullish(chars)} THEN to_jsonb(btrim({txt(s)}, {whitespace})) "
            f"WHEN NOT {is_type(chars, 'string')} THEN {c.fail('$trim: chars must be a string')} "
            f"ELSE to_jsonb(btrim({txt(s)}, {txt(chars)})) END)"
        )

    return c.bind(operands, body)


def _size(c: OpCompiler, args: list[str]) -> str:
    def body(a: str) -> str:
        return (
            f"(CASE WHEN {is_type(a, 'array')} THEN to_jsonb(jsonb_array_length({a})) "
            f"ELSE {c.fail('$size needs an array')} END)"
        )

    return c.bind(args, body)


def _elem_at(c: OpCompiler, args: list[str]) -> str:
    def body(a: str, i: str) -> str:
        return (
            f"(CASE WHEN {nullish(a)} OR {nullish(i)} THEN {NULL} "
            f"WHEN NOT {is_type(a, 'array')} THEN {c.fail('$arrayElemAt needs an array')} "
            f"WHEN NOT ({is_type(i, 'number')} AND {integral(i)}) THEN "
            f"{c.fail('$arrayElemAt: the index must be an integer')} "
            f"WHEN abs({num(i)}) > 2147483647 THEN NULL ELSE {a} -> {num(i)}::int END)"
        )

    return c.bind(args, body)


def _in(c: OpCompiler, args: list[str]) -> str:
    def body(x: str, a: str) -> str:
        found = f"EXISTS (SELECT 1 FROM jsonb_array_elements({a}) i(v) WHERE i.v = {x})"
        return (
            f"(CASE WHEN NOT COALESCE({is_type(a, 'array')}, false) THEN "
            f"{c.fail('$in needs an array')} WHEN {x} IS NULL THEN 'false'::jsonb "
            f"ELSE to_jsonb({found}) END)"
        )

    return c.bind(args, body)


def _slice(c: OpCompiler, args: list[str]) -> str:
    def body(a: str, *rest: str) -> str:
        ints = " AND ".join(f"{is_type(x, 'number')} AND {integral(x)}" for x in rest)
        n = num(rest[-1])
        length = f"jsonb_array_length({a})"
        if len(rest) == 1:
            keep = f"CASE WHEN {n} >= 0 THEN s.i <= {n} ELSE s.i > {length} + {n} END"
            extra = ""
        else:
            p = num(rest[0])
            start = (
                f"CASE WHEN {p} >= 0 THEN least({p}, {length}) ELSE greatest({length} + {p}, 0) END"
            )
            keep = f"s.i > {start} AND s.i <= {start} + {n}"
            extra = f"WHEN {n} <= 0 THEN {c.fail('$slice: n must be positive')} "
        picked = (
            f"(SELECT COALESCE(jsonb_agg(s.v ORDER BY s.i), '[]'::jsonb) FROM "
            f"jsonb_array_elements({a}) WITH ORDINALITY s(v, i) WHERE {keep})"
        )
        return (
            f"(CASE WHEN {_any_nullish([a, *rest])} THEN {NULL} "
            f"WHEN NOT {is_type(a, 'array')} THEN {c.fail('$slice needs an array')} "
            f"WHEN NOT ({ints}) THEN {c.fail('$slice needs integers')} {extra}"
            f"ELSE {picked} END)"
        )

    return c.bind(args, body)


def _concat_arrays(c: OpCompiler, args: list[str]) -> str:
    if not args:
        return "'[]'::jsonb"

    def body(*xs: str) -> str:
        return (
            f"(CASE WHEN {_any_nullish(list(xs))} THEN {NULL} "
            f"WHEN NOT ({_all(list(xs), 'array')}) THEN {c.fail('$concatArrays needs arrays')} "
            f"ELSE {' || '.join(xs)} END)"
        )

    return c.bind(args, body)


def _int_text(x: str) -> str:
    return integral(x)


def _type(c: OpCompiler, args: list[str]) -> str:
    def body(x: str) -> str:
        lo, hi = INT32
        return (
            f"to_jsonb(CASE WHEN {x} IS NULL THEN 'missing' "
            f"WHEN {is_type(x, 'number')} THEN CASE WHEN NOT {_int_text(x)} THEN 'double' "
            f"WHEN {num(x)} BETWEEN {lo} AND {hi} THEN 'int' ELSE 'long' END "
            f"WHEN {is_type(x, 'boolean')} THEN 'bool' ELSE jsonb_typeof({x}) END)"
        )

    return c.bind(args, body)


def _to_string(c: OpCompiler, args: list[str]) -> str:
    def body(x: str) -> str:
        return (
            f"(CASE WHEN {nullish(x)} THEN {NULL} "
            f"WHEN jsonb_typeof({x}) IN ('object', 'array') THEN "
            f"{c.fail('$toString cannot convert an object or an array')} "
            f"ELSE to_jsonb({c.schema}.dbproxy_agg_to_string({x})) END)"
        )

    return c.bind(args, body)


def _to_int(c: OpCompiler, args: list[str]) -> str:
    lo, hi = INT32

    def body(x: str) -> str:
        as_num = (
            f"CASE WHEN {is_type(x, 'boolean')} THEN CASE WHEN {x} = 'true' THEN 1 ELSE 0 END "
            f"WHEN {is_type(x, 'number')} THEN trunc({num(x)}) "
            f"WHEN {is_type(x, 'string')} AND {txt(x)} ~ '^[+-]?[0-9]{{1,40}}$' "
            f"THEN {txt(x)}::numeric END"
        )
        return (
            f"(CASE WHEN {nullish(x)} THEN {NULL} ELSE (SELECT CASE WHEN q.n BETWEEN {lo} AND "
            f"{hi} THEN to_jsonb(q.n) ELSE {c.fail('$toInt cannot convert the value')} END "
            f"FROM (SELECT {as_num} AS n) q) END)"
        )

    return c.bind(args, body)


def _to_double(c: OpCompiler, args: list[str]) -> str:
    def body(x: str) -> str:
        as_num = (
            f"CASE WHEN {is_type(x, 'boolean')} THEN CASE WHEN {x} = 'true' THEN 1 ELSE 0 END "
            f"WHEN {is_type(x, 'number')} THEN {num(x)} "
            f"WHEN {is_type(x, 'string')} AND {txt(x)} ~ '{_DECIMAL}' "
            f"THEN {txt(x)}::numeric END"
        )
        return (
            f"(CASE WHEN {nullish(x)} THEN {NULL} ELSE (SELECT CASE WHEN abs(q.n) <= "
            f"{DOUBLE_MAX_EXACT} THEN to_jsonb(q.n) ELSE "
            f"{c.fail('$toDouble cannot convert the value')} END "
            f"FROM (SELECT {as_num} AS n) q) END)"
        )

    return c.bind(args, body)


OPERATORS: dict[str, Op] = {
    "add": _numeric("add", None, lambda *xs: " + ".join(xs)),
    "multiply": _numeric("multiply", None, lambda *xs: " * ".join(xs)),
    "subtract": _numeric("subtract", 2, lambda a, b: f"{a} - {b}"),
    "divide": _numeric("divide", 2, lambda a, b: f"{a} / {b}", zero_check=True),
    "mod": _numeric("mod", 2, lambda a, b: f"mod({a}, {b})", zero_check=True),
    "abs": _numeric("abs", 1, lambda a: f"abs({a})"),
    "floor": _numeric("floor", 1, lambda a: f"floor({a})"),
    "ceil": _numeric("ceil", 1, lambda a: f"ceil({a})"),
    "round": _round,
    "eq": _compare("="),
    "ne": _compare("<>"),
    "gt": _compare(">"),
    "gte": _compare(">="),
    "lt": _compare("<"),
    "lte": _compare("<="),
    "cmp": _compare(None),
    "and": _and,
    "or": _or,
    "not": _not,
    "cond": _cond,
    "ifNull": _if_null,
    "concat": _concat,
    "toLower": _case(False),
    "toUpper": _case(True),
    "substrCP": _substr,
    "strLenCP": _strlen,
    "split": _split,
    "trim": _trim,
    "size": _size,
    "arrayElemAt": _elem_at,
    "in": _in,
    "slice": _slice,
    "concatArrays": _concat_arrays,
    "type": _type,
    "toString": _to_string,
    "toInt": _to_int,
    "toDouble": _to_double,
}
