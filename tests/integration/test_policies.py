"""Policies enforced by the pipeline against the real database: the permission table of the
example policies, row rules, field rules (no filter oracle), rate limits, audit trail."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.config import Limits
from proxy.errors import Forbidden, NotFound, RateLimited
from proxy.pipeline.core import Core
from proxy.pipeline.gate import OPEN, Caller, Gatekeeper
from proxy.policy import PolicySet, load_policies
from tests.backends import KINDS, open_core

pytestmark = pytest.mark.integration
POLICIES = Path(__file__).resolve().parents[2] / "policies"
OPS = ("read", "list", "count", "create", "update", "delete")
COLLECTIONS = ("invoices", "payments_eu", "users", "events_web", "sessions", "profile_x", "other")
ALL = set(OPS)

# written out by hand from policies/*.yaml: (service, collection) -> allowed operations
EXPECTED: dict[tuple[str, str], set[str]] = {
    ("billing", "invoices"): ALL,
    ("billing", "payments_eu"): ALL,
    ("billing", "users"): {"read", "list"},
    ("users", "users"): ALL,
    ("users", "sessions"): ALL,
    ("users", "profile_x"): {"read", "list", "create", "update", "delete"},
    ("analytics", "events_web"): {"read", "list", "count"},
    ("analytics", "invoices"): {"list", "count"},
    ("analytics", "payments_eu"): {"list", "count"},
    ("analytics", "users"): {"count"},
    **{("admin", c): {"count"} for c in COLLECTIONS},
    ("admin", "users"): {"read", "list", "count"},
}
HEADERS = {"X-Tenant-Id": "t1"}
# a document each service may write into each collection (row and field rules respected)
DOCS = {
    "invoices": {"tenant_id": "t1", "amount": 5},
    "payments_eu": {"region": "eu", "amount": 5},
    "users": {"tenant_id": "t1", "name": "ann"},
    "events_web": {"environment": "production", "kind": "click"},
    "sessions": {"user": "u"},
    "profile_x": {"user_id": "u", "display_name": "A"},
    "other": {"x": 1},
}
UPDATES = {
    "invoices": {"$set": {"amount": 6}},
    "payments_eu": {"$set": {"amount": 6}},
    "users": {"$set": {"name": "bo"}},
    "sessions": {"$set": {"user": "v"}},
    "profile_x": {"$set": {"display_name": "B"}},
}


def fast_clock() -> Any:
    """A clock that jumps an hour per reading: rate limits never interfere with this table."""
    counter = itertools.count()
    return lambda: next(counter) * 3600.0


@pytest.fixture(scope="module")
def policies() -> PolicySet:
    return load_policies(POLICIES)


@pytest.fixture(params=KINDS)
async def core(
    request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Path, policies: PolicySet
) -> AsyncIterator[Core]:
    async with open_core(request.param, pg_dsn, Limits(), str(tmp_path)) as c:
        c.gate = Gatekeeper(policies, clock=fast_clock())
        yield c


def caller(policies: PolicySet, service: str, headers: dict[str, str] | None = None) -> Caller:
    policy = policies.get(service)
    assert policy is not None
    return Caller(service, policy, headers if headers is not None else HEADERS)


async def attempt(core: Core, who: Caller, coll: str, op: str, doc_id: str) -> str:
    """Run one operation; 'allowed', 'denied' (permission_denied) or another outcome."""
    try:
        if op == "read":
            await core.get(coll, doc_id, caller=who)
        elif op == "list":
            await core.find(coll, core.find_spec({}, from_url=False), caller=who)
        elif op == "count":
            await core.count(coll, None, caller=who)
        elif op == "create":
            await core.create(coll, dict(DOCS[coll]), caller=who)
        elif op == "update":
            await core.replace_or_update(
                coll, doc_id, UPDATES.get(coll, {"$set": {"x": 2}}), caller=who
            )
        elif op == "delete":
            await core.delete(coll, doc_id, caller=who)
    except Forbidden as err:
        return "denied" if err.code == "permission_denied" else err.code
    return "allowed"


async def test_permission_table_of_the_example_policies(core: Core, policies: PolicySet) -> None:
    mismatches = []
    for service in ("billing", "users", "analytics", "admin"):
        who = caller(policies, service)
        for coll in COLLECTIONS:
            for op in OPS:
                doc_id = f"{service}-{coll}-{op}"
                await core.create(coll, {"_id": doc_id, **DOCS[coll]})  # open mode seeds it
                outcome = await attempt(core, who, coll, op, doc_id)
                want = "allowed" if op in EXPECTED.get((service, coll), set()) else "denied"
                if outcome != want:
                    mismatches.append((service, coll, op, outcome, want))
    assert mismatches == []


async def test_batch_with_one_forbidden_operation_is_refused_whole(
    core: Core, policies: PolicySet
) -> None:
    billing = caller(policies, "billing")
    with pytest.raises(Forbidden) as info:
        await core.run_batch(
            {
                "operations": [
                    {"op": "create", "collection": "invoices", "document": DOCS["invoices"]},
                    {"op": "create", "collection": "sessions", "document": {"user": "x"}},
                ]
            },
            billing,
        )
    assert info.value.details["operation"] == 1
    assert await core.count("invoices", None) == 0
    with pytest.raises(Forbidden):  # bulk create with one row outside the tenant
        await core.create(
            "invoices", [DOCS["invoices"], {"tenant_id": "t2", "amount": 1}], caller=billing
        )
    assert await core.count("invoices", None) == 0


async def test_row_rules_scope_every_read_and_write(core: Core, policies: PolicySet) -> None:
    await core.create(
        "invoices",
        [
            {"_id": "mine", "tenant_id": "t1", "amount": 1},
            {"_id": "theirs", "tenant_id": "t2", "amount": 2},
        ],
    )
    t1 = caller(policies, "billing")
    assert await core.count("invoices", None, caller=t1) == 1
    page = await core.find("invoices", core.find_spec({}, from_url=False), caller=t1)
    assert [orjson.loads(b)["_id"] for b in page.items] == ["mine"]
    with pytest.raises(NotFound):
        await core.get("invoices", "theirs", caller=t1)
    with pytest.raises(NotFound):
        await core.replace_or_update("invoices", "theirs", {"$set": {"amount": 0}}, caller=t1)
    with pytest.raises(NotFound):
        await core.delete("invoices", "theirs", caller=t1)
    with pytest.raises(Forbidden) as info:
        await core.create("invoices", {"tenant_id": "t2", "amount": 3}, caller=t1)
    assert info.value.code == "row_rule_violation"
    with pytest.raises(Forbidden):
        await core.replace_or_update("invoices", "mine", {"$set": {"tenant_id": "t2"}}, caller=t1)
    with pytest.raises(Forbidden):
        await core.merge_patch("invoices", "mine", {"tenant_id": None}, caller=t1)
    with pytest.raises(Forbidden) as info:
        await core.count("invoices", None, caller=caller(policies, "billing", {}))
    assert info.value.code == "missing_row_header"
    # the other tenant's document is untouched
    assert orjson.loads((await core.get("invoices", "theirs")).body)["amount"] == 2


async def test_hidden_field_is_no_oracle(core: Core, policies: PolicySet) -> None:
    await core.create(
        "users",
        [
            {"_id": f"u{i}", "tenant_id": "t1", "name": f"n{i}", "password_hash": f"h{i}"}
            for i in range(5)
        ],
    )
    billing = caller(policies, "billing")
    probes: list[dict[str, Any]] = [
        {"filter": {"password_hash": {"$gt": "h2"}}},
        {"filter": {"password_hash": {"$regex": "^h"}}},
        {"filter": {"$or": [{"name": "n1"}, {"password_hash": "h1"}]}},
        {"filter": {"password_hash": {"$exists": True}}},
        {"filter": {"name": {"$ne": None}, "address.city": "x"}},
        {"sort": "password_hash"},
        {"sort": {"name": 1, "password_hash": -1}},
        {"fields": "password_hash"},
    ]
    for probe in probes:
        with pytest.raises(Forbidden) as info:
            await core.find("users", core.find_spec(probe, from_url=False), caller=billing)
        assert info.value.code == "field_not_readable", probe
    with pytest.raises(Forbidden):
        await core.count("users", {"password_hash": "h1"}, caller=billing)
    # and what it may read comes back without the hidden fields
    got = orjson.loads((await core.get("users", "u1", caller=billing)).body)
    assert got == {"_id": "u1", "_version": 1, "tenant_id": "t1", "name": "n1"}


async def test_field_rules_on_writes(core: Core, policies: PolicySet) -> None:
    billing = caller(policies, "billing")
    with pytest.raises(Forbidden) as info:
        await core.create(
            "invoices", {"tenant_id": "t1", "amount": 1, "discount": 9}, caller=billing
        )
    assert info.value.code == "field_not_writable"
    await core.create("invoices", {"_id": "i", "tenant_id": "t1", "amount": 1}, caller=billing)
    with pytest.raises(Forbidden):
        await core.replace_or_update("invoices", "i", {"$inc": {"discount": 1}}, caller=billing)


async def test_rate_limit_exact_boundaries(core: Core, policies: PolicySet) -> None:
    now = [1000.0]
    policy = policies.get("admin")
    assert policy is not None
    from dataclasses import replace

    from proxy.policy import Limits as PolicyLimits
    from proxy.policy import RateSpec

    per_minute = replace(policy, limits=PolicyLimits(rate=RateSpec(per_second=20 / 60, burst=20)))
    core.gate = Gatekeeper(PolicySet({"admin": per_minute}), clock=lambda: now[0])
    who = Caller("admin", per_minute, {})
    for _ in range(20):
        await core.count("users", None, caller=who)
    for _ in range(5):  # refused calls spend nothing: each waits for the same next token
        with pytest.raises(RateLimited) as info:
            await core.count("users", None, caller=who)
        assert info.value.retry_after == pytest.approx(3.0)
        assert info.value.headers["RateLimit-Remaining"] == "0"
        assert info.value.headers["Retry-After"] == "3"
    now[0] += 3.0
    await core.count("users", None, caller=who)  # one token back after 3 s
    with pytest.raises(RateLimited):
        await core.count("users", None, caller=who)


async def test_every_write_is_audited_in_its_transaction(core: Core, policies: PolicySet) -> None:
    from proxy import context
    from proxy.context import RequestContext

    backend: Any = core.backend()
    token = context.current.set(RequestContext("billing", "req-1"))
    try:
        billing = caller(policies, "billing")
        await core.create("invoices", {"_id": "a", "tenant_id": "t1", "amount": 1}, caller=billing)
        await core.create(
            "invoices",
            [
                {"_id": "b", "tenant_id": "t1", "amount": 1},
                {"_id": "a", "tenant_id": "t1", "amount": 1},
            ],
            caller=billing,
        )
        await core.replace_or_update("invoices", "a", {"$inc": {"amount": 1}}, caller=billing)
        await core.merge_patch("invoices", "a", {"amount": 7}, caller=billing)
        await core.delete("invoices", "b", caller=billing)
        with pytest.raises(NotFound):  # a failed write leaves no audit row
            await core.delete("invoices", "zzz", caller=billing)
        await core.run_batch(
            {
                "operations": [
                    {
                        "op": "create",
                        "collection": "invoices",
                        "document": {"_id": "c", "tenant_id": "t1"},
                    },
                ]
            },
            billing,
        )
        with pytest.raises(Forbidden):  # a batch that fails leaves nothing, audit included
            await core.run_batch(
                {
                    "operations": [
                        {
                            "op": "create",
                            "collection": "invoices",
                            "document": {"_id": "d", "tenant_id": "t1"},
                        },
                        {"op": "create", "collection": "sessions", "document": {}},
                    ]
                },
                billing,
            )
    finally:
        context.current.reset(token)
    rows = await backend.audit_log(service="billing")
    got = [(r["operation"], r["collection"], r["ids"], r["request_id"]) for r in rows]
    assert got == [
        ("create", "invoices", ["a"], "req-1"),
        ("create", "invoices", ["b"], "req-1"),
        ("update", "invoices", ["a"], "req-1"),
        ("patch", "invoices", ["a"], "req-1"),
        ("delete", "invoices", ["b"], "req-1"),
        ("create", "invoices", ["c"], "req-1"),
        ("transaction_commit", "*", [], "req-1"),
    ]
    assert await core.count("invoices", None, caller=OPEN) == 2
