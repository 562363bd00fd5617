"""The pipeline's one sequence (decide → validate → limit → backend → present), on the
embedded store: which check answers when several would refuse, and what each step keeps
from the next."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from proxy.backends.base import TxKind
from proxy.backends.sqlite import SqliteBackend
from proxy.config import Config, DatabaseConfig, Limits
from proxy.errors import BadRequest, Forbidden, NotFound, RateLimited
from proxy.pipeline.core import Core
from proxy.pipeline.gate import Caller, Gatekeeper
from proxy.policy import FieldRule, Grant, PolicySet, RateSpec, RowRule, ServicePolicy
from proxy.policy import Limits as PolicyLimits
from proxy.policy.decide import Decisions, compile_decision, decisions_for


@pytest.fixture
async def core(tmp_path: Any) -> AsyncIterator[Core]:
    path = os.path.join(tmp_path, "store.sqlite3")
    db = DatabaseConfig(name="main", type="sqlite", connection_string=f"sqlite://{path}")
    backend = SqliteBackend(db, Limits(), path=path)
    await backend.start()
    try:
        yield Core(Config(), {"main": backend}, "main")
    finally:
        await backend.close()


def _policy(ops: set[str], *, burst: int | None = None, **kw: Any) -> ServicePolicy:
    limits = PolicyLimits(rate=RateSpec(per_second=0.001, burst=burst)) if burst else PolicyLimits()
    return ServicePolicy("svc", (Grant(("c",), frozenset(ops)),), limits=limits, **kw)


def _caller(core: Core, policy: ServicePolicy, headers: dict[str, str] | None = None) -> Caller:
    core.gate = Gatekeeper(PolicySet({"svc": policy}), sidecar_service="svc")
    return core.gate.identify(headers or {})


async def test_decide_answers_before_validate(core: Core) -> None:
    """Not granted and invalid: the grant answers (403), the body is never looked at."""
    who = _caller(core, _policy({"read"}))
    with pytest.raises(Forbidden) as info:
        await core.create("c", "not a document", caller=who)
    assert info.value.code == "permission_denied"


async def test_validate_answers_before_limit_and_costs_nothing(core: Core) -> None:
    """Invalid input is refused before the rate limit is charged: with a burst of one, a
    bad request leaves the token for the good one, and only the next is limited."""
    who = _caller(core, _policy({"create", "count"}, burst=1))
    with pytest.raises(BadRequest):
        await core.create("c", {"$bad": 1}, caller=who)
    await core.create("c", {"_id": "a"}, caller=who)
    with pytest.raises(RateLimited):
        await core.create("c", {"_id": "b"}, caller=who)
    assert await core.count("c", None) == 1  # the limited write never reached the store


async def test_transaction_grant_is_part_of_the_decision(core: Core) -> None:
    """Inside a transaction every collection touched needs the transaction grant too."""
    who = _caller(core, _policy({"create"}))

    async def work(tx: Any) -> None:
        await core.create("c", {"_id": "x"}, target=tx, caller=who)

    with pytest.raises(Forbidden) as info:
        await core.transact("read_committed", work, TxKind.BATCH)
    assert info.value.details["missing"] == {"operation": "transaction", "collection": "c"}
    assert await core.count("c", None) == 0


async def test_row_rules_reach_the_backend_and_fields_are_presented(core: Core) -> None:
    """The row guard joins the statement (another tenant's row is simply not found) and
    the answer carries only readable fields."""
    rows = {"c": (RowRule("tenant", header="X-Tenant"),)}
    fields = {"c": FieldRule(readable=frozenset({"tenant", "name"}))}
    policy = _policy({"create", "read", "list"}, rows=rows, fields=fields)
    mine = _caller(core, policy, {"X-Tenant": "t1"})
    made = await core.create(
        "c", {"_id": "m", "tenant": "t1", "name": "n", "secret": 1}, caller=mine
    )
    assert "secret" not in orjson.loads(made.body)  # type: ignore[union-attr]
    await core.create("c", {"_id": "o", "tenant": "t2", "name": "n", "secret": 2})
    with pytest.raises(NotFound):
        await core.get("c", "o", caller=mine)
    seen = orjson.loads((await core.get("c", "m", caller=mine)).body)
    assert seen == {"_id": "m", "_version": 1, "tenant": "t1", "name": "n"}
    page = await core.find("c", core.find_spec({}, from_url=False), caller=mine)
    assert [orjson.loads(b)["_id"] for b in page.items] == ["m"]


def test_decisions_are_compiled_once_per_policy_and_collection() -> None:
    fields = {"c": FieldRule(readable=frozenset({"a"}))}
    policy = ServicePolicy("svc", (Grant(("c", "g_*"), frozenset({"read"})),), fields=fields)
    decisions = decisions_for(policy)
    assert decisions is decisions_for(policy)  # compiled once per policy object
    exact = decisions.get("c", "read")
    assert exact is decisions.get("c", "read")
    assert exact.granted and not exact.plain and exact.readable is not None
    globbed = decisions.get("g_1", "read")
    assert globbed.granted and globbed.plain  # nothing to hide on g_1
    assert not decisions.get("g_1", "create").granted
    assert not decisions.get("other", "read").granted
    open_read = Decisions(None).get("anything", "create")
    assert open_read.granted and open_read.plain and open_read.in_transaction
    assert compile_decision(policy, "c", "read") == exact
