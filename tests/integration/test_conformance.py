"""Backend conformance suite: every backend must pass all of it, through the Core pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from proxy.config import Limits
from proxy.errors import (
    BadRequest,
    Conflict,
    DuplicateId,
    ForbiddenOperator,
    InvalidCollection,
    InvalidQuery,
    LimitExceeded,
    NotFound,
    PreconditionFailed,
)
from proxy.pipeline.core import Core
from proxy.query.spec import ItemResult, WriteResult
from tests.backends import KINDS, backend_namespace, core_over, open_core

pytestmark = pytest.mark.integration


@pytest.fixture(params=KINDS)
async def core(request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Any) -> AsyncIterator[Core]:
    async with open_core(request.param, pg_dsn, Limits(), str(tmp_path)) as c:
        yield c


def doc(result: WriteResult | bytes) -> dict[str, Any]:
    raw = result.body if isinstance(result, WriteResult) else result
    value: dict[str, Any] = orjson.loads(raw)
    return value


async def ids(core: Core, flt: Any = None, **raw: Any) -> list[str]:
    spec = core.find_spec({"filter": flt, "limit": 1000, **raw}, from_url=False)
    page = await core.find("c", spec)
    return [doc(b)["_id"] for b in page.items]


async def seed(core: Core, docs: list[dict[str, Any]]) -> None:
    result = await core.create("c", docs)
    assert isinstance(result, list)
    assert all(r.status == 201 for r in result), result


# ---- CRUD ---------------------------------------------------------------------------


async def test_create_get_roundtrip_generates_ordered_ids(core: Core) -> None:
    a = doc(await core.create("c", {"name": "ann", "nested": {"x": [1, 2.5, None]}}))
    b = doc(await core.create("c", {"name": "bob"}))
    assert a["_version"] == 1 and isinstance(a["_id"], str) and len(a["_id"]) == 26
    assert a["_id"] < b["_id"]  # time-ordered
    got = await core.get("c", a["_id"])
    assert doc(got) == a and got.version == 1


async def test_duplicate_id_is_409_and_keeps_the_original(core: Core) -> None:
    await core.create("c", {"_id": "k", "v": 1})
    with pytest.raises(DuplicateId):
        await core.create("c", {"_id": "k", "v": 2})
    assert doc(await core.get("c", "k"))["v"] == 1


async def test_bulk_create_items_fail_on_their_own(core: Core) -> None:
    result = await core.create(
        "c", [{"_id": "a"}, {"_id": "a"}, 5, {"_id": 7}, {"$bad": 1}, {"n": 1}]
    )
    assert isinstance(result, list)
    assert [r.status for r in result] == [201, 409, 400, 400, 400, 201]
    assert all(isinstance(r, ItemResult) for r in result)
    assert sorted(await ids(core)) == sorted(["a", result[5].id])


async def test_get_missing_and_unknown_collection(core: Core) -> None:
    with pytest.raises(NotFound):
        await core.get("nothing_here", "x")
    assert await core.count("nothing_here", None) == 0
    page = await core.find("nothing_here", core.find_spec({}, from_url=False))
    assert page.items == [] and page.next is None


async def test_replace_bumps_version_and_keeps_id(core: Core) -> None:
    await core.create("c", {"_id": "r", "a": 1, "b": 2})
    res = await core.replace_or_update("c", "r", {"a": 5})
    assert doc(res) == {"_id": "r", "a": 5, "_version": 2} and res.version == 2
    with pytest.raises(BadRequest):
        await core.replace_or_update("c", "r", {"_id": "other", "a": 1})
    with pytest.raises(NotFound):
        await core.replace_or_update("c", "missing", {"a": 1})


async def test_upsert_creates_then_updates(core: Core) -> None:
    res = await core.replace_or_update("c", "u", {"$inc": {"n": 2}}, upsert=True)
    assert res.created and doc(res) == {"_id": "u", "n": 2, "_version": 1}
    res = await core.replace_or_update("c", "u", {"$inc": {"n": 2}}, upsert=True)
    assert not res.created and doc(res) == {"_id": "u", "n": 4, "_version": 2}
    res = await core.replace_or_update("c", "v", {"x": 1}, upsert=True)
    assert res.created and doc(res) == {"_id": "v", "x": 1, "_version": 1}


async def test_update_operators(core: Core) -> None:
    await core.create("c", {"_id": "d", "n": 1, "s": "x", "arr": [1, 2, 2, 3], "o": {"k": 1}})
    res = await core.replace_or_update(
        "c",
        "d",
        {
            "$inc": {"n": 2.5},
            "$set": {"new.deep.field": True, "o.k2": [1]},
            "$unset": {"s": ""},
            "$pull": {"arr": 2},
            "$push": {"list": {"$each": [1, 2]}},
            "$addToSet": {"tags": {"$each": ["a", "a", "b"]}},
            "$min": {"lo": 5},
            "$max": {"hi": 7},
            "$mul": {"zero": 3},
        },
    )
    assert doc(res) == {
        "_id": "d",
        "_version": 2,
        "n": 3.5,
        "new": {"deep": {"field": True}},
        "o": {"k": 1, "k2": [1]},
        "arr": [1, 3],
        "list": [1, 2],
        "tags": ["a", "b"],
        "lo": 5,
        "hi": 7,
        "zero": 0,
    }
    res = await core.replace_or_update(
        "c",
        "d",
        {
            "$rename": {"o": "p"},
            "$min": {"lo": 2},
            "$max": {"hi": 3},
            "$pull": {"arr": {"$gt": 1}},
            "$addToSet": {"tags": "a"},
        },
    )
    body = doc(res)
    assert body["p"] == {"k": 1, "k2": [1]} and "o" not in body
    assert body["lo"] == 2 and body["hi"] == 7 and body["arr"] == [1] and body["tags"] == ["a", "b"]


async def test_update_type_mismatch_is_400_and_changes_nothing(core: Core) -> None:
    await core.create("c", {"_id": "t", "s": "text", "n": 5})
    for bad in ({"$inc": {"s": 1}}, {"$push": {"n": 1}}, {"$set": {"n.x": 1}}):
        with pytest.raises(InvalidQuery) as info:
            await core.replace_or_update("c", "t", bad)
        assert info.value.code == "update_type_mismatch"
    assert doc(await core.get("c", "t")) == {"_id": "t", "s": "text", "n": 5, "_version": 1}


async def test_bad_updates_rejected_before_io(core: Core) -> None:
    await core.create("c", {"_id": "t"})
    for bad, code in (
        ({"$set": {"_id": "x"}}, "immutable_field"),
        ({"$set": {"a": 1}, "$inc": {"a.b": 1}}, "conflicting_update"),
        ({"$where": {"a": 1}}, "forbidden_operator"),
        ({"$bogus": {"a": 1}}, "unknown_operator"),
        ({"$inc": {"a": "1"}}, "invalid_update"),
        ({"$set": {"a": 1}, "plain": 2}, "invalid_update"),
    ):
        with pytest.raises(BadRequest) as info:
            await core.replace_or_update("c", "t", bad)
        assert info.value.code == code, bad


async def test_merge_patch_rfc7396(core: Core) -> None:
    await core.create("c", {"_id": "m", "a": "b", "c": {"d": "e", "f": "g"}})
    res = await core.merge_patch("c", "m", {"a": "z", "c": {"f": None}})
    assert doc(res) == {"_id": "m", "a": "z", "c": {"d": "e"}, "_version": 2}
    res = await core.merge_patch("c", "m", {"c": [1], "n": {"x": None, "y": 1}})
    assert doc(res) == {"_id": "m", "a": "z", "c": [1], "n": {"y": 1}, "_version": 3}
    with pytest.raises(BadRequest):
        await core.merge_patch("c", "m", {"_version": 9})


async def test_delete_and_if_match(core: Core) -> None:
    await core.create("c", {"_id": "x", "v": 1})
    with pytest.raises(PreconditionFailed):
        await core.replace_or_update("c", "x", {"v": 2}, if_match=5)
    res = await core.replace_or_update("c", "x", {"v": 2}, if_match=1)
    assert res.version == 2
    with pytest.raises(PreconditionFailed):
        await core.delete("c", "x", if_match=1)
    assert await core.delete("c", "x", if_match=2) == 2
    with pytest.raises(NotFound):
        await core.delete("c", "x")
    with pytest.raises(NotFound):
        await core.merge_patch("c", "x", {"a": 1})


async def test_concurrent_if_match_exactly_one_wins(core: Core) -> None:
    await core.create("c", {"_id": "race", "n": 0})

    async def attempt(i: int) -> bool:
        try:
            await core.replace_or_update("c", "race", {"n": i}, if_match=1)
            return True
        except PreconditionFailed:
            return False

    wins = await asyncio.gather(*(attempt(i) for i in range(20)))
    assert sum(wins) == 1
    assert (await core.get("c", "race")).version == 2


# ---- queries --------------------------------------------------------------------------

PEOPLE = [
    {"_id": "p1", "name": "ann", "age": 31, "tags": ["a", "b"], "addr": {"city": "Oslo"}},
    {"_id": "p2", "name": "bob", "age": 25, "tags": ["b"], "addr": {"city": "Rome"}},
    {"_id": "p3", "name": "Cy", "age": "40", "tags": [], "addr": None},
    {
        "_id": "p4",
        "name": "dan",
        "age": None,
        "items": [{"sku": "x", "qty": 2}, {"sku": "y", "qty": 9}],
    },
    {"_id": "p5", "name": "eve", "age": 25.0, "tags": ["c", ["a"]], "flag": True},
    {"_id": "p6", "name": "fay"},
]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({}, ["p1", "p2", "p3", "p4", "p5", "p6"]),
        ({"age": 25}, ["p2", "p5"]),
        ({"age": {"$gt": 25}}, ["p1"]),
        ({"age": {"$gte": "3"}}, ["p3"]),
        ({"age": None}, ["p4", "p6"]),
        ({"age": {"$ne": None}}, ["p1", "p2", "p3", "p5"]),
        ({"age": {"$exists": False}}, ["p6"]),
        ({"tags": "b"}, ["p1", "p2"]),
        ({"tags": ["a"]}, ["p5"]),
        ({"tags": {"$size": 0}}, ["p3"]),
        ({"tags": {"$all": ["a", "b"]}}, ["p1"]),
        ({"tags": {"$in": ["c", "zz"]}}, ["p5"]),
        ({"tags": {"$nin": ["b"]}}, ["p3", "p4", "p5", "p6"]),
        ({"addr.city": "Rome"}, ["p2"]),
        ({"addr.city": None}, ["p3", "p4", "p5", "p6"]),
        ({"items.qty": {"$gt": 5}}, ["p4"]),
        ({"items": {"$elemMatch": {"sku": "x", "qty": {"$gte": 2}}}}, ["p4"]),
        ({"items": {"$elemMatch": {"sku": "x", "qty": 9}}}, []),
        ({"items.1.sku": "y"}, ["p4"]),
        ({"name": {"$regex": "^c", "$options": "i"}}, ["p3"]),
        ({"name": {"$regex": "^c"}}, []),
        ({"name": {"$not": {"$regex": "a"}}}, ["p2", "p3", "p5"]),
        ({"nick": {"$not": {"$regex": "a"}}}, ["p1", "p2", "p3", "p4", "p5", "p6"]),
        ({"age": {"$type": "string"}}, ["p3"]),
        ({"age": {"$type": ["null", "number"]}}, ["p1", "p2", "p4", "p5"]),
        ({"flag": True}, ["p5"]),
        ({"flag": 1}, []),
        ({"$or": [{"age": 31}, {"name": "fay"}]}, ["p1", "p6"]),
        ({"$nor": [{"age": 25}, {"age": None}]}, ["p1", "p3"]),
        ({"$and": [{"tags": "b"}, {"age": {"$lt": 30}}]}, ["p2"]),
    ],
)
async def test_filter_semantics(core: Core, flt: dict[str, Any], expected: list[str]) -> None:
    await seed(core, PEOPLE)
    assert sorted(await ids(core, flt)) == expected
    assert await core.count("c", flt) == len(expected)


async def test_sort_cross_type_and_pagination(core: Core) -> None:
    await seed(core, PEOPLE)
    # missing/null < numbers < strings; ties broken by _id
    assert await ids(core, sort="age") == ["p4", "p6", "p2", "p5", "p1", "p3"]
    assert await ids(core, sort="-age") == ["p3", "p1", "p2", "p5", "p4", "p6"]
    assert await ids(core, sort={"addr.city": -1, "name": 1}) == [
        "p2",
        "p1",
        "p3",
        "p4",
        "p5",
        "p6",
    ]
    for sort in (None, "age", "-age,name", "-name"):
        full = await ids(core, sort=sort)
        seen: list[str] = []
        nxt = None
        for _ in range(10):
            spec = core.find_spec({"sort": sort, "limit": 2, "next": nxt}, from_url=False)
            page = await core.find("c", spec)
            seen += [doc(b)["_id"] for b in page.items]
            nxt = page.next
            if nxt is None:
                break
        assert seen == full, sort


async def test_cursor_bound_to_sort(core: Core) -> None:
    await seed(core, PEOPLE)
    page = await core.find("c", core.find_spec({"sort": "age", "limit": 2}, from_url=False))
    assert page.next
    with pytest.raises(InvalidQuery) as info:
        await core.find("c", core.find_spec({"sort": "name", "next": page.next}, from_url=False))
    assert info.value.code == "invalid_cursor"
    with pytest.raises(InvalidQuery):
        await core.find("c", core.find_spec({"next": "garbage!!"}, from_url=False))


async def test_projection_and_skip(core: Core) -> None:
    await seed(core, PEOPLE)
    page = await core.find(
        "c",
        core.find_spec(
            {"fields": "name,addr.city", "sort": "_id", "limit": 2, "skip": 1}, from_url=False
        ),
    )
    assert [doc(b) for b in page.items] == [
        {"_id": "p2", "_version": 1, "name": "bob", "addr": {"city": "Rome"}},
        {"_id": "p3", "_version": 1, "name": "Cy"},
    ]
    got = await core.get("c", "p1", "name")
    assert doc(got) == {"_id": "p1", "_version": 1, "name": "ann"}


# ---- limits and bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "exc", "code"),
    [
        ({"filter": {"$where": "sleep(1)"}}, ForbiddenOperator, "forbidden_operator"),
        ({"filter": {"a": {"$function": {}}}}, ForbiddenOperator, "forbidden_operator"),
        ({"filter": {"a": {"$expr": 1}}}, ForbiddenOperator, "forbidden_operator"),
        ({"filter": {"a": {"$foo": 1}}}, InvalidQuery, "unknown_operator"),
        ({"filter": {"a": {"$in": list(range(1001))}}}, LimitExceeded, "in_list_too_long"),
        ({"filter": {"a": {"$regex": "a" * 257}}}, LimitExceeded, "regex_too_long"),
        ({"filter": {"$or": [{"a": i} for i in range(201)]}}, LimitExceeded, "filter_too_large"),
        ({"limit": 1001}, LimitExceeded, "limit_too_large"),
        ({"limit": 0}, BadRequest, "invalid_parameter"),
        ({"sort": "a,a"}, InvalidQuery, "invalid_query"),
        ({"filter": {"a": {"$gt": {"x": 1}}}}, InvalidQuery, "invalid_operator_value"),
        ({"filter": {"a..b": 1}}, InvalidQuery, "invalid_query"),
        ({"filter": {"a": {"$regex": "x", "$options": "g"}}}, InvalidQuery, "invalid_query"),
        ({"bogus": 1}, BadRequest, "unknown_parameter"),
    ],
)
async def test_bad_queries_rejected(core: Core, raw: dict[str, Any], exc: type, code: str) -> None:
    with pytest.raises(exc) as info:
        spec = core.find_spec(raw, from_url=False)
        await core.find("c", spec)
    assert info.value.code == code


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a" * 64, 'x"; drop table', "health", "é"])
async def test_bad_collection_names(core: Core, name: str) -> None:
    with pytest.raises(InvalidCollection):
        await core.create(name, {"a": 1})
    with pytest.raises(InvalidCollection):
        await core.count(name, None)


async def test_invalid_regex_is_400(core: Core) -> None:
    await seed(core, PEOPLE)
    with pytest.raises(InvalidQuery) as info:
        await ids(core, {"name": {"$regex": "(unclosed"}})
    assert info.value.code == "invalid_regex"


async def test_concurrent_writers_lose_nothing(core: Core) -> None:
    async def writer(w: int) -> None:
        for i in range(50):
            await core.create("c", {"_id": f"w{w}-{i}", "w": w})
        for i in range(0, 50, 2):
            await core.replace_or_update("c", f"w{w}-{i}", {"$inc": {"n": 1}})

    await asyncio.gather(*(writer(w) for w in range(8)))
    assert await core.count("c", None) == 400
    assert await core.count("c", {"n": 1}) == 200


async def test_eight_writers_of_two_hundred_writes_lose_nothing(core: Core) -> None:
    """8 tasks x 200 writes: each creates 100 documents and increments 100 times, half of
    them on one shared document (every increment must land: no lost update). A retryable
    ``409 write_conflict`` is retried as the contract tells a client to (MongoDB: the audited
    write's transaction may give up on a hot document; PostgreSQL and SQLite never answer it
    here); nothing acknowledged may be lost, nothing refused may have landed."""
    await core.create("c", {"_id": "shared", "n": 0})

    async def retried(op: Callable[[], Awaitable[Any]]) -> None:
        for _ in range(50):
            try:
                await op()
                return
            except Conflict as err:
                if not err.retryable:
                    raise
        raise AssertionError("50 retryable conflicts in a row")

    async def writer(w: int) -> None:
        for i in range(100):
            await core.create("c", {"_id": f"w{w}-{i}", "n": 0})
            target = "shared" if i % 2 else f"w{w}-{i}"
            await retried(lambda t=target: core.replace_or_update("c", t, {"$inc": {"n": 1}}))

    await asyncio.gather(*(writer(w) for w in range(8)))
    assert await core.count("c", None) == 801
    shared = await core.get("c", "shared")
    assert doc(shared)["n"] == 400 and shared.version == 401
    assert await core.count("c", {"n": 1, "_id": {"$ne": "shared"}}) == 400
    assert await core.count("c", {"n": 0}) == 400


async def test_collection_names_are_case_sensitive(core: Core) -> None:
    await core.create("Users", {"_id": "a", "v": 1})
    await core.create("users", {"_id": "a", "v": 2})
    assert doc(await core.get("Users", "a"))["v"] == 1
    assert doc(await core.get("users", "a"))["v"] == 2
    assert await core.count("USERS", None) == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_data_survives_a_restart(kind: str, pg_dsn: str, tmp_path: Any) -> None:
    """Close the backend, open a new one on the same schema / file: everything
    acknowledged is there, and the store takes new writes."""
    limits = Limits()
    async with backend_namespace(kind, pg_dsn, limits, str(tmp_path)) as make:
        first = make()
        await first.start()
        try:
            core = core_over(first, limits)
            await core.create("c", [{"_id": "kept", "n": 1}, {"_id": "gone"}, {"_id": "other"}])
            await core.replace_or_update("c", "kept", {"$inc": {"n": 1}, "$set": {"s": "é"}})
            await core.delete("c", "gone")
            await core.create("Other", {"_id": "x"})
        finally:
            await first.close()
        second = make()
        await second.start()
        try:
            core = core_over(second, limits)
            kept = await core.get("c", "kept")
            assert doc(kept) == {"_id": "kept", "n": 2, "s": "é", "_version": 2}
            assert kept.version == 2
            assert sorted(await ids(core)) == ["kept", "other"]
            assert await core.count("Other", None) == 1
            with pytest.raises(NotFound):
                await core.get("c", "gone")
            await core.create("c", {"_id": "after"})
            res = await core.replace_or_update("c", "kept", {"$inc": {"n": 1}})
            assert res.version == 3 and doc(res)["n"] == 3
        finally:
            await second.close()
