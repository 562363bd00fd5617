"""Transactions through the Core: all-or-nothing batches (checked against a model),
interactive transactions, timeouts, caps, idempotency keys, and optimistic concurrency."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import Limits
from proxy.errors import BadRequest, Conflict, NotFound, ProxyError, Unavailable, Unprocessable
from proxy.pipeline.core import Core
from proxy.pipeline.gate import Caller
from proxy.query.spec import StoredReply
from tests.backends import KINDS, open_core

pytestmark = pytest.mark.integration
IDS = ("a", "b", "c", "d")
_names = itertools.count()


# ---- all or nothing, against a model -----------------------------------------------------

ops_strategy = st.lists(
    st.one_of(
        st.builds(
            lambda i, v: {"op": "create", "document": {"_id": i, "v": v, "s": "x"}},
            st.sampled_from(IDS),
            st.integers(0, 9),
        ),
        st.builds(
            lambda i, v: {"op": "update", "id": i, "update": {"$inc": {"v": v}}},
            st.sampled_from(IDS),
            st.integers(1, 3),
        ),
        st.builds(lambda i: {"op": "delete", "id": i}, st.sampled_from(IDS)),
        st.builds(
            lambda i, v: {"op": "replace", "id": i, "document": {"v": v, "s": "y"}},
            st.sampled_from(IDS),
            st.integers(0, 9),
        ),
        st.builds(
            lambda i: {"op": "update", "id": i, "update": {"$inc": {"s": 1}}}, st.sampled_from(IDS)
        ),  # a type error wherever the document exists
    ),
    min_size=1,
    max_size=8,
)


def model(state: dict[str, dict[str, Any]], ops: list[dict[str, Any]]) -> int | None:
    """Apply ops to ``state`` in place; the index of the first failing op, or None."""
    for i, op in enumerate(ops):
        name = op["op"]
        doc_id = op.get("id") or op["document"]["_id"]
        if name == "create":
            if doc_id in state:
                return i
            state[doc_id] = {"v": op["document"]["v"], "s": "x"}
            continue
        if doc_id not in state:
            return i
        if name == "delete":
            del state[doc_id]
        elif name == "replace":
            state[doc_id] = dict(op["document"])
        elif "s" in op["update"]["$inc"]:
            return i
        else:
            state[doc_id]["v"] += op["update"]["$inc"]["v"]
    return None


class Env:
    def __init__(self, runner: asyncio.Runner, core: Core) -> None:
        self.runner, self.core = runner, core

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def state(self, coll: str) -> dict[str, dict[str, Any]]:
        page = self.run(self.core.find(coll, self.core.find_spec({"limit": 100}, from_url=False)))
        out = {}
        for raw in page.items:
            d = orjson.loads(raw)
            out[d["_id"]] = {k: v for k, v in d.items() if k not in ("_id", "_version")}
        return out


@pytest.fixture(scope="module", params=KINDS)
def env(request: pytest.FixtureRequest, pg_dsn: str, tmp_path_factory: Any) -> Iterator[Env]:
    runner = asyncio.Runner()
    tmp: Path = tmp_path_factory.mktemp("tx")
    cm = open_core(request.param, pg_dsn, Limits(), str(tmp))
    core = runner.run(cm.__aenter__())
    try:
        yield Env(runner, core)
    finally:
        runner.run(cm.__aexit__(None, None, None))
        runner.close()


@given(ops=ops_strategy, isolation=st.sampled_from(["read_committed", "serializable"]))
def test_batch_is_all_or_nothing(env: Env, ops: list[dict[str, Any]], isolation: str) -> None:
    coll = f"m{next(_names)}"
    env.run(env.core.create(coll, [{"_id": "a", "v": 1, "s": "x"}, {"_id": "b", "v": 2, "s": "x"}]))
    before = env.state(coll)
    expected = {k: dict(v) for k, v in before.items()}
    failing = model(expected, ops)
    body = {"operations": [{**op, "collection": coll} for op in ops], "isolation": isolation}
    if failing is None:
        results = env.run(env.core.run_batch(body))
        assert len(results) == len(ops)
        assert env.state(coll) == expected
    else:
        with pytest.raises(ProxyError) as info:
            env.run(env.core.run_batch(body))
        assert info.value.details["operation"] == failing
        assert env.state(coll) == before  # nothing of the batch was kept


# ---- async tests on a fresh core ---------------------------------------------------------


@pytest.fixture(params=KINDS)
async def core(request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Path) -> AsyncIterator[Core]:
    limits = Limits(
        transaction_idle_timeout_seconds=0.3,
        transaction_max_lifetime_seconds=1.0,
        max_open_transactions=3,
    )
    async with open_core(request.param, pg_dsn, limits, str(tmp_path)) as c:
        yield c
        await c.transactions.close_all()


async def test_batch_references_and_results(core: Core) -> None:
    results = await core.run_batch(
        {
            "operations": [
                {"op": "create", "collection": "orders", "document": {"total": 10}},
                {
                    "op": "create",
                    "collection": "lines",
                    "document": {"order": {"$ref": 0}, "qty": 2},
                },
                {
                    "op": "update",
                    "collection": "orders",
                    "id": {"$ref": 0},
                    "update": {"$set": {"first_line": {"$ref": [1, "_id"]}}},
                },
                {"op": "query", "collection": "lines", "filter": {"order": {"$ref": 0}}},
                {"op": "count", "collection": "orders"},
                {"op": "get", "collection": "orders", "id": {"$ref": 0}, "fields": "total"},
            ]
        }
    )
    dumped = orjson.loads(orjson.dumps(results))
    order_id = dumped[0]["document"]["_id"]
    assert dumped[0]["status"] == 201
    assert dumped[1]["document"]["order"] == order_id
    assert dumped[2]["document"]["first_line"] == dumped[1]["document"]["_id"]
    assert [d["qty"] for d in dumped[3]["items"]] == [2]
    assert dumped[4]["count"] == 1
    assert dumped[5]["document"] == {"_id": order_id, "_version": 2, "total": 10}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"operations": []}, "invalid_transaction"),
        ({"operations": [{"op": "drop", "collection": "x"}]}, "invalid_operation"),
        ({"operations": [{"op": "get", "collection": "x"}]}, "invalid_operation"),
        (
            {"operations": [{"op": "get", "collection": "x", "id": "1", "zap": 1}]},
            "invalid_operation",
        ),
        (
            {"operations": [{"op": "count", "collection": "x"}], "isolation": "chaos"},
            "invalid_isolation",
        ),
        (
            {"operations": [{"op": "get", "collection": "x", "id": {"$ref": 0}}]},
            "invalid_reference",
        ),
        ({"operations": [{"op": "count", "collection": "x"}] * 101}, "too_many_operations"),
    ],
)
async def test_bad_batches_are_400(core: Core, body: dict[str, Any], code: str) -> None:
    with pytest.raises(BadRequest) as info:
        await core.run_batch(body)
    assert info.value.code == code


async def test_interactive_commit_and_rollback(core: Core) -> None:
    tx_id = await core.begin(Caller("svc"))
    async with core.transactions.use(tx_id, "svc") as tx:
        await core.create("c", {"_id": "x", "n": 1}, tx)
    # not visible outside before commit
    with pytest.raises(NotFound):
        await core.get("c", "x")
    await core.transactions.commit(tx_id, "svc")
    assert (await core.get("c", "x")).version == 1
    with pytest.raises(Conflict) as info:
        await core.transactions.commit(tx_id, "svc")
    assert info.value.code == "transaction_closed"

    tx_id = await core.begin(Caller("svc"))
    async with core.transactions.use(tx_id, "svc") as tx:
        await core.replace_or_update("c", "x", {"$inc": {"n": 5}}, target=tx)
    await core.transactions.rollback(tx_id, "svc")
    assert orjson.loads((await core.get("c", "x")).body)["n"] == 1


async def test_transaction_is_bound_to_its_owner(core: Core) -> None:
    tx_id = await core.begin(Caller("billing"))
    with pytest.raises(NotFound) as info:
        async with core.transactions.use(tx_id, "analytics"):
            pass
    assert info.value.code == "transaction_not_found"
    with pytest.raises(NotFound):
        await core.transactions.commit("made-up-id", "billing")
    await core.transactions.rollback(tx_id, "billing")


async def test_open_transaction_cap_is_503(core: Core) -> None:
    ids = [await core.begin(Caller("svc")) for _ in range(3)]
    with pytest.raises(Unavailable) as info:
        await core.begin(Caller("svc"))
    assert info.value.code == "too_many_transactions" and info.value.retry_after
    for tx_id in ids:
        await core.transactions.rollback(tx_id, "svc")
    await core.transactions.rollback(await core.begin(Caller("svc")), "svc")


async def test_failed_statement_aborts_the_transaction(core: Core) -> None:
    await core.create("c", {"_id": "s", "v": "text"})
    tx_id = await core.begin(Caller("svc"))
    with pytest.raises(BadRequest):
        async with core.transactions.use(tx_id, "svc") as tx:
            await core.replace_or_update("c", "s", {"$inc": {"v": 1}}, target=tx)
    with pytest.raises(Conflict) as info:
        await core.transactions.commit(tx_id, "svc")
    assert info.value.code == "transaction_closed"
    assert len(core.transactions) == 0


async def test_idempotency_key_replays_and_detects_reuse(core: Core) -> None:
    calls = 0

    async def produce(tx: Any) -> StoredReply:
        nonlocal calls
        calls += 1
        result = await core.create("c", {"n": calls}, tx)
        return StoredReply(201, result.body, {"ETag": '"1"'})

    first, replayed = await core.idempotent("k-1", "fp", produce)
    again, replayed2 = await core.idempotent("k-1", "fp", produce)
    assert not replayed and replayed2 and first == again and calls == 1
    assert await core.count("c", None) == 1
    with pytest.raises(Unprocessable) as info:
        await core.idempotent("k-1", "other-body", produce)
    assert info.value.code == "idempotency_key_reused"
    # concurrent duplicates: one runs, the others wait and get its reply
    replies = await asyncio.gather(*(core.idempotent("k-2", "fp", produce) for _ in range(8)))
    assert len({r.body for r, _ in replies}) == 1 and sum(not rep for _, rep in replies) == 1
    assert await core.count("c", None) == 2


async def test_idempotency_failed_work_stores_nothing(core: Core) -> None:
    async def fails(tx: Any) -> StoredReply:
        await core.create("c", {"_id": "dup"}, tx)
        await core.create("c", {"_id": "dup"}, tx)  # 409: rolled back, key not stored
        raise AssertionError("unreachable")

    for _ in range(2):
        with pytest.raises(Conflict):
            await core.idempotent("k-3", "fp", fails)
    assert await core.count("c", None) == 0


async def pinned_pid(core: Core, tx_id: str) -> int:
    entry = core.transactions.lookup(tx_id, "svc")
    return int(entry.tx.backend_pid())  # type: ignore[attr-defined]


@pytest.mark.parametrize("core", ["postgresql"], indirect=True)
async def test_idle_and_lifetime_timeouts_free_the_connection(core: Core, pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        idle = await core.begin(Caller("svc"))
        busy = await core.begin(Caller("svc"))
        pids = [await pinned_pid(core, t) for t in (idle, busy)]
        async with core.transactions.use(idle, "svc") as tx:
            await core.create("c", {"_id": "held"}, tx)  # takes a row lock
        states = await conn.fetch(
            "SELECT pid, state FROM pg_stat_activity WHERE pid = ANY($1)", pids
        )
        assert {r["state"] for r in states} == {"idle in transaction"}
        # keep "busy" in use: idle timeout spares it, the lifetime (1 s) does not
        for _ in range(12):
            await asyncio.sleep(0.15)
            await core.transactions.reap()
            if busy in core.transactions._open:
                async with core.transactions.use(busy, "svc") as tx:
                    await core.count("c", None, tx)
        with pytest.raises(Conflict) as info:
            async with core.transactions.use(idle, "svc"):
                pass
        assert info.value.details["state"] == "expired"
        assert len(core.transactions) == 0
        states = await conn.fetch("SELECT state FROM pg_stat_activity WHERE pid = ANY($1)", pids)
        assert all(r["state"] != "idle in transaction" for r in states)
        locks = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE pid = ANY($1) AND locktype = 'transactionid'", pids
        )
        assert locks == 0
        assert await core.count("c", None) == 0  # the expired write was rolled back
    finally:
        await conn.close()


@pytest.mark.parametrize("core", ["postgresql"], indirect=True)
async def test_terminated_pinned_connection_is_a_clear_error(core: Core, pg_dsn: str) -> None:
    tx_id = await core.begin(Caller("svc"))
    pid = await pinned_pid(core, tx_id)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()
    await asyncio.sleep(0.1)
    with pytest.raises(Conflict) as info:
        async with core.transactions.use(tx_id, "svc") as tx:
            await core.count("c", None, tx)
    assert info.value.code == "transaction_aborted"
    assert len(core.transactions) == 0
    # the sidecar is fine: new work, new transactions
    await core.create("c", {"_id": "after"})
    assert await core.run_batch({"operations": [{"op": "count", "collection": "c"}]})


@pytest.mark.parametrize("core", ["postgresql"], indirect=True)
async def test_serialization_failure_is_retryable_409(core: Core) -> None:
    await core.create("c", [{"_id": "x", "n": 0}, {"_id": "y", "n": 0}])
    t1 = await core.begin(Caller("svc"), "serializable")
    t2 = await core.begin(Caller("svc"), "serializable")
    for tx_id, read, write in ((t1, "x", "y"), (t2, "y", "x")):
        async with core.transactions.use(tx_id, "svc") as tx:
            doc = orjson.loads((await core.get("c", read, target=tx)).body)
            await core.replace_or_update("c", write, {"n": doc["n"] + 1}, target=tx)
    await core.transactions.commit(t1, "svc")
    with pytest.raises(Conflict) as info:
        await core.transactions.commit(t2, "svc")
    assert info.value.code == "serialization_failure" and info.value.retryable
