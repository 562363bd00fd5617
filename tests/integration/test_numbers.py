"""Numbers on every backend (issue 13, item 6): integers are signed 64-bit and floats finite
doubles, inputs and update results outside that are 400 ``number_out_of_range`` with nothing
written, and a document already stored with such a number stays readable on every read path."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from proxy.backends.postgres import PostgresBackend
from proxy.backends.sqlite import SqliteBackend, table_name
from proxy.config import Limits
from proxy.errors import BadRequest
from proxy.pipeline.core import Core
from proxy.pipeline.gate import Caller, Gatekeeper
from proxy.policy import load_policies
from proxy.query.spec import ItemResult, WriteResult
from tests.backends import KINDS, open_core

pytestmark = pytest.mark.integration
POLICIES = Path(__file__).resolve().parents[2] / "policies"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@pytest.fixture(params=KINDS)
async def core(request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core(request.param, pg_dsn, Limits(), str(tmp_path)) as c:
        yield c


def doc(result: WriteResult | bytes) -> dict[str, Any]:
    raw = result.body if isinstance(result, WriteResult) else result
    value: dict[str, Any] = orjson.loads(raw)
    return value


def _int(literal: str) -> int | float:
    n = int(literal) if len(literal) <= 21 else None
    return n if n is not None and INT64_MIN <= n < 2**64 else float(literal)


def loose(raw: bytes) -> Any:
    """Parse JSON as orjson does, but a number past double range reads as inf, not an error."""
    return json.loads(raw, parse_int=_int)


async def refused(coro: Any) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        await coro
    assert info.value.status == 400 and info.value.code == "number_out_of_range", info.value
    return info.value


async def store_raw(core: Core, pg_dsn: str, collection: str, doc_id: str, text: str) -> None:
    """Put a document's JSON text into the store directly, around dbproxy (older data)."""
    backend = core.backend()
    if backend.config.type == "mongodb":  # type: ignore[attr-defined]
        pytest.skip(
            "MongoDB stores BSON: no integer past signed 64 bits (nor a JSON text) can be "
            "stored around dbproxy, so there is no such legacy data to read"
        )
    if isinstance(backend, PostgresBackend):
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(
                f'UPDATE "{backend.schema}"."{collection}" SET doc = $1::jsonb WHERE _id = $2',
                text,
                doc_id,
            )
        finally:
            await conn.close()
        return
    assert isinstance(backend, SqliteBackend)
    conn2 = sqlite3.connect(backend.path)
    try:
        with conn2:
            conn2.execute(
                f"UPDATE {table_name(collection)} SET doc = ? WHERE _id = ?", (text, doc_id)
            )
    finally:
        conn2.close()


# ---- update results ----------------------------------------------------------------------


async def test_mul_past_double_range_is_refused_and_changes_nothing(core: Core) -> None:
    await core.create("c", {"_id": "a", "n": 2, "other": 1})
    first = doc(await core.replace_or_update("c", "a", {"$mul": {"n": 1e300}}))
    assert first["n"] == 2e300 and first["_version"] == 2
    err = await refused(
        core.replace_or_update("c", "a", {"$mul": {"n": 1e300}, "$inc": {"other": 1}})
    )
    assert "$mul" in err.message
    await refused(core.replace_or_update("c", "a", {"$inc": {"n": 1.7976931348623157e308}}))
    await refused(core.replace_or_update("c", "a", {"$mul": {"n": -1e10}}))
    after = await core.get("c", "a")
    assert after.version == 2 and doc(after)["n"] == 2e300 and doc(after)["other"] == 1
    got = await core.get("c", "a", fields="n")  # a projection decodes the stored document
    assert doc(got)["n"] == 2e300


