"""The PostgreSQL aggregation compiler against the reference evaluator
(tests/reference_aggregate.py): raw pipelines parsed by the front end, both answers equal
(order included, numbers within 1e-9), failures on both sides."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from proxy.config import Limits
from proxy.errors import ProxyError
from tests.integration.agg_pg_harness import AggDb

parse = pytest.importorskip("proxy.query.aggregate.parse")
reference = pytest.importorskip("tests.reference_aggregate")

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

ITEMS: list[dict[str, Any]] = [
    {"_id": "i01", "cat": "a", "n": 1, "f": 1.5, "tags": ["x", "y"], "o": {"k": 1, "l": [1, 2]}},
    {"_id": "i02", "cat": "b", "n": 2, "f": -0.5, "tags": [], "o": {"k": 2}},
    {"_id": "i03", "cat": "a", "n": "3", "tags": ["y"], "o": {"k": None}},
    {"_id": "i04", "n": 4, "f": 2.5, "tags": "z", "o": [{"k": 3}, {"k": 4}, 5]},
    {"_id": "i05", "cat": None, "n": None, "tags": ["x", "x", "z"]},
    {"_id": "i06", "cat": "b", "n": 6, "f": 0, "tags": [["w"]], "o": {"k": [5, 6]}},
    {"_id": "i07", "cat": "c", "n": 7.0, "f": 3.25, "o": {"k": "s"}, "flag": True},
    {"_id": "i08", "cat": "a", "n": -8, "f": 10, "tags": ["y", "x"], "flag": False},
    {"_id": "i09", "cat": 1, "n": 9, "f": 0.125, "tags": [1, "1", 1.0]},
    {"_id": "i10", "cat": 1.0, "n": 10, "f": 99, "o": {}},
]
CATS: list[dict[str, Any]] = [
    {"_id": "c1", "name": "a", "label": "Alpha"},
    {"_id": "c2", "name": "b", "label": "Beta"},
    {"_id": "c3", "name": ["a", "c"], "label": "Multi"},
    {"_id": "c4", "label": "Nameless"},
    {"_id": "c5", "name": None, "label": "Null"},
    {"_id": "c6", "name": 1, "label": "One"},
]
COLLECTIONS = {"items": ITEMS, "cats": CATS}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def db(pg_dsn: str) -> AsyncIterator[AggDb]:
    conn = await asyncpg.connect(pg_dsn)
    d = AggDb(conn)
    await d.setup()
    for name, docs in COLLECTIONS.items():
        await d.load(name, docs)
    try:
        yield d
    finally:
        await d.drop()
        await conn.close()


def _stored() -> dict[str, list[dict[str, Any]]]:
    return {name: [{**d, "_version": 1} for d in docs] for name, docs in COLLECTIONS.items()}


PIPELINES: list[list[dict[str, Any]]] = [
    # stages
    [{"$match": {"n": {"$gt": 2}}}],
    [{"$match": {"cat": "a"}}, {"$match": {"f": {"$gte": 1}}}, {"$project": {"n": 1}}],
    [{"$project": {"n": 1, "o.k": 1}}],
    [{"$project": {"_id": 0, "tags": 1, "double": {"$multiply": [2, "$f"]}}}],
    [{"$project": {"o": 0, "tags": 0}}],
    [{"$project": {"x": "$o.k", "_id": 0}}],
    [{"$addFields": {"t2": "$tags", "o.z": 1}}],
    [{"$set": {"c2": {"$ifNull": ["$cat", "none"]}}}],
    [{"$unset": ["o.k", "tags"]}],
    [{"$unset": "f"}],
    [{"$replaceRoot": {"newRoot": {"$ifNull": ["$o", {"empty": True}]}}}],
    [{"$match": {"o": {"$type": "object"}}}, {"$replaceWith": "$o"}],
    [{"$group": {"_id": "$cat", "n": {"$sum": 1}}}],
    [
        {
            "$group": {
                "_id": "$cat",
                "s": {"$sum": "$n"},
                "a": {"$avg": "$f"},
                "mn": {"$min": "$n"},
                "mx": {"$max": "$n"},
                "fi": {"$first": "$f"},
                "la": {"$last": "$f"},
                "pu": {"$push": "$n"},
                "se": {"$addToSet": "$tags"},
                "c": {"$count": {}},
            }
        }
    ],
    [{"$group": {"_id": {"c": "$cat", "flag": "$flag"}, "n": {"$sum": 1}}}],
    [{"$group": {"_id": {"o": {"k": "$o.k", "z": "$z"}, "a": [{"f": "$f"}, "$z"]}}}],
    [{"$group": {"_id": None, "mn": {"$min": "$tags"}, "mx": {"$max": "$tags"}}}],
    [
        {
            "$group": {
                "_id": None,
                "mn": {"$min": "$o"},
                "mx": {"$max": "$cat"},
                "a": {"$avg": "$cat"},
            }
        }
    ],
    [{"$sort": {"n": 1}}],
    [{"$sort": {"n": -1}}],
    [{"$sort": {"tags": 1}}],
    [{"$sort": {"tags": -1}}],
    [{"$sort": {"o.k": 1, "_id": -1}}],
    [{"$sort": {"cat": 1, "f": -1}}, {"$skip": 2}, {"$limit": 5}],
    [
        {"$sort": {"f": 1}},
        {"$group": {"_id": "$cat", "first": {"$first": "$_id"}, "ids": {"$push": "$_id"}}},
    ],
    [{"$skip": 8}],
    [{"$limit": 1}],
    [{"$count": "total"}],
    [{"$match": {"n": 1000}}, {"$count": "total"}],
    [{"$unwind": "$tags"}],
    [
        {
            "$unwind": {
                "path": "$tags",
                "includeArrayIndex": "idx",
                "preserveNullAndEmptyArrays": True,
            }
        }
    ],
    [{"$unwind": "$o.l"}],
    [{"$unwind": "$tags"}, {"$group": {"_id": "$tags", "n": {"$sum": 1}}}],
    [{"$sortByCount": "$cat"}],
    [{"$sortByCount": {"$type": "$n"}}],
    [{"$lookup": {"from": "cats", "localField": "cat", "foreignField": "name", "as": "c"}}],
    [{"$lookup": {"from": "cats", "localField": "tags", "foreignField": "name", "as": "c"}}],
    [{"$lookup": {"from": "nowhere", "localField": "cat", "foreignField": "name", "as": "c"}}],
    [
        {
            "$facet": {
                "byCat": [{"$sortByCount": "$cat"}],
                "top": [{"$sort": {"f": -1}}, {"$limit": 2}, {"$project": {"f": 1}}],
                "none": [{"$match": {"n": 1000}}],
            }
        }
    ],
    [{"$bucket": {"groupBy": "$n", "boundaries": [0, 3, 6, 100], "default": "other"}}],
    [
        {
            "$bucket": {
                "groupBy": "$f",
                "boundaries": [-1, 0, 1, 5],
                "default": None,
                "output": {"ids": {"$push": "$_id"}, "s": {"$sum": "$n"}},
            }
        }
    ],
    [{"$bucket": {"groupBy": "$_id", "boundaries": ["i01", "i05", "i99"]}}],
    [{"$bucket": {"groupBy": "$n", "boundaries": [0, 5]}}],
]

EXPRESSIONS: list[Any] = [
    "$o.k",
    "$o.l",
    "$$ROOT.cat",
    "$$CURRENT.n",
    {"$literal": "$n"},
    {"$add": ["$n", "$f", 1]},
    {"$add": ["$f", 1]},
    {"$subtract": ["$f", "$n"]},
    {"$multiply": ["$f", 4]},
    {"$divide": ["$f", 4]},
    {"$divide": ["$f", "$f"]},
    {"$mod": ["$n", 3]},
    {"$abs": "$f"},
    {"$floor": "$f"},
    {"$ceil": "$f"},
    {"$round": ["$f", 1]},
    {"$round": "$f"},
    {"$eq": ["$cat", "a"]},
    {"$ne": ["$cat", "a"]},
    {"$gt": ["$n", 3]},
    {"$gte": ["$cat", None]},
    {"$lt": ["$tags", ["y"]]},
    {"$lte": ["$f", 1.5]},
    {"$cmp": ["$n", "$f"]},
    {"$and": ["$flag", "$n"]},
    {"$or": ["$flag", "$cat"]},
    {"$not": ["$tags"]},
    {"$cond": [{"$gt": ["$f", 1]}, "big", "small"]},
    {"$cond": {"if": "$flag", "then": "$n", "else": "$f"}},
    {"$ifNull": ["$cat", "$f", "none"]},
    {"$switch": {"branches": [{"case": {"$eq": ["$cat", "a"]}, "then": 1}], "default": 0}},
    {"$switch": {"branches": [{"case": {"$gt": ["$n", -100]}, "then": "$n"}]}},
    {"$concat": ["$cat", "-", "$cat"]},
    {"$toLower": "$cat"},
    {"$toUpper": "$cat"},
    {"$substrCP": ["$_id", 1, 2]},
    {"$strLenCP": "$_id"},
    {"$split": ["$_id", "0"]},
    {"$trim": {"input": {"$concat": ["  ", "$_id", " "]}}},
    {"$trim": {"input": "$_id", "chars": "i1"}},
    {"$size": {"$ifNull": ["$tags", []]}},
    {"$arrayElemAt": ["$tags", 0]},
    {"$arrayElemAt": ["$tags", -1]},
    {"$in": ["x", {"$ifNull": ["$tags", []]}]},
    {"$filter": {"input": "$tags", "cond": {"$eq": ["$$this", "x"]}}},
    {"$filter": {"input": "$tags", "as": "t", "cond": {"$ne": ["$$t", "q"]}, "limit": 1}},
    {"$map": {"input": "$tags", "as": "t", "in": {"$concat": ["<", "$$t", ">"]}}},
    {"$map": {"input": "$o.l", "in": {"$multiply": ["$$this", "$n"]}}},
    {"$slice": ["$tags", 1]},
    {"$slice": ["$tags", -1]},
    {"$slice": ["$tags", 1, 1]},
    {"$concatArrays": ["$tags", ["end"]]},
    {"$type": "$n"},
    {"$type": "$o.k"},
    {"$toString": "$n"},
    {"$toString": "$f"},
    {"$toInt": "$f"},
    {"$toInt": "$n"},
    {"$toDouble": "$n"},
    {"v": "$n", "w": ["$f", "$missing"], "x": "$missing"},
    # lazy operators: an argument not needed is not evaluated, so it cannot fail
    {"$and": [False, {"$divide": [1, 0]}]},
    {"$or": [True, {"$divide": [1, 0]}]},
    {"$cond": [True, 1, {"$divide": [1, 0]}]},
    {"$ifNull": [1, {"$divide": [1, 0]}]},
    {"$switch": {"branches": [{"case": True, "then": 1}], "default": {"$divide": [1, 0]}}},
    {"$divide": [1, 0]},
]


async def _compare(db: AggDb, raw: list[dict[str, Any]]) -> None:
    pipeline = parse.parse_pipeline(raw, Limits())
    try:
        expected = reference.aggregate(_stored(), "items", raw)
        failed = None
    except reference.ExpressionFailed as exc:
        expected, failed = None, exc
    try:
        got = await db.run(pipeline, "items", strip=False)
    except ProxyError as exc:
        assert failed is not None and exc.code == "expression_failed", (raw, exc, expected)
        return
    assert failed is None, (raw, got, failed)
    assert reference.results_equal(got, expected), (raw, got, expected)


@pytest.mark.parametrize("raw", PIPELINES, ids=[str(i) for i in range(len(PIPELINES))])
async def test_pipeline(db: AggDb, raw: list[dict[str, Any]]) -> None:
    await _compare(db, raw)


@pytest.mark.parametrize("expr", EXPRESSIONS, ids=[str(i) for i in range(len(EXPRESSIONS))])
async def test_expression(db: AggDb, expr: Any) -> None:
    await _compare(db, [{"$project": {"_id": 1, "r": expr}}])
