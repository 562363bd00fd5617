"""Issue 13, items 1, 4, 5 against both backends: a full replacement keeps protected fields
in the statement itself (PostgreSQL's dbproxy_keep and the embedded store's twin agree with
proxy.ops.keep_protected on random documents), idempotency keys per service, upserts onto
another tenant's id, and the audit log scoped to the collections a caller may read."""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import Limits
from proxy.errors import Conflict, NotFound
from proxy.pipeline.core import Core
from proxy.pipeline.gate import Caller, Gatekeeper
from proxy.policy import FieldRule, Grant, PolicySet, RowRule, ServicePolicy
from proxy.query.spec import AuditScope, Keep, Replace, StoredReply, keep_protected
from tests.backends import KINDS, open_core

pytestmark = pytest.mark.integration
_names = itertools.count()

ALL_OPS = frozenset({"read", "list", "count", "create", "update", "delete", "transaction"})


class Env:
    def __init__(self, runner: asyncio.Runner, core: Core) -> None:
        self.runner = runner
        self.core = core

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)


@pytest.fixture(scope="module", params=KINDS)
def env(request: pytest.FixtureRequest, pg_dsn: str, tmp_path_factory: Any) -> Iterator[Env]:
    runner = asyncio.Runner()
    tmp: Path = tmp_path_factory.mktemp("idem")
    cm = open_core(request.param, pg_dsn, Limits(), str(tmp))
    core = runner.run(cm.__aenter__())
    try:
        yield Env(runner, core)
    finally:
        runner.run(cm.__aexit__(None, None, None))
        runner.close()


KEYS = st.sampled_from(["a", "b", "c", "d", "a.b", "_id"])
LEAVES = st.one_of(st.integers(-5, 5), st.text("xy", max_size=2), st.none(), st.booleans())
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(st.dictionaries(KEYS, inner, max_size=3), st.lists(inner, max_size=2)),
    max_leaves=8,
)
DOCS = st.dictionaries(st.sampled_from(["a", "b", "c", "d", "a.b"]), VALUES, max_size=4)
PATHS = st.lists(st.sampled_from(["a", "b", "c", "_id"]), min_size=1, max_size=3).map(".".join)


@settings(max_examples=80)  # two statements per example, on each backend
@given(stored=DOCS, body=DOCS, listed=st.lists(PATHS, max_size=4))
def test_replacement_keeps_what_keep_protects(
    env: Env, stored: dict[str, Any], body: dict[str, Any], listed: list[str]
) -> None:
    """In the database, by the statement that replaces: the same as the pure function."""
    open_paths = frozenset(listed)
    partial = frozenset(
        ".".join(p.split(".")[:i]) for p in listed for i in range(1, p.count(".") + 1)
    )
    keep = Keep(open_paths, partial - open_paths)
    name = f"k{next(_names)}"
    backend = env.core.backend()
    env.run(backend.insert_one(name, {"_id": "x", **stored}))
    out = env.run(backend.change(name, "x", Replace(body, keep)))
    got = orjson.loads(out.body)
    assert got == {**keep_protected(stored, body, keep), "_id": "x", "_version": 2}
    # an upsert that inserts keeps nothing
    out = env.run(backend.change(name, "new", Replace(body, keep), upsert=True))
    assert orjson.loads(out.body) == {**body, "_id": "new", "_version": 1} and out.created


def _policies() -> PolicySet:
    rule = FieldRule(
        readable=frozenset({"amount", "tenant"}), writable=frozenset({"amount", "tenant"})
    )
    tenant = {"t_*": (RowRule("tenant", header="X-Tenant"),)}
    grants = (Grant(("t_*", "seen_*", "s[!x]_?"), ALL_OPS),)
    return PolicySet(
        {
            "a": ServicePolicy("a", grants, fields={"t_*": rule}, rows=tenant),
            "b": ServicePolicy("b", grants),
        }
    )


