"""Aggregation expressions compiled for PostgreSQL, one document at a time: each operator's
values, null/missing rules and failures (docs/aggregation.md, "Expressions")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from proxy.errors import ProxyError
from proxy.query.aggregate.ast import (
    Arr,
    Call,
    Expr,
    Field,
    Iterate,
    Lit,
    Obj,
    Pipeline,
    ReplaceRoot,
    Switch,
    Var,
)
from tests.integration.agg_pg_harness import AggDb

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

MISSING = object()
FAIL = object()
DOC = {
    "_id": "d",
    "i": 7,
    "f": 2.5,
    "neg": -7,
    "z": 0,
    "s": "Hello World",
    "e": "",
    "nul": None,
    "t": True,
    "arr": [3, 1, 2],
    "objs": [{"b": 1}, {"c": 2}, 5, [{"b": 3}]],
    "o": {"p": {"q": 1}, "list": [{"q": 2}, {"q": 3}]},
    "ws": "  pad\t ",
    "num_s": "-42",
    "dbl_s": "2.5e1",
    "big": 3000000000,
    "unicode": "héllo",
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def db(pg_dsn: str) -> AsyncIterator[AggDb]:
    conn = await asyncpg.connect(pg_dsn)
    d = AggDb(conn)
    await d.setup()
    await d.load("one", [DOC])
    try:
        yield d
    finally:
        await d.drop()
        await conn.close()


def F(path: str) -> Field:
    return Field(tuple(path.split(".")) if path else ())


def L(v: Any) -> Lit:
    return Lit(v)


def C(op: str, *args: Any) -> Call:
    return Call(op, tuple(a if isinstance(a, Expr.__args__) else Lit(a) for a in args))  # type: ignore[attr-defined]


async def ev(db: AggDb, e: Expr) -> Any:
    try:
        out = await db.run(Pipeline((ReplaceRoot(Obj((("r", e),))),)), "one")
    except ProxyError as exc:
        assert exc.code == "expression_failed", exc
        return FAIL
    assert len(out) == 1
    return out[0].get("r", MISSING)


CASES: list[tuple[Expr, Any]] = [
    # paths
    (F("i"), 7),
    (F("nope"), MISSING),
    (F("objs.b"), [1, [3]]),
    (F("o.p.q"), 1),
    (F("o.list.q"), [2, 3]),
    (F("i.x"), MISSING),
    (F("arr.0"), []),
    (F("o.list.0"), []),
    # arithmetic
    (C("add", F("i"), F("f"), 1), 10.5),
    (C("add"), 0),
    (C("add", F("i"), F("nul")), None),
    (C("add", F("i"), F("nope")), None),
    (C("add", F("i"), F("s")), FAIL),
    (C("multiply", F("i"), 2), 14),
    (C("subtract", F("i"), F("f")), 4.5),
    (C("divide", F("i"), 2), 3.5),
    (C("divide", F("i"), F("z")), FAIL),
    (C("mod", F("neg"), 3), -1),
    (C("mod", F("i"), 0), FAIL),
    (C("abs", F("neg")), 7),
    (C("floor", F("f")), 2),
    (C("ceil", F("f")), 3),
    (C("round", F("f"), 0), 2),
    (C("round", 3.5, 0), 4),
    (C("round", -2.5, 0), -2),
    (C("round", 1.25, 1), 1.2),
    (C("round", 1234, -2), 1200),
    (C("round", F("s"), 0), FAIL),
    (C("round", F("nope"), 0), None),
    # comparisons
    (C("eq", F("i"), 7.0), True),
    (C("eq", F("nope"), F("nul")), False),
    (C("lt", F("nope"), F("nul")), True),
    (C("gt", F("s"), F("i")), True),
    (C("gt", F("t"), F("arr")), True),
    (C("lt", Arr((L(1), L(2))), Arr((L(1), L(2), L(0)))), True),
    (C("gt", Arr((L(2),)), Arr((L(1), L(5)))), True),
    (C("cmp", F("i"), 8), -1),
    (C("ne", F("i"), 8), True),
    (C("lte", "a", "a"), True),
    (C("gte", "a", "b"), False),
    # booleans, conditionals
    (C("and", F("i"), F("e"), Arr(())), True),
    (C("and", F("i"), F("z")), False),
    (C("and"), True),
    (C("or", F("nope"), F("nul"), 0), False),
    (C("or"), False),
    (C("not", F("nope")), True),
    (C("cond", F("z"), "yes", "no"), "no"),
    (C("cond", F("e"), "yes", "no"), "yes"),
    (C("ifNull", F("nope"), F("nul"), "d"), "d"),
    (C("ifNull", F("nope"), F("i")), 7),
    (C("ifNull", F("nul"), F("nope")), MISSING),
    (Switch(((C("gt", F("i"), 10), L("big")), (C("gt", F("i"), 5), L("mid"))), L("small")), "mid"),
    (Switch(((C("gt", F("i"), 10), L("big")),), None), FAIL),
    # strings
    (C("concat", F("s"), "!", F("e")), "Hello World!"),
    (C("concat", F("s"), F("nope")), None),
    (C("concat", F("s"), F("i")), FAIL),
    (C("concat"), ""),
    (C("toLower", F("s")), "hello world"),
    (C("toUpper", F("unicode")), "HéLLO"),
    (C("toUpper", F("nope")), ""),
    (C("toLower", F("i")), FAIL),
    (C("substrCP", F("unicode"), 1, 3), "éll"),
    (C("substrCP", F("s"), 6, 100), "World"),
    (C("substrCP", F("nope"), 0, 1), ""),
    (C("substrCP", F("s"), -1, 1), FAIL),
    (C("strLenCP", F("unicode")), 5),
    (C("strLenCP", F("nope")), FAIL),
    (C("split", F("s"), " "), ["Hello", "World"]),
    (C("split", F("e"), ","), [""]),
    (C("split", F("s"), ""), FAIL),
    (C("split", F("nul"), ","), None),
    (C("trim", F("ws"), L(None)), "pad"),
    (C("trim", F("s"), "Hd"), "ello Worl"),
    # arrays
    (C("size", F("arr")), 3),
    (C("size", F("nope")), FAIL),
    (C("arrayElemAt", F("arr"), -1), 2),
    (C("arrayElemAt", F("arr"), 5), MISSING),
    (C("arrayElemAt", F("arr"), 0.5), FAIL),
    (C("arrayElemAt", F("arr"), 1.0), FAIL),  # an integer is written without fraction
    (C("round", F("f"), 1.0), FAIL),
    (C("trim", F("ws"), F("nope")), "pad"),  # chars null or missing: whitespace
    (C("toDouble", " 1"), FAIL),
    (C("arrayElemAt", F("s"), 0), FAIL),
    (C("in", 1, F("arr")), True),
    (C("in", 1.0, F("arr")), True),
    (C("in", F("nope"), Arr((L(None),))), False),
    (C("in", 1, F("s")), FAIL),
    (Iterate("filter", F("arr"), "this", C("gt", Var("this", ()), 1)), [3, 2]),
    (Iterate("filter", F("arr"), "x", C("gt", Var("x", ()), 0), L(2)), [3, 1]),
    (Iterate("filter", F("arr"), "x", L(True), L(0)), FAIL),
    (Iterate("map", F("arr"), "this", C("multiply", Var("this", ()), 10)), [30, 10, 20]),
    (Iterate("map", F("o.list"), "v", Var("v", ("q",))), [2, 3]),
    (Iterate("map", F("o.list"), "v", Var("v", ("nope",))), [None, None]),
    (Iterate("map", F("nope"), "v", Var("v", ())), None),
    (Iterate("map", F("s"), "v", Var("v", ())), FAIL),
    (C("slice", F("arr"), 2), [3, 1]),
    (C("slice", F("arr"), -2), [1, 2]),
    (C("slice", F("arr"), 1, 5), [1, 2]),
    (C("slice", F("arr"), -2, 1), [1]),
    (C("slice", F("arr"), -10, 1), [3]),
    (C("slice", F("arr"), 0, 0), FAIL),
    (C("concatArrays", F("arr"), Arr((L(4),))), [3, 1, 2, 4]),
    (C("concatArrays", F("arr"), F("nope")), None),
    (C("concatArrays", F("arr"), F("s")), FAIL),
    # types and conversions
    (C("type", F("nope")), "missing"),
    (C("type", F("nul")), "null"),
    (C("type", F("i")), "int"),
    (C("type", F("big")), "long"),
    (C("type", F("f")), "double"),
    (C("type", F("t")), "bool"),
    (C("type", F("o")), "object"),
    (C("type", F("arr")), "array"),
    (C("type", F("s")), "string"),
    (C("toString", F("i")), "7"),
    (C("toString", 1.0), "1"),
    (C("toString", F("f")), "2.5"),
    (C("toString", F("t")), "true"),
    (C("toString", F("arr")), FAIL),
    (C("toInt", F("f")), 2),
    (C("toInt", -2.7), -2),
    (C("toInt", F("num_s")), -42),
    (C("toInt", F("t")), 1),
    (C("toInt", "abc"), FAIL),
    (C("toInt", F("big")), FAIL),
    (C("toInt", F("nope")), None),
    (C("toDouble", F("dbl_s")), 25),
    (C("toDouble", "x1"), FAIL),
    (C("toDouble", F("i")), 7),
    (C("toDouble", "1e400"), FAIL),
    # literals, objects, arrays
    (L({"$a": 1}), {"$a": 1}),
    (Obj((("a", F("nope")), ("b", F("nul")))), {"b": None}),
    (Arr((F("nope"), F("i"))), [None, 7]),
    (F(""), {k: v for k, v in DOC.items()} | {"_version": 1}),
]


@pytest.mark.parametrize(("expr", "expected"), CASES, ids=[str(i) for i in range(len(CASES))])
async def test_expression(db: AggDb, expr: Expr, expected: Any) -> None:
    got = await ev(db, expr)
    if isinstance(expected, float | int) and not isinstance(expected, bool):
        assert isinstance(got, int | float) and not isinstance(got, bool), got
        assert abs(got - expected) <= 1e-9 * max(1, abs(expected)), (got, expected)
    else:
        assert got == expected
