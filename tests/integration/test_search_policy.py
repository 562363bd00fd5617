"""Search under a policy on every backend: the ``search`` grant per collection (named and
ungranted: 403; implicit: left out), row rules inside the search, and hidden fields never
searched, ranked on, highlighted or returned — search is no oracle for what a caller may
not read. Also the rate limit's cost."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Limits
from proxy.errors import Forbidden, ProxyError, RateLimited
from proxy.migrate.ops import parse_migration
from proxy.migrate.runner import MigrationRunner
from proxy.pipeline.core import Core
from proxy.pipeline.gate import Caller, Gatekeeper
from proxy.policy import PolicySet, load_policies
from tests.backends import kinds_with, open_core

pytestmark = pytest.mark.integration
_ids = itertools.count()

POLICY = """
service: finder
identity:
  tokens: ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]
grants:
  - collections: [notes, loose, "docs_*"]
    operations: [search, read]
  - collections: [secrets]
    operations: [read]
fields:
  notes:
    readable: [_id, title, tenant]
  loose:
    readable: [_id, public, tenant]
rows:
  notes:
    tenant: {header: X-Tenant-Id}
  loose:
    tenant: {header: X-Tenant-Id}
"""
LIMITS = """
limits:
  rate: {per_second: 0.001, burst: 12}
  costs: {search: 5}
"""

NOTES = [
    {"_id": "n1", "tenant": "t1", "title": "apple pie", "secret": "walnut"},
    {"_id": "n2", "tenant": "t1", "title": "banana", "secret": "apple"},
    {"_id": "n3", "tenant": "t2", "title": "apple tart", "secret": "walnut"},
]
LOOSE = [
    {"_id": "l1", "tenant": "t1", "public": "cherry", "private": {"pin": "walnut cherry"}},
    {"_id": "l2", "tenant": "t1", "public": "plum", "private": {"pin": "cherry"}},
]


@pytest.fixture(params=kinds_with("search"))
async def env(
    request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Path
) -> AsyncIterator[tuple[Core, PolicySet]]:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "finder.yaml").write_text(POLICY)
    policies = load_policies(tmp_path / "policies")
    async with open_core(request.param, pg_dsn, Limits(), str(tmp_path)) as c:
        await c.create("notes", [dict(d) for d in NOTES])
        await c.create("loose", [dict(d) for d in LOOSE])
        await c.create("secrets", {"_id": "s1", "text": "apple walnut cherry"})
        await c.create("docs_a", {"_id": "d1", "text": "apple"})
        runner = MigrationRunner({"main": c.backend().migrations()}, "main")
        fields = {"title": "A", "secret": "B"}
        raw = {
            "id": f"s{next(_ids)}",
            "version": 1,
            "script": {
                "operations": [
                    {"op": "set_search", "collection": "notes", "search": {"fields": fields}}
                ]
            },
        }
        await runner.submit(parse_migration(raw))
        await c.refresh_schemas()
        c.gate = Gatekeeper(policies)
        yield c, policies


def finder(policies: PolicySet, tenant: str = "t1") -> Caller:
    policy = policies.get("finder")
    assert policy is not None
    return Caller("finder", policy, {"X-Tenant-Id": tenant})


async def search(core: Core, caller: Caller, q: str, **body: Any) -> dict[str, Any]:
    return await core.search({"q": q, **body}, caller)


def hits(answer: dict[str, Any]) -> list[tuple[str, str]]:
    return [(i["collection"], i["_id"]) for i in answer["items"]]


async def test_named_ungranted_is_403_implicit_leaves_it_out(
    env: tuple[Core, PolicySet],
) -> None:
    core, policies = env
    me = finder(policies)
    with pytest.raises(Forbidden):
        await search(core, me, "apple", collections=["secrets"])
    with pytest.raises(Forbidden):
        await search(core, me, "apple", collections=["notes", "secrets"])
    got = await search(core, me, "apple")  # every granted collection; secrets left out
    assert {c for c, _ in hits(got)} == {"notes", "docs_a"}


async def test_row_rules_apply(env: tuple[Core, PolicySet]) -> None:
    core, policies = env
    got = await search(core, finder(policies, "t2"), "apple", collections=["notes"])
    assert hits(got) == [("notes", "n3")]
    got = await search(core, finder(policies), "apple tart", collections=["notes"])
    assert hits(got) == []  # t2's tart is not t1's
    got = await search(core, finder(policies), "apple", collections=["notes"], total=True)
    assert got["total"] == 1


async def test_a_hidden_declared_field_is_never_searched(env: tuple[Core, PolicySet]) -> None:
    core, policies = env
    me = finder(policies)
    # "walnut" is only in the hidden field: no hit, no count, no score
    got = await search(core, me, "walnut", collections=["notes"], total=True)
    assert got == {"items": [], "next": None, "total": 0}
    got = await search(core, me, "apple", collections=["notes"])
    assert hits(got) == [("notes", "n1")]  # n2's apple is in its hidden field
    item = got["items"][0]
    assert "secret" not in item["document"]
    assert set(item["highlights"]) == {"title"}
    # excluding a hidden word changes nothing either
    got = await search(core, me, "apple -walnut", collections=["notes"])
    assert hits(got) == [("notes", "n1")]
    # the same with a caller who may read everything: the hidden field counts
    open_core_hits = await core.search({"q": "walnut", "collections": ["notes"]})
    assert hits(open_core_hits) == [("notes", "n1"), ("notes", "n3")]


async def test_hidden_fields_of_undeclared_collections(env: tuple[Core, PolicySet]) -> None:
    core, policies = env
    me = finder(policies)
    assert hits(await search(core, me, "walnut", collections=["loose"])) == []
    got = await search(core, me, "cherry", collections=["loose"])
    assert hits(got) == [("loose", "l1")]  # l2's cherry is in its hidden field
    assert got["items"][0]["highlights"] == {"public": "<mark>cherry</mark>"}
    assert "private" not in got["items"][0]["document"]


async def test_a_filter_on_a_hidden_field_is_refused(env: tuple[Core, PolicySet]) -> None:
    core, policies = env
    with pytest.raises(Forbidden) as info:
        await search(core, finder(policies), "apple", collections=["notes"], filter={"secret": 1})
    assert info.value.code == "field_not_readable"
    with pytest.raises(Forbidden):
        await search(core, finder(policies), "apple", collections=["notes"], fields=["secret"])


async def test_the_search_cost_is_charged(env: tuple[Core, PolicySet], tmp_path: Path) -> None:
    core, _ = env
    (tmp_path / "metered").mkdir()
    (tmp_path / "metered" / "finder.yaml").write_text(POLICY + LIMITS)
    policies = load_policies(tmp_path / "metered")
    core.gate = Gatekeeper(policies)
    me = finder(policies)
    await search(core, me, "apple", collections=["notes"])
    await search(core, me, "apple", collections=["notes"])
    with pytest.raises(RateLimited):  # burst 12, each search costs 5
        await search(core, me, "apple", collections=["notes"])
    with pytest.raises(ProxyError) as info:  # bad input costs nothing, and says why
        await search(core, me, "", collections=["notes"])
    assert info.value.code == "empty_query"
