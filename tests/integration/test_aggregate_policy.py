"""Aggregation under the example policies on both backends: the grant, row rules before the
first stage and on every looked-up collection, hidden fields neither named nor returned,
the row cap, the cost-weighted rate limit."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.config import Limits
from proxy.errors import BadRequest, Forbidden, RateLimited
from proxy.pipeline.core import Core
from proxy.pipeline.gate import Caller, Gatekeeper
from proxy.policy import PolicySet, load_policies
from tests.backends import kinds_with, open_core

pytestmark = pytest.mark.integration
POLICIES = Path(__file__).resolve().parents[2] / "policies"

INVOICES = [
    {
        "_id": "i1",
        "tenant_id": "t1",
        "customer_id": "u1",
        "amount": 10,
        "status": "paid",
        "secret_note": "vip",
    },
    {
        "_id": "i2",
        "tenant_id": "t1",
        "customer_id": "u2",
        "amount": 5,
        "status": "open",
        "secret_note": "x",
    },
    {
        "_id": "i3",
        "tenant_id": "t2",
        "customer_id": "u3",
        "amount": 99,
        "status": "paid",
        "secret_note": "y",
    },
]
USERS = [
    {
        "_id": "u1",
        "tenant_id": "t1",
        "name": "ann",
        "password_hash": "h1",
        "address": {"city": "Oslo"},
    },
    {"_id": "u2", "tenant_id": "t1", "name": "bo", "password_hash": "h2"},
    {"_id": "u3", "tenant_id": "t2", "name": "cy", "password_hash": "h3"},
]


def fast_clock() -> Any:
    counter = itertools.count()
    return lambda: next(counter) * 3600.0


@pytest.fixture(scope="module")
def policies() -> PolicySet:
    return load_policies(POLICIES)


@pytest.fixture(params=kinds_with("aggregate"))
async def core(
    request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Path, policies: PolicySet
) -> AsyncIterator[Core]:
    async with open_core(request.param, pg_dsn, Limits(), str(tmp_path)) as c:
        await c.create("invoices", [dict(d) for d in INVOICES])
        await c.create("users", [dict(d) for d in USERS])
        c.gate = Gatekeeper(policies, clock=fast_clock())
        yield c


def who(policies: PolicySet, service: str, tenant: str = "t1") -> Caller:
    policy = policies.get(service)
    assert policy is not None
    return Caller(service, policy, {"X-Tenant-Id": tenant})


async def run(core: Core, caller: Caller, coll: str, pipeline: list[Any]) -> list[Any]:
    result = await core.aggregate(coll, {"pipeline": pipeline}, caller=caller)
    return [orjson.loads(b) for b in result.items]


async def test_row_rules_apply_before_the_first_stage(core: Core, policies: PolicySet) -> None:
    billing = who(policies, "billing")
    got = await run(
        core, billing, "invoices", [{"$group": {"_id": None, "n": {"$sum": "$amount"}}}]
    )
    assert got == [{"_id": None, "n": 15}]  # t2's 99 is not this tenant's
    got = await run(core, who(policies, "billing", "t2"), "invoices", [{"$count": "n"}])
    assert got == [{"n": 1}]


async def test_lookup_applies_the_foreign_rows_and_fields(core: Core, policies: PolicySet) -> None:
    billing = who(policies, "billing")
    pipeline = [
        {
            "$lookup": {
                "from": "users",
                "localField": "customer_id",
                "foreignField": "_id",
                "as": "customer",
            }
        },
        {"$project": {"customer": 1}},
    ]
    got = await run(core, billing, "invoices", pipeline)
    assert [d["_id"] for d in got] == ["i1", "i2"]
    ann = got[0]["customer"][0]
    assert ann["name"] == "ann" and "password_hash" not in ann and "address" not in ann
    # another tenant's user is never joined, even when named
    got = await run(
        core,
        billing,
        "invoices",
        [
            {"$addFields": {"customer_id": "u3"}},
            {
                "$lookup": {
                    "from": "users",
                    "localField": "customer_id",
                    "foreignField": "_id",
                    "as": "c",
                }
            },
            {"$project": {"c": 1}},
        ],
    )
    assert all(d["c"] == [] for d in got)


async def test_lookup_needs_read_and_readable_foreign_field(
    core: Core, policies: PolicySet
) -> None:
    analytics = who(policies, "analytics")
    lookup = {
        "$lookup": {"from": "users", "localField": "tenant_id", "foreignField": "_id", "as": "u"}
    }
    with pytest.raises(Forbidden) as info:
        await run(core, analytics, "invoices", [lookup])  # users: count and aggregate only
    assert info.value.code == "permission_denied"
    billing = who(policies, "billing")
    hidden = {
        "$lookup": {
            "from": "users",
            "localField": "customer_id",
            "foreignField": "password_hash",
            "as": "u",
        }
    }
    with pytest.raises(Forbidden) as info:
        await run(core, billing, "invoices", [hidden])
    assert info.value.code == "field_not_readable"


@pytest.mark.parametrize(
    "pipeline",
    [
        [{"$match": {"customer_id": "u1"}}],
        [{"$group": {"_id": "$customer_id"}}],
        [{"$sort": {"customer_id": 1}}],
        [{"$project": {"x": "$customer_id"}}],
        [{"$addFields": {"x": {"$concat": ["$customer_id", "!"]}}}],
        [{"$unwind": "$customer_id"}],
        [{"$replaceRoot": {"newRoot": {"c": "$$ROOT.customer_id"}}}],
        [{"$facet": {"a": [{"$sortByCount": "$customer_id"}]}}],
        [{"$bucket": {"groupBy": "$customer_id", "boundaries": ["a", "z"]}}],
    ],
)
async def test_naming_a_hidden_field_is_403(
    core: Core, policies: PolicySet, pipeline: list[Any]
) -> None:
    analytics = who(policies, "analytics")  # invoices: customer_id is not readable
    with pytest.raises(Forbidden) as info:
        await run(core, analytics, "invoices", pipeline)
    assert info.value.code == "field_not_readable"
    assert info.value.details["field"] == "customer_id"


async def test_results_never_hold_hidden_fields(core: Core, policies: PolicySet) -> None:
    analytics = who(policies, "analytics")
    for pipeline in (
        [],
        [{"$replaceRoot": {"newRoot": "$$ROOT"}}],
        [{"$group": {"_id": None, "all": {"$push": "$$ROOT"}}}],
        [{"$addFields": {"copy": "$$CURRENT"}}],
    ):
        text = orjson.dumps(await run(core, analytics, "invoices", pipeline)).decode()
        assert "customer_id" not in text and "secret_note" not in text and "vip" not in text
        assert "amount" in text
    # a field defined by the pipeline itself may be named again
    got = await run(
        core,
        analytics,
        "invoices",
        [
            {"$addFields": {"customer_id": "$status"}},
            {"$group": {"_id": "$customer_id", "n": {"$sum": 1}}},
        ],
    )
    assert got == [{"_id": "paid", "n": 2}, {"_id": "open", "n": 1}]


async def test_ungranted_aggregate_is_403(core: Core, policies: PolicySet) -> None:
    with pytest.raises(Forbidden) as info:
        await run(core, who(policies, "admin"), "invoices", [])
    assert info.value.code == "permission_denied"


async def test_output_over_max_rows_is_refused_not_cut(core: Core, policies: PolicySet) -> None:
    await core.create("invoices", [{"tenant_id": "t1", "amount": i} for i in range(600)])
    billing = who(policies, "billing")  # max_rows: 500
    with pytest.raises(BadRequest) as info:
        await run(core, billing, "invoices", [{"$project": {"amount": 1}}])
    assert info.value.code == "result_too_large" and info.value.details["max_rows"] == 500
    got = await run(core, billing, "invoices", [{"$limit": 500}, {"$count": "n"}])
    assert got == [{"n": 500}]


async def test_cost_weighted_rate_limit(core: Core, policies: PolicySet) -> None:
    core.gate = Gatekeeper(policies, clock=lambda: 1000.0)  # time stands still
    billing = who(policies, "billing")  # aggregate: burst 5
    for _ in range(5):
        await run(core, billing, "invoices", [{"$count": "n"}])
    with pytest.raises(RateLimited):
        await run(core, billing, "invoices", [{"$count": "n"}])


async def test_explain_needs_the_monitor_grant(core: Core, policies: PolicySet) -> None:
    body = {"pipeline": [{"$count": "n"}], "explain": True}
    with pytest.raises(Forbidden) as info:  # billing may aggregate invoices, not monitor
        await core.aggregate("invoices", body, caller=who(policies, "billing"))
    assert info.value.details["missing"]["operation"] == "monitor"
    result = await core.aggregate("invoices", body, caller=who(policies, "analytics"))
    assert result.explain is not None and result.explain["plan"]
