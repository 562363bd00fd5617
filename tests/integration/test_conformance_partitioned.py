"""The conformance suite's partitioned variants (issue 21): CRUD, queries, transactions and
policies through the Core pipeline on PostgreSQL, each case run on plain tables and on
hash, list and range partitioned ones, with the same outcomes required of all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.config import Limits
from proxy.errors import DuplicateId, Forbidden, NotFound, PreconditionFailed, ProxyError
from proxy.pipeline.core import Core
from proxy.pipeline.gate import Caller, Gatekeeper
from proxy.policy import load_policies
from proxy.query.spec import WriteResult
from tests.backends import PARTITIONED, open_partitioned_core

pytestmark = pytest.mark.integration
POLICIES = Path(__file__).resolve().parents[2] / "policies"
COLLECTIONS = ("invoices", "ledger")


@pytest.fixture(params=sorted(PARTITIONED))
async def core(request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Path) -> AsyncIterator[Core]:
    async with open_partitioned_core(
        request.param, COLLECTIONS, pg_dsn, Limits(), str(tmp_path)
    ) as c:
        yield c


def doc(result: WriteResult | bytes) -> dict[str, Any]:
    raw = result.body if isinstance(result, WriteResult) else result
    value: dict[str, Any] = orjson.loads(raw)
    return value


async def seed(core: Core, n: int = 12) -> None:
    docs = [
        {
            "_id": f"i{i:02}",
            "tenant_id": f"t{i % 3 + 1}",
            "amount": i,
            "tags": ["x"] if i % 2 else [],
        }
        for i in range(n)
    ]
    result = await core.create("invoices", docs)
    assert isinstance(result, list) and all(r.status == 201 for r in result), result


async def find_ids(core: Core, raw: dict[str, Any], coll: str = "invoices") -> list[str]:
    spec = core.find_spec({"limit": 1000, **raw}, from_url=False)
    page = await core.find(coll, spec)
    return [doc(b)["_id"] for b in page.items]


async def test_crud(core: Core) -> None:
    made = doc(await core.create("invoices", {"_id": "a", "tenant_id": "t1", "amount": 1}))
    assert made["_version"] == 1
    with pytest.raises(DuplicateId):
        await core.create("invoices", {"_id": "a", "tenant_id": "t2"})
    got = await core.get("invoices", "a", None)
    assert doc(got)["amount"] == 1
    up = await core.replace_or_update("invoices", "a", {"$inc": {"amount": 4}})
    assert doc(up)["amount"] == 5 and up.version == 2
    moved = await core.replace_or_update("invoices", "a", {"$set": {"tenant_id": "t3"}})
    assert doc(moved)["tenant_id"] == "t3" and moved.version == 3
    with pytest.raises(PreconditionFailed):
        await core.replace_or_update("invoices", "a", {"tenant_id": "t2"}, if_match=2)
    put = await core.replace_or_update("invoices", "b", {"tenant_id": "t2"}, upsert=True)
    assert put.created
    assert await core.delete("invoices", "a") == 3
    with pytest.raises(NotFound):
        await core.get("invoices", "a", None)
    if not partitioned_on(core):  # the reference stores a document without the key
        return
    with pytest.raises(ProxyError) as err:
        await core.create("invoices", {"_id": "c", "amount": 1})
    assert err.value.code == "partition_key_missing"


def partitioned_on(core: Core) -> bool:
    return "invoices" in core.backends["main"]._partitioned  # type: ignore[attr-defined]


async def test_queries(core: Core) -> None:
    await seed(core)
    assert await find_ids(core, {"filter": {"tenant_id": "t2"}, "sort": "_id"}) == [
        "i01",
        "i04",
        "i07",
        "i10",
    ]
    assert await find_ids(
        core,
        {"filter": {"tenant_id": {"$in": ["t1", "t3"]}, "amount": {"$gte": 6}}, "sort": "-amount"},
    ) == ["i11", "i09", "i08", "i06"]
    assert await find_ids(
        core, {"filter": {"tenant_id": {"$gt": "t1", "$lte": "t2"}}, "sort": "_id"}
    ) == [
        "i01",
        "i04",
        "i07",
        "i10",
    ]
    assert await find_ids(core, {"filter": {"tags": "x", "tenant_id": "t3"}}) == ["i05", "i11"]
    assert await core.count("invoices", {"tenant_id": "t1"}) == 4
    # pages by cursor across partitions: every document once, in order
    seen: list[str] = []
    raw: dict[str, Any] = {"sort": "-amount", "limit": 5}
    while True:
        page = await core.find("invoices", core.find_spec(raw, from_url=False))
        seen += [doc(b)["_id"] for b in page.items]
        if page.next is None:
            break
        raw = {**raw, "next": page.next}
    assert seen == [f"i{i:02}" for i in range(11, -1, -1)]
    agg = await core.aggregate(
        "invoices",
        {
            "pipeline": [
                {"$group": {"_id": "$tenant_id", "n": {"$sum": "$amount"}}},
                {"$sort": {"_id": 1}},
            ]
        },
    )
    assert [(doc(d)["_id"], doc(d)["n"]) for d in agg.items] == [("t1", 18), ("t2", 22), ("t3", 26)]


async def test_transaction_batch_all_or_nothing(core: Core) -> None:
    await seed(core, 3)
    out = await core.run_batch(
        {
            "operations": [
                {
                    "op": "create",
                    "collection": "ledger",
                    "document": {"_id": "l1", "tenant_id": "t1"},
                },
                {
                    "op": "update",
                    "collection": "invoices",
                    "id": "i00",
                    "update": {"$set": {"tenant_id": "t2"}},
                },
            ]
        }
    )
    assert len(out) == 2
    assert doc(await core.get("invoices", "i00", None))["tenant_id"] == "t2"
    with pytest.raises(ProxyError):
        await core.run_batch(
            {
                "operations": [
                    {
                        "op": "create",
                        "collection": "ledger",
                        "document": {"_id": "l2", "tenant_id": "t1"},
                    },
                    {
                        "op": "create",
                        "collection": "ledger",
                        "document": {"_id": "l1", "tenant_id": "t3"},
                    },
                ]
            }
        )
    assert await find_ids(core, {"sort": "_id"}, "ledger") == ["l1"]  # nothing of the second


async def test_policy_row_rules(core: Core) -> None:
    await seed(core)
    policies = load_policies(POLICIES)
    core.gate = Gatekeeper(policies, clock=lambda: 0.0)
    policy = policies.get("billing")
    assert policy is not None
    t2 = Caller("billing", policy, {"X-Tenant-Id": "t2"})
    spec = core.find_spec({"sort": "_id", "limit": 100}, from_url=False)
    page = await core.find("invoices", spec, caller=t2)
    assert [doc(b)["_id"] for b in page.items] == ["i01", "i04", "i07", "i10"]
    assert await core.count("invoices", None, caller=t2) == 4
    with pytest.raises(NotFound):  # another tenant's document: as if missing
        await core.get("invoices", "i00", None, caller=t2)
    with pytest.raises(Forbidden):
        await core.create("invoices", {"tenant_id": "t1", "amount": 1}, caller=t2)
    made = doc(await core.create("invoices", {"tenant_id": "t2", "amount": 1}, caller=t2))
    assert made["tenant_id"] == "t2"
