"""The PostgreSQL aggregation compiler against the real server: each stage and operator of
docs/aggregation.md, exact results (order included), run-time failures as expression_failed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from proxy.errors import ProxyError
from proxy.query.aggregate.ast import (
    AddFields,
    Bucket,
    Count,
    Facet,
    Group,
    Limit,
    Lit,
    Lookup,
    Match,
    Obj,
    Project,
    ReplaceRoot,
    Skip,
    Sort,
    SortKey,
    Unset,
    Unwind,
    View,
)
from proxy.query.ast import Cmp, Eq, FieldCond, Path
from tests.integration.agg_pg_harness import SALES, AggDb, C, F, acc

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def db(pg_dsn: str) -> AsyncIterator[AggDb]:
    conn = await asyncpg.connect(pg_dsn)
    d = AggDb(conn)
    await d.setup()
    try:
        yield d
    finally:
        await d.drop()
        await conn.close()


async def test_group_accumulators(db: AggDb) -> None:
    await db.load("sales", SALES)
    out = await db.run(
        [
            Group(
                F("cat"),
                (
                    ("sum", acc("sum", F("n"))),
                    ("avg", acc("avg", F("n"))),
                    ("cnt", acc("count", Lit(1))),
                    ("min", acc("min", F("n"))),
                    ("max", acc("max", F("n"))),
                    ("first", acc("first", F("n"))),
                    ("last", acc("last", F("tags"))),
                    ("push", acc("push", F("n"))),
                    ("set", acc("addToSet", F("cat"))),
                ),
            )
        ],
        "sales",
    )
    assert out == [
        {
            "_id": "x",
            "sum": 1,
            "avg": 1,
            "cnt": 2,
            "min": 1,
            "max": "str",
            "first": 1,
            "last": ["q"],
            "push": [1, "str"],
            "set": ["x"],
        },
        {
            "_id": "y",
            "sum": 12.5,
            "avg": 6.25,
            "cnt": 2,
            "min": 2.5,
            "max": 10,
            "first": 2.5,
            "last": None,
            "push": [2.5, 10],
            "set": ["y"],
        },
        {
            "_id": None,
            "sum": 4,
            "avg": 4,
            "cnt": 2,
            "min": 4,
            "max": 4,
            "first": 4,
            "last": "solo",
            "push": [4, None],
            "set": [None],
        },
    ]


async def test_match_sort_skip_limit_count(db: AggDb) -> None:
    await db.load("sales", SALES)
    gt = Match(FieldCond(Path(("n",)), (Cmp("gt", 1),)))
    out = await db.run([gt, Sort((SortKey(("n",), True),)), Project(((("n",), None),))], "sales")
    assert out == [{"_id": "a6", "n": 10}, {"_id": "a4", "n": 4}, {"_id": "a2", "n": 2.5}]
    out = await db.run(
        [Sort((SortKey(("cat",), False),)), Skip(1), Limit(3), Project(((("cat",), None),), True)],
        "sales",
    )
    assert out == [{"cat": None}, {"cat": "x"}, {"cat": "x"}]
    assert await db.run([gt, Count("k")], "sales") == [{"k": 3}]
    none = Match(FieldCond(Path(("n",)), (Eq(99),)))
    assert await db.run([none, Count("k")], "sales") == []


async def test_add_fields_unset_unwind(db: AggDb) -> None:
    await db.load("sales", SALES)
    out = await db.run(
        [
            Match(FieldCond(Path(("_id",)), (Eq("a1"),))),
            AddFields(((("d",), C("multiply", F("n"), 2)), (("e", "f"), Lit(1)))),
            Unset((("cat",),)),
        ],
        "sales",
    )
    assert out[0] == {"_id": "a1", "n": 1, "d": 2, "tags": ["p", "q"], "e": {"f": 1}}
    with pytest.raises(ProxyError) as info:
        await db.run([AddFields(((("d",), C("multiply", F("n"), 2)),))], "sales")
    assert info.value.code == "expression_failed"
    out = await db.run(
        [Unwind(("tags",), ("i",)), Project(((("tags",), None), (("i",), None)))], "sales"
    )
    assert out == [
        {"_id": "a1", "tags": "p", "i": 0},
        {"_id": "a1", "tags": "q", "i": 1},
        {"_id": "a3", "tags": "q", "i": 0},
        {"_id": "a5", "tags": "solo", "i": None},
    ]
    out = await db.run([Unwind(("tags",), None, True), Project(((("tags",), None),))], "sales")
    assert [d["_id"] for d in out] == ["a1", "a1", "a2", "a3", "a4", "a5", "a6"]
    assert out[2] == {"_id": "a2"}


async def test_group_object_key(db: AggDb) -> None:
    await db.load(
        "k", [{"_id": "1"}, {"_id": "2", "a": None}, {"_id": "3", "a": 1}, {"_id": "4", "a": 1.0}]
    )
    out = await db.run([Group(Obj((("a", F("a")),)), (("n", acc("sum", 1)),))], "k")
    assert out == [{"_id": {"a": None}, "n": 2}, {"_id": {"a": 1}, "n": 2}]


async def test_lookup_facet_bucket_replace_root(db: AggDb) -> None:
    await db.load("sales", SALES)
    await db.load(
        "cats", [{"_id": "c1", "name": "x"}, {"_id": "c2", "name": ["y", "x"]}, {"_id": "c3"}]
    )
    out = await db.run(
        [Lookup("cats", ("cat",), ("name",), ("cs",)), Project(((("cs", "_id"), None),))],
        "sales",
        cap=10,
    )
    assert out == [
        {"_id": "a1", "cs": [{"_id": "c1"}, {"_id": "c2"}]},
        {"_id": "a2", "cs": [{"_id": "c2"}]},
        {"_id": "a3", "cs": [{"_id": "c1"}, {"_id": "c2"}]},
        {"_id": "a4", "cs": [{"_id": "c3"}]},
        {"_id": "a5", "cs": [{"_id": "c3"}]},
        {"_id": "a6", "cs": [{"_id": "c2"}]},
    ]
    out = await db.run(
        [Facet((("all", (Count("n"),)), ("none", (Match(FieldCond(Path(("n",)), (Eq(99),))),))))],
        "sales",
    )
    assert out == [{"all": [{"n": 6}], "none": []}]
    out = await db.run(
        [
            Bucket(
                F("n"),
                (0, 2, 5),
                "other",
                True,
                (("c", acc("sum", 1)), ("ids", acc("push", F("_id")))),
            )
        ],
        "sales",
    )
    assert out == [
        {"_id": 0, "c": 1, "ids": ["a1"]},
        {"_id": 2, "c": 2, "ids": ["a2", "a4"]},
        {"_id": "other", "c": 3, "ids": ["a3", "a5", "a6"]},
    ]
    with pytest.raises(ProxyError) as info:
        await db.run([Bucket(F("n"), (0, 2, 5), None, False, (("c", acc("sum", 1)),))], "sales")
    assert info.value.code == "expression_failed"
    out = await db.run(
        [
            Match(FieldCond(Path(("_id",)), (Eq("a1"),))),
            ReplaceRoot(Obj((("t", F("tags")), ("z", F("zz"))))),
        ],
        "sales",
    )
    assert out == [{"t": ["p", "q"]}]
    with pytest.raises(ProxyError):
        await db.run([ReplaceRoot(F("n"))], "sales")


async def test_readable_and_guard(db: AggDb) -> None:
    await db.load(
        "sec",
        [
            {"_id": "1", "a": {"b": 1, "c": 2}, "d": 3, "e": [{"b": 1}]},
            {"_id": "2", "a": {"c": 5}, "d": 4},
        ],
    )
    view = View(
        "sec", guard=FieldCond(Path(("d",)), (Cmp("lt", 4),)), readable=frozenset({"a.b", "e.b"})
    )
    out = await db.run([], "sec", {"sec": view}, strip=False)
    assert out == [{"_id": "1", "_version": 1, "a": {"b": 1}}]
    # a $match on a hidden field sees nothing there
    hidden = Match(FieldCond(Path(("a", "c")), (Eq(2),)))
    assert await db.run([hidden], "sec", {"sec": view}) == []
    assert await db.run([hidden], "sec") == [
        {"_id": "1", "a": {"b": 1, "c": 2}, "d": 3, "e": [{"b": 1}]}
    ]


async def test_missing_table(db: AggDb) -> None:
    assert await db.run([Count("n")], "nothing_here") == []
    out = await db.run([Facet((("x", (Count("n"),)),))], "nothing_here")
    assert out == [{"x": []}]


async def test_cap(db: AggDb) -> None:
    await db.load("sales", SALES)
    assert len(await db.run([], "sales", cap=3)) == 4