async def test_integer_results_must_fit_signed_64_bit(core: Core) -> None:
    await core.create("c", {"_id": "i", "hi": INT64_MAX - 1, "lo": INT64_MIN + 1, "m": 2**62})
    got = doc(await core.replace_or_update("c", "i", {"$inc": {"hi": 1, "lo": -1}}))
    assert got["hi"] == INT64_MAX and got["lo"] == INT64_MIN
    for bad in (
        {"$inc": {"hi": 1}},
        {"$inc": {"lo": -1}},
        {"$mul": {"m": 2}},
        {"$mul": {"m": -4}},
        {"$inc": {"hi": 1}, "$set": {"x": 1}},
    ):
        err = await refused(core.replace_or_update("c", "i", bad))
        assert "signed 64 bits" in err.message, err.message
    assert doc(await core.get("c", "i")) == {**got, "_version": 2}
    # upsert: the insert branch and the update branch are both checked
    await refused(core.replace_or_update("c", "i", {"$inc": {"hi": 1}}, upsert=True))
    await core.replace_or_update("c", "new", {"$inc": {"hi": INT64_MAX}}, upsert=True)
    await refused(core.replace_or_update("c", "new", {"$inc": {"hi": 1}}, upsert=True))
    assert doc(await core.get("c", "new"))["hi"] == INT64_MAX


async def test_mixed_and_float_results_in_range_are_kept(core: Core) -> None:
    await core.create("c", {"_id": "f", "i": 3, "x": 1.5, "big": 1e300, "hi": INT64_MAX})
    got = doc(
        await core.replace_or_update(
            "c", "f", {"$mul": {"i": 1.5, "big": 100.0}, "$inc": {"x": 1, "hi": 0.5}}
        )
    )
    assert got["i"] == 4.5 and got["x"] == 2.5 and got["big"] == pytest.approx(1e302)
    assert got["hi"] == pytest.approx(9.223372036854776e18)  # int + float is a float


# ---- inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [2**63, 2**64, 2**70, -(2**63) - 1, math.inf, -math.inf, math.nan])
async def test_out_of_range_inputs_are_refused_and_nothing_written(core: Core, bad: Any) -> None:
    await refused(core.create("c", {"_id": "x", "n": bad}))
    await refused(core.create("c", {"_id": "x", "deep": {"a": [1, {"n": bad}]}}))
    assert await core.backend().get("c", "x") is None
    bulk = await core.create("c", [{"_id": "ok", "n": 1}, {"_id": "bad", "n": bad}])
    assert isinstance(bulk, list) and all(isinstance(r, ItemResult) for r in bulk)
    assert [r.status for r in bulk] == [201, 400]
    assert bulk[1].error is not None and bulk[1].error["code"] == "number_out_of_range"
    for change in (
        core.replace_or_update("c", "ok", {"n": bad}),  # replace
        core.replace_or_update("c", "ok", {"$set": {"n": bad}}),
        core.replace_or_update("c", "ok", {"$push": {"arr": bad}}),
        core.replace_or_update("c", "zz", {"n": bad}, upsert=True),
        core.merge_patch("c", "ok", {"n": bad}),
    ):
        await refused(change)
    if bad == bad:  # NaN has its own error in $min/$max and filters (invalid_query)
        await refused(core.replace_or_update("c", "ok", {"$max": {"n": bad}}))
        await refused(core.count("c", {"n": bad}))
    got = await core.get("c", "ok")
    assert doc(got) == {"_id": "ok", "n": 1, "_version": 1}
    assert await core.count("c", None) == 1


# ---- stored data outside the range --------------------------------------------------------

LEGACY = (
    '{"_id": "L", "_version": 1, "user_id": "u", "display_name": "legacy", "secret": 1, '
    '"settings": {"inf": 2e308, "neg": -1e999, "u64": 9223372036854775808, '
    '"huge": 123456789012345678901234567890, "ok": 5}}'
)


