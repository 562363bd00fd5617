"""The SQLite aggregation compiler against the reference evaluator: the same pipelines over
the same documents give the same results (or both fail with expression_failed)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Limits
from proxy.errors import InvalidQuery
from proxy.query.aggregate.parse import parse_pipeline
from tests import reference_aggregate as ref
from tests.integration.aggregate_sqlite_support import Store

ITEMS: list[dict[str, Any]] = [
    {
        "_id": "a1",
        "n": 3,
        "x": 1.5,
        "s": "beta",
        "t": ["x", "y"],
        "g": "red",
        "b": True,
        "o": {"p": 1, "q": [1, 2]},
        "objs": [{"k": 1, "v": "a"}, {"k": 2}],
        "mix": [3, "c", None],
    },
    {
        "_id": "a2",
        "n": -7,
        "x": 2.0,
        "s": "Alpha",
        "t": [],
        "g": "blue",
        "b": False,
        "o": {"p": None},
        "objs": [{"k": 3, "v": "b"}],
        "mix": [],
    },
    {"_id": "a3", "n": 0, "s": "", "t": "solo", "g": "red", "o": 5, "mix": [[1], {"z": 1}]},
    {
        "_id": "a4",
        "n": 12,
        "x": -0.5,
        "s": "gamma ray",
        "t": ["y"],
        "g": None,
        "b": True,
        "objs": [],
        "mix": [2.5, 2],
    },
    {
        "_id": "a5",
        "x": 10,
        "s": "  pad  ",
        "t": ["z", "x", "x"],
        "b": None,
        "o": {"p": 2},
        "objs": [{"v": "c"}, 4, [{"k": 9}]],
    },
    {"_id": "a6", "n": 1, "x": 1, "s": "beta", "t": ["x"], "g": "blue", "o": {"p": 1.0}},
]
OTHER: list[dict[str, Any]] = [
    {"_id": "o1", "key": 1, "label": "one"},
    {"_id": "o2", "key": [2, 3], "label": "two-three"},
    {"_id": "o3", "key": "x", "label": "ex"},
    {"_id": "o4", "label": "nokey"},
    {"_id": "o5", "key": None, "label": "null"},
    {"_id": "o0", "key": 3.0, "label": "three"},
]


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = Store(Path(tmp_path_factory.mktemp("aggref")) / "agg.sqlite3")
    store.put("items", ITEMS)
    store.put("other", OTHER)
    return store


def _collections() -> dict[str, list[dict[str, Any]]]:
    return {
        "items": [{"_version": 1, **d} for d in ITEMS],
        "other": [{"_version": 1, **d} for d in OTHER],
    }


def check(store: Store, raw: list[dict[str, Any]]) -> None:
    try:
        parse_pipeline(raw, Limits())
    except InvalidQuery as exc:  # refused up front (a constant argument of the wrong kind)
        assert exc.code != "expression_failed"
        return
    try:
        expected = ref.aggregate(_collections(), "items", raw)
    except ref.ExpressionFailed:
        with pytest.raises(InvalidQuery) as info:
            store.run(raw)
        assert info.value.code == "expression_failed", raw
        return
    got = store.run(raw)
    assert ref.results_equal(expected, got), (raw, expected, got)


PIPELINES: list[list[dict[str, Any]]] = [
    [],
    [{"$match": {"n": {"$gt": 0}}}],
    [{"$match": {"t": "x"}}, {"$project": {"s": 1}}],
    [{"$sort": {"n": 1}}],
    [{"$sort": {"n": -1, "s": 1}}],
    [{"$sort": {"t": 1}}],
    [{"$sort": {"t": -1}}],
    [{"$sort": {"mix": 1}}],
    [{"$sort": {"mix": -1}}],
    [{"$sort": {"objs.k": 1}}],
    [{"$sort": {"objs.k": -1}}],
    [{"$sort": {"o.p": 1}}],
    [{"$sort": {"g": 1}}, {"$skip": 2}, {"$limit": 3}],
    [{"$count": "total"}],
    [{"$group": {"_id": "$g", "n": {"$sum": 1}, "sn": {"$sum": "$n"}, "ax": {"$avg": "$x"}}}],
    [{"$group": {"_id": "$g", "lo": {"$min": "$mix"}, "hi": {"$max": "$mix"}}}],
    [{"$group": {"_id": "$o.p", "f": {"$first": "$n"}, "l": {"$last": "$n"}}}],
    [{"$group": {"_id": None, "p": {"$push": "$n"}, "s": {"$addToSet": "$t"}}}],
    [{"$group": {"_id": {"g": "$g", "b": "$b"}, "c": {"$count": {}}}}],
    [{"$group": {"_id": "$x", "ids": {"$push": "$_id"}}}],
    [{"$sortByCount": "$g"}],
    [{"$sortByCount": "$s"}],
    [{"$unwind": "$t"}],
    [{"$unwind": {"path": "$t", "includeArrayIndex": "i", "preserveNullAndEmptyArrays": True}}],
    [{"$unwind": "$objs"}, {"$group": {"_id": "$objs.k", "n": {"$sum": 1}}}],
    [{"$unwind": "$t"}, {"$sortByCount": "$t"}],
    [{"$project": {"s": 1, "o.p": 1, "objs.k": 1}}],
    [{"$project": {"_id": 0, "n": 1, "twice": {"$multiply": ["$n", 2]}}}],
    [{"$project": {"o": 0, "objs": 0, "mix": 0}}],
    [{"$addFields": {"o.r": "$n", "objs.w": 1, "new.deep": "$s"}}],
    [{"$set": {"n": "$nothing", "x2": {"$ifNull": ["$x", "none"]}}}],
    [{"$unset": ["o.p", "objs.k", "t"]}],
    [{"$replaceRoot": {"newRoot": {"id": "$_id", "g": "$g"}}}],
    [{"$match": {"o": {"$type": "object"}}}, {"$replaceWith": "$o"}],
    [{"$replaceRoot": {"newRoot": "$o"}}],
    [{"$lookup": {"from": "other", "localField": "n", "foreignField": "key", "as": "m"}}],
    [{"$lookup": {"from": "other", "localField": "t", "foreignField": "key", "as": "m"}}],
    [{"$lookup": {"from": "other", "localField": "x", "foreignField": "key", "as": "o.m"}}],
    [{"$lookup": {"from": "nowhere", "localField": "n", "foreignField": "key", "as": "m"}}],
    [
        {
            "$facet": {
                "a": [{"$count": "n"}],
                "b": [{"$sortByCount": "$g"}],
                "c": [{"$match": {"n": 99}}],
            }
        }
    ],
    [{"$bucket": {"groupBy": "$n", "boundaries": [-10, 0, 5, 100], "default": "else"}}],
    [
        {
            "$bucket": {
                "groupBy": "$s",
                "boundaries": ["a", "c", "h"],
                "default": None,
                "output": {"ids": {"$push": "$_id"}, "m": {"$max": "$x"}},
            }
        }
    ],
    [{"$bucket": {"groupBy": "$n", "boundaries": [0, 5]}}],
    [{"$match": {"n": {"$gte": 0}}}, {"$bucket": {"groupBy": "$n", "boundaries": [0, 5, 20]}}],
    [{"$group": {"_id": "$g", "n": {"$sum": 1}}}, {"$sort": {"n": -1}}, {"$limit": 1}],
]


@pytest.mark.parametrize("raw", PIPELINES, ids=[str(i) for i in range(len(PIPELINES))])
def test_pipeline_matches_reference(both: Store, raw: list[dict[str, Any]]) -> None:
    check(both, raw)


# ---- random expressions ------------------------------------------------------------------------

FIELDS = [
    "$n",
    "$x",
    "$s",
    "$t",
    "$g",
    "$b",
    "$o",
    "$o.p",
    "$o.q",
    "$objs",
    "$objs.k",
    "$mix",
    "$nope",
    "$_id",
]
LITERALS: list[Any] = [0, 1, -2, 2.5, "a", "", None, True, False, {"$literal": [1, "a"]}]
OPS: dict[str, int] = {
    "add": 2,
    "multiply": 2,
    "subtract": 2,
    "divide": 2,
    "mod": 2,
    "abs": 1,
    "floor": 1,
    "ceil": 1,
    "eq": 2,
    "ne": 2,
    "gt": 2,
    "gte": 2,
    "lt": 2,
    "lte": 2,
    "cmp": 2,
    "and": 2,
    "or": 2,
    "not": 1,
    "ifNull": 2,
    "concat": 2,
    "toLower": 1,
    "toUpper": 1,
    "strLenCP": 1,
    "size": 1,
    "type": 1,
    "toString": 1,
    "toInt": 1,
    "toDouble": 1,
    "in": 2,
    "concatArrays": 2,
    "arrayElemAt": 2,
    "split": 2,
}


def gen(rnd: random.Random, depth: int, inside: bool = False) -> Any:
    if depth == 0 or rnd.random() < 0.3:
        if inside and rnd.random() < 0.4:
            return rnd.choice(["$$this", "$$this.k"])
        return rnd.choice(FIELDS) if rnd.random() < 0.7 else rnd.choice(LITERALS)
    kind = rnd.random()
    if kind < 0.08:
        return {
            "$cond": [
                gen(rnd, depth - 1, inside),
                gen(rnd, depth - 1, inside),
                gen(rnd, depth - 1, inside),
            ]
        }
    if kind < 0.12:
        return {
            "$map": {"input": rnd.choice(["$t", "$mix", "$objs"]), "in": gen(rnd, depth - 1, True)}
        }
    if kind < 0.16:
        return {"$filter": {"input": rnd.choice(["$t", "$mix"]), "cond": gen(rnd, depth - 1, True)}}
    if kind < 0.2:
        return {"k": gen(rnd, depth - 1, inside), "l": [gen(rnd, depth - 1, inside)]}
    op = rnd.choice(sorted(OPS))
    args = [gen(rnd, depth - 1, inside) for _ in range(OPS[op])]
    return {f"${op}": args}


@pytest.mark.parametrize("seed", range(300))
def test_random_expression_matches_reference(both: Store, seed: int) -> None:
    rnd = random.Random(seed)
    expr = gen(rnd, 3)
    # through $addFields: $project reads a bare number as inclusion (contract question)
    check(both, [{"$addFields": {"r": expr}}, {"$project": {"_id": 0, "r": 1}}])