@pytest.fixture(params=KINDS)
async def core(request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core(request.param, pg_dsn, Limits(), str(tmp_path)) as c:
        c.gate = Gatekeeper(_policies())
        yield c


def who(core: Core, service: str, tenant: str = "t1") -> Caller:
    policy = core.gate.policies.get(service) if core.gate.policies else None
    return Caller(service, policy, {"X-Tenant": tenant})


async def test_keys_belong_to_their_service(core: Core) -> None:
    produced: list[str] = []

    def producer(tag: str) -> Any:
        async def produce(tx: Any) -> StoredReply:
            produced.append(tag)
            return StoredReply(201, tag.encode(), {})

        return produce

    key = "k-" + uuid.uuid4().hex
    one, replayed = await core.idempotent(key, "r1/p", producer("a"), caller=who(core, "a"))
    two, replayed2 = await core.idempotent(key, "r2/p", producer("b"), caller=who(core, "b"))
    assert (one.body, two.body, replayed, replayed2) == (b"a", b"b", False, False)
    again, replayed3 = await core.idempotent(key, "r1/p", producer("a"), caller=who(core, "a"))
    assert again.body == b"a" and replayed3 and produced == ["a", "b"]
    with pytest.raises(Conflict) as info:
        await core.idempotent(key, "r1/q", producer("a"), caller=who(core, "a"))
    assert info.value.code == "idempotency_policy_changed" and produced == ["a", "b"]


async def test_replace_keeps_fields_in_a_transaction(core: Core) -> None:
    name = f"t_{uuid.uuid4().hex[:8]}"
    await core.create(name, {"_id": "d", "tenant": "t1", "amount": 1, "secret": "s"})
    caller = who(core, "a")

    async def work(tx: Any) -> Any:
        body = {"tenant": "t1", "amount": 2}
        return await core.replace_or_update(name, "d", body, target=tx, caller=caller)

    seen = await core.transact("read_committed", work)
    assert orjson.loads(seen.body) == {"_id": "d", "tenant": "t1", "amount": 2, "_version": 2}
    doc = orjson.loads((await core.get(name, "d")).body)
    assert doc == {"_id": "d", "tenant": "t1", "amount": 2, "secret": "s", "_version": 2}


async def test_upsert_onto_another_tenants_id_is_not_found(core: Core) -> None:
    name = f"seen_{uuid.uuid4().hex[:8]}"
    rows = (RowRule("tenant", header="X-Tenant"),)
    tenant_policy = ServicePolicy("c", (Grant((name,), ALL_OPS),), rows={name: rows})
    caller = Caller("c", tenant_policy, {"X-Tenant": "t1"})
    await core.create(name, {"_id": "theirs", "tenant": "t2"})
    errors = []
    for body, upsert in (
        ({"tenant": "t1"}, False),
        ({"tenant": "t1"}, True),
        ({"$set": {"tenant": "t1", "v": 1}}, True),
    ):
        with pytest.raises(NotFound) as info:
            await core.replace_or_update(name, "theirs", body, upsert=upsert, caller=caller)
        errors.append(info.value.to_dict())
    assert errors[0] == errors[1] == errors[2]
    doc = orjson.loads((await core.get(name, "theirs")).body)
    assert doc == {"_id": "theirs", "tenant": "t2", "_version": 1}


async def test_audit_log_scope(core: Core) -> None:
    tag = uuid.uuid4().hex[:6]
    names = [f"seen_{tag}", f"sa_1{tag}", f"sx_1{tag}", f"sa_12{tag}", f"other_{tag}", "sb_9"]
    for name in names:
        await core.create(name, {"v": 1})

    async def commit(tx: Any) -> None:
        await core.create(names[0], {"v": 2}, target=tx)

    await core.transact("read_committed", commit)
    backend: Any = core.backend()
    everything = await backend.audit_log(limit=1000)
    globs = ("seen_*", "s[!x]_?*")
    scope = AuditScope((names[4],), globs, "anonymous")
    scoped = await backend.audit_log(scope=scope, limit=1000)
    expected = [
        r
        for r in everything
        if r["collection"] == names[4]
        or any(fnmatch.fnmatchcase(r["collection"], g) for g in globs)
        or (r["collection"] == "*" and r["service"] == "anonymous")
    ]
    assert scoped == expected
    assert {r["collection"] for r in scoped} >= {names[0], names[1], names[4], "*"}
    assert names[2] not in {r["collection"] for r in scoped}
    other = AuditScope((), ("seen_*",), "someone-else")
    assert all(r["collection"] != "*" for r in await backend.audit_log(scope=other, limit=1000))
    none = AuditScope((), (), "x")
    assert await backend.audit_log(scope=none, limit=1000) == []