async def test_stored_out_of_range_numbers_stay_readable(core: Core, pg_dsn: str) -> None:
    await core.create("profile_x", {"_id": "L", "user_id": "u"})
    await core.create("profile_x", {"_id": "N", "user_id": "n", "settings": {"inf": 1, "ok": 6}})
    await store_raw(core, pg_dsn, "profile_x", "L", LEGACY)
    raw = (await core.get("profile_x", "L")).body  # the stored JSON text, untouched
    stored = loose(raw)["settings"]
    assert stored["inf"] == math.inf and stored["neg"] == -math.inf and stored["u64"] == 2**63

    # fields= by id, in a list, in a query
    got = await core.get("profile_x", "L", fields="settings,display_name")
    assert loose(got.body) == {
        "_id": "L",
        "_version": 1,
        "display_name": "legacy",
        "settings": stored,
    }
    for fields in (["settings"], ["settings.inf", "settings.huge"]):
        spec = core.find_spec({"fields": fields, "sort": {"_id": 1}}, from_url=False)
        page = await core.find("profile_x", spec)
        first = loose(page.items[0])
        assert first["_id"] == "L"
        assert all(first["settings"][k] == stored[k] for k in first["settings"])

    # sorted by the out-of-range value, one per page: every document exactly once
    for direction in (1, -1):
        seen, nxt = [], None
        for _ in range(4):
            spec = core.find_spec(
                {"sort": {"settings.inf": direction}, "limit": 1, "next": nxt}, from_url=False
            )
            page = await core.find("profile_x", spec)
            seen += [loose(b)["_id"] for b in page.items]
            nxt = page.next
            if nxt is None:
                break
        assert seen == (["N", "L"] if direction == 1 else ["L", "N"])

    # count and filters over it
    assert await core.count("profile_x", {"settings.inf": {"$gt": 1e300}}) == 1
    assert await core.count("profile_x", None) == 2

    # a service with field rules: by id, list, and its own writes' answers
    policies = load_policies(POLICIES)
    core.gate = Gatekeeper(policies)
    policy = policies.get("users")
    assert policy is not None
    who = Caller("users", policy, {})
    seen_by_service = loose((await core.get("profile_x", "L", caller=who)).body)
    assert "secret" not in seen_by_service and seen_by_service["settings"] == stored
    spec = core.find_spec({"sort": {"_id": 1}}, from_url=False)
    items = (await core.find("profile_x", spec, caller=who)).items
    assert loose(items[0])["settings"] == stored and "secret" not in loose(items[0])
    spec = core.find_spec({"fields": ["settings"], "sort": {"_id": 1}}, from_url=False)
    items = (await core.find("profile_x", spec, caller=who)).items
    assert loose(items[0])["settings"] == stored
    written = await core.replace_or_update(
        "profile_x", "L", {"$set": {"display_name": "renamed"}}, caller=who
    )
    assert loose(written.body)["settings"] == stored and "secret" not in loose(written.body)
    # arithmetic cannot carry it on, and nothing else changed
    await refused(core.replace_or_update("profile_x", "L", {"$inc": {"settings.inf": 1}}))
    await refused(core.replace_or_update("profile_x", "L", {"$mul": {"settings.neg": 1}}))
    assert (await core.get("profile_x", "L")).version == 2


async def test_batches_read_stored_out_of_range_numbers_and_cannot_copy_them(
    core: Core, pg_dsn: str
) -> None:
    await core.create("c", {"_id": "L", "v": 1})
    await store_raw(core, pg_dsn, "c", "L", '{"_id": "L", "_version": 1, "v": 1e999, "w": 7}')
    results = await core.run_batch(
        {
            "operations": [
                {"op": "get", "collection": "c", "id": "L"},
                {"op": "get", "collection": "c", "id": "L", "fields": "v"},
                {"op": "count", "collection": "c"},
            ]
        }
    )
    assert [r["status"] for r in results] == [200, 200, 200]
    assert loose(orjson.dumps(results[1]["document"]))["v"] == math.inf
    copy = {
        "operations": [
            {"op": "get", "collection": "c", "id": "L"},
            {"op": "create", "collection": "c", "document": {"_id": "C", "v": {"$ref": [0, "v"]}}},
        ]
    }
    await refused(core.run_batch(copy))
    assert await core.backend().get("c", "C") is None
