"""The PostgreSQL aggregation compiler against the real server, continued: sorts across types
and arrays, paths into arrays, $facet, $lookup through views, index use, failures never
skipped (exact results, docs/aggregation.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from proxy.errors import ProxyError
from proxy.query.aggregate.ast import (
    AddFields,
    Count,
    Facet,
    Group,
    Limit,
    Lit,
    Lookup,
    Match,
    Project,
    Skip,
    Sort,
    SortKey,
    Unset,
    Unwind,
    View,
)
from proxy.query.ast import Eq, FieldCond, Path
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


async def test_sort_cross_type_arrays_stable(db: AggDb) -> None:
    docs = [
        {"_id": "1", "v": 5},
        {"_id": "2", "v": [7, 1]},
        {"_id": "3", "v": []},
        {"_id": "4"},
        {"_id": "5", "v": None},
        {"_id": "6", "v": "a"},
        {"_id": "7", "v": True},
        {"_id": "8", "v": 5.0},
        {"_id": "9", "v": [{"w": 1}]},
    ]
    await db.load("srt", docs)
    asc = await db.run([Sort((SortKey(("v",), False),)), Project((), True)], "srt")
    ids = [d["_id"] for d in await db.run([Sort((SortKey(("v",), False),))], "srt")]
    assert asc == [{}] * 9
    assert ids == ["3", "4", "5", "2", "1", "8", "6", "9", "7"]
    ids = [d["_id"] for d in await db.run([Sort((SortKey(("v",), True),))], "srt")]
    assert ids == ["7", "9", "6", "2", "1", "8", "4", "5", "3"]
    await db.load(
        "srt2",
        [
            {"_id": "1", "a": [{"b": 3}, {"b": 1}]},
            {"_id": "2", "a": {"b": 2}},
            {"_id": "3", "a": [{"b": [0, 9]}]},
        ],
    )
    ids = [d["_id"] for d in await db.run([Sort((SortKey(("a", "b"), False),))], "srt2")]
    assert ids == ["3", "1", "2"]
    ids = [d["_id"] for d in await db.run([Sort((SortKey(("a", "b"), True),))], "srt2")]
    assert ids == ["3", "1", "2"]


async def test_group_after_sort_first_last_order(db: AggDb) -> None:
    await db.load("sales", SALES)
    out = await db.run(
        [
            Sort((SortKey(("n",), True),)),
            Group(
                F("cat"),
                (
                    ("f", acc("first", F("_id"))),
                    ("l", acc("last", F("_id"))),
                    ("p", acc("push", F("_id"))),
                ),
            ),
        ],
        "sales",
    )
    # sorted by n descending: "str" a3, 10 a6, 4 a4, 2.5 a2, 1 a1, null a5
    assert out == [
        {"_id": "x", "f": "a3", "l": "a1", "p": ["a3", "a1"]},
        {"_id": "y", "f": "a6", "l": "a2", "p": ["a6", "a2"]},
        {"_id": None, "f": "a4", "l": "a5", "p": ["a4", "a5"]},
    ]
    # $sortByCount: group then a stable sort on count descending
    out = await db.run(
        [Group(F("cat"), (("count", acc("sum", 1)),)), Sort((SortKey(("count",), True),))], "sales"
    )
    assert out == [{"_id": "x", "count": 2}, {"_id": "y", "count": 2}, {"_id": None, "count": 2}]


async def test_paths_into_arrays(db: AggDb) -> None:
    await db.load(
        "arr",
        [{"_id": "1", "a": [{"b": 1, "c": 1}, 5, [{"b": 2}], {"c": 3}], "k": {"x": 1, "y": 2}}],
    )
    out = await db.run([AddFields(((("a", "b"), Lit(0)), (("k", "z"), F("k.x"))))], "arr")
    assert out == [
        {
            "_id": "1",
            "a": [{"b": 0, "c": 1}, {"b": 0}, [{"b": 0}], {"c": 3, "b": 0}],
            "k": {"x": 1, "y": 2, "z": 1},
        }
    ]
    out = await db.run([Unset((("a", "b"), ("k", "y")))], "arr")
    assert out == [{"_id": "1", "a": [{"c": 1}, 5, [{}], {"c": 3}], "k": {"x": 1}}]
    out = await db.run([Project(((("a", "b"), None), (("k", "x"), None)))], "arr")
    assert out == [{"_id": "1", "a": [{"b": 1}, [{"b": 2}], {}], "k": {"x": 1}}]
    out = await db.run(
        [Project(((("k",), None), (("n",), C("add", F("k.x"), F("k.y")))), True)], "arr"
    )
    assert out == [{"k": {"x": 1, "y": 2}, "n": 3}]
    out = await db.run([Unwind(("k", "x"))], "arr")
    assert out[0]["k"] == {"x": 1, "y": 2}
    await db.load(
        "arr2",
        [
            {"_id": "1", "k": {"l": [1, 2]}},
            {"_id": "2", "k": {"l": []}},
            {"_id": "3", "k": {"l": None}},
        ],
    )
    out = await db.run([Unwind(("k", "l"), ("k", "i"), True)], "arr2")
    assert out == [
        {"_id": "1", "k": {"l": 1, "i": 0}},
        {"_id": "1", "k": {"l": 2, "i": 1}},
        {"_id": "2", "k": {"i": None}},
        {"_id": "3", "k": {"l": None, "i": None}},
    ]
    out = await db.run([Unwind(("k", "l"))], "arr2")
    assert out == [{"_id": "1", "k": {"l": 1}}, {"_id": "1", "k": {"l": 2}}]


async def test_facet_sub_pipelines(db: AggDb) -> None:
    await db.load("sales", SALES)
    out = await db.run(
        [
            Sort((SortKey(("n",), False),)),
            Facet(
                (
                    ("top", (Skip(1), Limit(2), Project((), True))),
                    ("ids", (Group(Lit(None), (("ids", acc("push", F("_id"))),)),)),
                    ("u", (Unwind(("tags",)), Group(F("tags"), (("n", acc("sum", 1)),)))),
                )
            ),
        ],
        "sales",
    )
    assert out == [
        {
            "top": [{}, {}],
            "ids": [{"_id": None, "ids": ["a5", "a1", "a2", "a4", "a6", "a3"]}],
            "u": [{"_id": "solo", "n": 1}, {"_id": "p", "n": 1}, {"_id": "q", "n": 2}],
        }
    ]


async def test_leading_match_uses_the_index(db: AggDb) -> None:
    await db.load(
        "big",
        [{"_id": f"d{i:05d}", "k": f"k{i % 500}", "n": i, "pad": "x" * 200} for i in range(20000)],
    )
    await db.conn.execute(f"VACUUM ANALYZE {db.table('big')}")  # GIN's pending list flushed
    stages = [
        Match(FieldCond(Path(("k",)), (Eq("k7"),))),
        Group(F("k"), (("s", acc("sum", F("n"))),)),
    ]
    sql, args = db.compile(stages, "big")
    plan = "\n".join(r[0] for r in await db.conn.fetch("EXPLAIN " + sql, *args))
    assert "Bitmap Index Scan on gin_" in plan, plan
    assert await db.run(stages, "big") == [{"_id": "k7", "s": sum(range(7, 20000, 500))}]


async def test_sort_dead_ends_are_null(db: AggDb) -> None:
    await db.load(
        "srt3",
        [
            {"_id": "1", "a": [{"b": []}, {"c": 1}]},  # [] and a dead end: null
            {"_id": "2", "a": [{"b": []}]},  # only an empty array: below null
            {"_id": "3", "a": [{"x": 1}, {"b": 5}]},  # null (the dead end) and 5
            {"_id": "4", "a": {"b": 0}},
            {"_id": "5", "a": [1, 2]},  # no object on the way: null
        ],
    )
    ids = [d["_id"] for d in await db.run([Sort((SortKey(("a", "b"), False),))], "srt3")]
    assert ids == ["2", "1", "3", "5", "4"]
    ids = [d["_id"] for d in await db.run([Sort((SortKey(("a", "b"), True),))], "srt3")]
    assert ids == ["3", "4", "1", "5", "2"]


async def test_lookup_through_the_foreign_view(db: AggDb) -> None:
    await db.load(
        "loc", [{"_id": "l1", "k": 1}, {"_id": "l2", "k": {"x": 1}}, {"_id": "l3", "k": [2, 1]}]
    )
    await db.load(
        "far",
        [
            {"_id": "f1", "key": 1, "nested": {"key": {"x": 1}}, "secret": "s", "ok": True},
            {"_id": "f2", "key": [1, 2], "nested": {"key": 1}, "ok": False},
            {"_id": "f3", "key": {"x": 1}, "ok": True},
        ],
    )
    stages = [
        Lookup("far", ("k",), ("key",), ("j",)),
        Unset((("j", "_version"),)),
        Project(((("j",), None),), True),
    ]
    out = await db.run(stages, "loc")
    assert out == [
        {
            "j": [
                {"_id": "f1", "key": 1, "nested": {"key": {"x": 1}}, "secret": "s", "ok": True},
                {"_id": "f2", "key": [1, 2], "nested": {"key": 1}, "ok": False},
            ]
        },
        {"j": [{"_id": "f3", "key": {"x": 1}, "ok": True}]},
        {
            "j": [
                {"_id": "f1", "key": 1, "nested": {"key": {"x": 1}}, "secret": "s", "ok": True},
                {"_id": "f2", "key": [1, 2], "nested": {"key": 1}, "ok": False},
            ]
        },
    ]
    guard = FieldCond(Path(("ok",)), (Eq(True),))
    view = View("far", guard=guard, readable=frozenset({"key", "nested.key"}))
    out = await db.run(stages, "loc", {"far": view})
    assert out == [
        {"j": [{"_id": "f1", "key": 1, "nested": {"key": {"x": 1}}}]},
        {"j": [{"_id": "f3", "key": {"x": 1}}]},
        {"j": [{"_id": "f1", "key": 1, "nested": {"key": {"x": 1}}}]},
    ]
    # a foreign field only partly readable: matched on what the caller sees
    nested = [
        Lookup("far", ("k",), ("nested", "key"), ("j",)),
        Project(((("j", "_id"), None),), True),
    ]
    view = View("far", guard=guard, readable=frozenset({"nested.key"}))
    assert await db.run(nested, "loc", {"far": view}) == [
        {"j": []},
        {"j": [{"_id": "f1"}]},
        {"j": []},
    ]
    view = View("far", readable=frozenset({"key"}))
    got = await db.run(nested, "loc", {"far": view})
    assert got == [{"j": []}, {"j": []}, {"j": []}], got


async def test_lookup_of_a_scalar_uses_the_index(db: AggDb) -> None:
    await db.load("lk", [{"_id": f"d{i:05d}", "k": i, "pad": "x" * 200} for i in range(20000)])
    await db.load("lsrc", [{"_id": "a", "k": 7}])
    await db.conn.execute(f"VACUUM ANALYZE {db.table('lk')}")
    stages = [Lookup("lk", ("k",), ("k",), ("j",)), Project(((("j", "_id"), None),), True)]
    sql, args = db.compile(stages, "lsrc")
    plan = "\n".join(r[0] for r in await db.conn.fetch("EXPLAIN " + sql, *args))
    assert "Bitmap Index Scan on gin_" in plan, plan
    assert await db.run(stages, "lsrc") == [{"j": [{"_id": "d00007"}]}]


@pytest.mark.parametrize(
    "after",
    [
        [Match(FieldCond(Path(("nothing",)), (Eq(1),)))],
        [Limit(1)],
        [Group(Lit(None), ())],
        [Facet((("f", (Count("n"),)),)), Group(Lit(None), ())],
    ],
)
async def test_a_failure_is_never_skipped(db: AggDb, after: list[Any]) -> None:
    """The reference evaluates every stage on every document: a later stage that reads
    nothing of a failing one's output does not hide the failure."""
    await db.load("sales", SALES)  # a3's n is a string
    stages = [AddFields(((("d",), C("multiply", F("n"), 2)),)), *after]
    with pytest.raises(ProxyError) as info:
        await db.run(stages, "sales")
    assert info.value.code == "expression_failed"


async def test_a_facet_is_computed_once_whatever_reads_it(db: AggDb) -> None:
    """A $facet's document is MATERIALIZED: a later stage that reads ``doc`` several times
    (a $sort on two keys reads it four times) must not repeat the whole $facet in each read
    (found by the differential test: four stages planned for a second on three documents)."""
    await db.load("sales", SALES)
    sort = Sort((SortKey(("a",), False), SortKey(("_id",), False)))
    stages = [Facet((("f", (Count("n"),)),)), sort, Facet((("g", (sort,)),)), sort]
    sql, _ = db.compile(stages, "sales")
    assert sql.count("AS MATERIALIZED (SELECT jsonb_build_object(") == 2, sql
    got = await db.run(stages, "sales")
    assert got == [{"g": [{"f": [{"n": len(SALES)}]}]}]
