"""The aggregation semantics of docs/aggregation.md on every backend, through the core: each
bullet of MongoDB's behaviour the issue names, with the exact answer written out."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.config import Limits
from proxy.errors import InvalidQuery
from proxy.pipeline.core import Core
from tests.backends import kinds_with, open_core
from tests.reference import values_equal

pytestmark = pytest.mark.integration
_names = itertools.count()


@pytest.fixture(scope="module", params=kinds_with("aggregate"))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def core(kind: str, pg_dsn: str, tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core(kind, pg_dsn, Limits(), str(tmp_path)) as c:
        yield c


async def load(core: Core, docs: list[dict[str, Any]]) -> str:
    name = f"c{next(_names)}"
    if docs:
        results = await core.create(name, [dict(d) for d in docs])
        assert all(r.status == 201 for r in results), results
    return name


async def agg(core: Core, name: str, pipeline: list[Any]) -> list[Any]:
    result = await core.aggregate(name, {"pipeline": pipeline})
    return [strip(orjson.loads(b)) for b in result.items]


def strip(doc: Any) -> Any:
    """Drop ``_version`` (the store's own field) from documents that carry it."""
    if isinstance(doc, dict):
        return {k: strip(v) for k, v in doc.items() if k != "_version"}
    if isinstance(doc, list):
        return [strip(v) for v in doc]
    return doc


def check(got: list[Any], want: list[Any]) -> None:
    assert values_equal(got, want), f"\n got: {got}\nwant: {want}"


KEYS = [{"_id": "a", "k": None, "v": 1}, {"_id": "b", "v": 2}, {"_id": "c", "k": 1, "v": 3}]


async def test_missing_and_null_are_one_group_key(core: Core) -> None:
    name = await load(core, KEYS)
    check(
        await agg(core, name, [{"$group": {"_id": "$k", "s": {"$sum": "$v"}}}]),
        [{"_id": None, "s": 3}, {"_id": 1, "s": 3}],
    )
    check(
        await agg(core, name, [{"$group": {"_id": {"k": "$k"}, "n": {"$sum": 1}}}]),
        [{"_id": {"k": None}, "n": 2}, {"_id": {"k": 1}, "n": 1}],
    )


async def test_sum_avg_take_numbers_only(core: Core) -> None:
    docs = [{"_id": str(i), "v": v} for i, v in enumerate([1, "2", None, [3], 4.5, True])]
    name = await load(core, [*docs, {"_id": "z"}])
    group = {"$group": {"_id": None, "s": {"$sum": "$v"}, "a": {"$avg": "$v"}}}
    check(await agg(core, name, [group]), [{"_id": None, "s": 5.5, "a": 2.75}])
    empty = [{"$match": {"v": {"$type": "string"}}}, group]
    check(await agg(core, name, empty), [{"_id": None, "s": 0, "a": None}])


async def test_min_max_across_types_ignore_null_and_missing(core: Core) -> None:
    name = await load(core, [{"_id": str(i), "v": v} for i, v in enumerate([5, "a", True, None])])
    group = {"$group": {"_id": None, "lo": {"$min": "$v"}, "hi": {"$max": "$v"}}}
    check(await agg(core, name, [group]), [{"_id": None, "lo": 5, "hi": True}])


async def test_first_last_push_follow_the_sort(core: Core) -> None:
    name = await load(core, [{"_id": "a", "v": 2}, {"_id": "b", "v": 3}, {"_id": "c", "v": 1}])
    pipeline = [
        {"$sort": {"v": -1}},
        {
            "$group": {
                "_id": None,
                "f": {"$first": "$v"},
                "l": {"$last": "$v"},
                "p": {"$push": "$_id"},
                "s": {"$addToSet": {"$mod": ["$v", 2]}},
            }
        },
    ]
    check(
        await agg(core, name, pipeline),
        [{"_id": None, "f": 3, "l": 1, "p": ["b", "a", "c"], "s": [1, 0]}],
    )


UNWIND = [
    {"_id": "a", "t": [1, 2]},
    {"_id": "b", "t": 3},
    {"_id": "c", "t": []},
    {"_id": "d", "t": None},
    {"_id": "e"},
]


async def test_unwind(core: Core) -> None:
    name = await load(core, UNWIND)
    check(
        await agg(core, name, [{"$unwind": "$t"}]),
        [{"_id": "a", "t": 1}, {"_id": "a", "t": 2}, {"_id": "b", "t": 3}],
    )
    spec = {"path": "$t", "includeArrayIndex": "i", "preserveNullAndEmptyArrays": True}
    check(
        await agg(core, name, [{"$unwind": spec}]),
        [
            {"_id": "a", "t": 1, "i": 0},
            {"_id": "a", "t": 2, "i": 1},
            {"_id": "b", "t": 3, "i": None},
            {"_id": "c", "i": None},
            {"_id": "d", "t": None, "i": None},
            {"_id": "e", "i": None},
        ],
    )


async def test_lookup_matches_elements_and_missing_matches_null(core: Core) -> None:
    local = await load(core, [{"_id": "o1", "k": 1}, {"_id": "o2", "k": [1, 2]}, {"_id": "o3"}])
    foreign = await load(
        core,
        [
            {"_id": "f1", "key": 1},
            {"_id": "f2", "key": 2},
            {"_id": "f3", "key": None},
            {"_id": "f4"},
        ],
    )
    pipeline = [
        {"$lookup": {"from": foreign, "localField": "k", "foreignField": "key", "as": "m"}},
        {"$project": {"ids": "$m._id"}},
    ]
    check(
        await agg(core, local, pipeline),
        [
            {"_id": "o1", "ids": ["f1"]},
            {"_id": "o2", "ids": ["f1", "f2"]},
            {"_id": "o3", "ids": ["f3", "f4"]},
        ],
    )
    missing = [
        {"$lookup": {"from": "nothing_here", "localField": "k", "foreignField": "key", "as": "m"}},
        {"$project": {"m": 1}},
    ]
    check(await agg(core, local, missing), [{"_id": i, "m": []} for i in ("o1", "o2", "o3")])


async def test_no_input_gives_no_document_but_facet_gives_one(core: Core) -> None:
    name = await load(core, KEYS)
    nothing = {"$match": {"nope": 1}}
    assert await agg(core, name, [nothing, {"$count": "n"}]) == []
    assert await agg(core, name, [nothing, {"$group": {"_id": None, "n": {"$sum": 1}}}]) == []
    check(
        await agg(core, name, [nothing, {"$facet": {"a": [], "b": [{"$count": "n"}]}}]),
        [{"a": [], "b": []}],
    )
    assert await agg(core, "never_written", [{"$count": "n"}]) == []


SORTS = [
    {"_id": "a", "v": [1, 5]},
    {"_id": "b", "v": 3},
    {"_id": "c", "v": []},
    {"_id": "d", "v": None},
    {"_id": "e"},
]


async def test_sort_uses_array_extremes_and_cross_type_order(core: Core) -> None:
    name = await load(core, [*SORTS, {"_id": "f", "v": "s"}, {"_id": "g", "v": True}])
    ids = [{"$project": {"_id": 1}}]
    asc = [d["_id"] for d in await agg(core, name, [{"$sort": {"v": 1}}, *ids])]
    assert asc == ["c", "d", "e", "a", "b", "f", "g"]
    desc = [d["_id"] for d in await agg(core, name, [{"$sort": {"v": -1}}, *ids])]
    assert desc == ["g", "f", "a", "b", "d", "e", "c"]


async def test_bucket_sort_by_count_and_expressions(core: Core) -> None:
    name = await load(
        core, [{"_id": str(i), "n": n, "s": " Ab "} for i, n in enumerate([1, 5, 5, 12])]
    )
    check(
        await agg(
            core,
            name,
            [{"$bucket": {"groupBy": "$n", "boundaries": [0, 5, 10], "default": "other"}}],
        ),
        [{"_id": 0, "count": 1}, {"_id": 5, "count": 2}, {"_id": "other", "count": 1}],
    )
    check(
        await agg(core, name, [{"$sortByCount": "$n"}]),
        [{"_id": 5, "count": 2}, {"_id": 1, "count": 1}, {"_id": 12, "count": 1}],
    )
    pipeline = [
        {"$limit": 1},
        {
            "$project": {
                "_id": 0,
                "r": [
                    {"$round": [2.5]},
                    {"$round": [3.5]},
                    {"$round": [-2.5]},
                    {"$round": [0.125, 2]},
                ],
                "t": {"$toLower": {"$trim": {"input": "$s"}}},
                "c": {"$cond": [{"$gte": ["$n", 2]}, "big", "small"]},
                "ty": [{"$type": "$n"}, {"$type": "$nope"}, {"$type": 1.5}],
            }
        },
    ]
    check(
        await agg(core, name, pipeline),
        [{"r": [2, 4, -2, 0.12], "t": "ab", "c": "small", "ty": ["int", "missing", "double"]}],
    )


async def test_runtime_failures_are_expression_failed(core: Core) -> None:
    name = await load(core, [{"_id": "a", "n": 1, "s": "x"}])
    for expr in ({"$divide": ["$n", 0]}, {"$add": ["$n", "$s"]}, {"$size": "$n"}, {"$toInt": "$s"}):
        with pytest.raises(InvalidQuery) as info:
            await agg(core, name, [{"$project": {"x": expr}}])
        assert info.value.code == "expression_failed", expr


NOTHING = {"$gt": None}  # a filter nothing matches: both compilers know it is false


async def test_a_failure_is_not_hidden_by_a_later_stage_known_to_yield_nothing(
    core: Core,
) -> None:
    """The reference evaluates every stage on every document, so a failing expression
    fails the pipeline even where a later stage that the planner knows is empty reads none
    of its output (found by the differential test: PostgreSQL dropped the check with the
    empty relation)."""
    name = await load(core, [{"_id": "1", "a": None, "b": -2}, {"_id": "2", "a": 1, "b": [1]}])
    cases = [
        [{"$project": {"a": 1, "p": {"$toLower": "$b"}}}, {"$match": {"a": NOTHING}}],
        [{"$addFields": {"x": {"$size": "$b"}}}, {"$match": {"x": NOTHING}}, {"$count": "n"}],
        [{"$facet": {"f": [{"$set": {"x": {"$size": "$b"}}}, {"$match": {"x": NOTHING}}]}}],
        [
            {"$facet": {"f": [{"$set": {"x": {"$size": "$b"}}}, {"$match": {"x": NOTHING}}]}},
            {"$match": {"f": NOTHING}},
        ],
    ]
    for pipeline in cases:
        with pytest.raises(InvalidQuery) as info:
            await agg(core, name, pipeline)
        assert info.value.code == "expression_failed", pipeline
    # the same pipelines without the failing document: nothing out, no error
    strings = await load(core, [{"_id": "3", "a": 1, "b": "X"}, {"_id": "4", "b": None}])
    assert await agg(core, strings, cases[0]) == []
    arrays = await load(core, [{"_id": "2", "a": 1, "b": [1]}])
    assert await agg(core, arrays, cases[2]) == [{"f": []}]


async def test_an_output_document_over_the_byte_cap_is_refused(
    kind: str, pg_dsn: str, tmp_path: Path
) -> None:
    limits = Limits(max_aggregate_document_bytes=2000)
    async with open_core(kind, pg_dsn, limits, str(tmp_path)) as core:
        name = await load(core, [{"_id": f"d{i:03}", "text": "x" * 50} for i in range(100)])
        pushed = [{"$group": {"_id": None, "all": {"$push": "$text"}}}]
        with pytest.raises(InvalidQuery) as info:
            await agg(core, name, pushed)
        assert info.value.code == "result_too_large"
        with pytest.raises(InvalidQuery) as info:
            await agg(core, name, [{"$facet": {"all": []}}])
        assert info.value.code == "result_too_large"
        small = await agg(core, name, [{"$limit": 10}, *pushed])
        assert len(small[0]["all"]) == 10
