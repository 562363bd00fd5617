"""Transactions may not starve anyone (issue 13, items 2 and 14), through the Core on real
PostgreSQL and SQLite: the pool's transaction share, per-service caps, and plain writes
on the embedded store that never queue behind an idle interactive transaction."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.backends.base import TxKind
from proxy.backends.sqlite import SqliteBackend
from proxy.config import Limits
from proxy.errors import ProxyError, RateLimited, Unavailable
from proxy.pipeline.core import Core
from proxy.pipeline.gate import Caller
from proxy.policy import load_policies
from proxy.query.spec import StoredReply
from tests.backends import KINDS, open_core

pytestmark = pytest.mark.integration

LIMITS = Limits(
    max_open_transactions_per_service=3,
    transaction_idle_timeout_seconds=0.3,
    transaction_max_lifetime_seconds=30.0,
)
SHARE = 6  # tests/backends.py opens pools of 8 connections: 2 stay for plain requests


@pytest.fixture(params=KINDS)
async def core(request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core(request.param, pg_dsn, LIMITS, str(tmp_path)) as c:
        yield c
        await c.transactions.close_all()


@pytest.fixture
async def sqlite_core(pg_dsn: str, tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core("sqlite", pg_dsn, LIMITS, str(tmp_path)) as c:
        yield c
        await c.transactions.close_all()


def callers(tmp_path: Path) -> dict[str, Caller]:
    d = tmp_path / "policies"
    d.mkdir()
    grants = "grants: [{collections: ['*'], operations: [read, create, count, transaction]}]\n"
    (d / "alpha.yaml").write_text(f"service: alpha\n{grants}limits: {{max_open_transactions: 2}}\n")
    (d / "beta.yaml").write_text(f"service: beta\n{grants}")
    policies = load_policies(d)
    return {name: Caller(name, policies.services[name]) for name in ("alpha", "beta")}


def refused(err: ProxyError, status: int, code: str) -> None:
    assert (err.status, err.code) == (status, code)
    assert err.retry_after is not None and err.retry_after >= 1


BATCH = {"operations": [{"op": "create", "collection": "b", "document": {"k": 1}}]}


async def test_transactions_hold_at_most_their_share_of_the_pool(core: Core) -> None:
    backend = core.backend()
    held = [await backend.begin("read_committed", TxKind.INTERACTIVE) for _ in range(SHARE)]
    started = time.perf_counter()
    with pytest.raises(Unavailable) as info:
        await backend.begin("read_committed", TxKind.INTERACTIVE)
    refused(info.value, 503, "too_many_transactions")
    assert time.perf_counter() - started < 1.0  # at once, not after the acquire timeout
    assert info.value.details == {"limit": SHARE, "pool": 8}
    # plain requests and single (idempotent) writes use the connections kept back
    created = await core.create("plain", {"_id": "p"})
    assert created.version == 1  # type: ignore[union-attr]

    async def produce(tx: Any) -> StoredReply:
        await core.create("plain", {"_id": "idem"}, tx)
        return StoredReply(201, b"{}", {})

    reply, replayed = await core.idempotent("k1", "fp", produce)
    assert reply.status == 201 and not replayed
    # a batch waits for a share slot; the first transaction to end gives it one
    batch = asyncio.ensure_future(core.run_batch(BATCH))
    await asyncio.sleep(0.3)
    assert not batch.done()
    await held.pop().rollback()
    results = orjson.loads(orjson.dumps(await asyncio.wait_for(batch, 5)))
    assert results[0]["status"] == 201
    # an interactive begin fits again once one more ends
    await held.pop().commit()
    held.append(await backend.begin("read_committed", TxKind.INTERACTIVE))
    for tx in held:
        await tx.rollback()
    assert await core.count("plain", None) == 2 and await core.count("b", None) == 1


async def test_open_transactions_are_capped_per_service(core: Core, tmp_path: Path) -> None:
    who = callers(tmp_path)
    alpha = [await core.begin(who["alpha"]) for _ in range(2)]  # its policy says 2
    with pytest.raises(RateLimited) as info:
        await core.begin(who["alpha"])
    refused(info.value, 429, "transaction_limit_exceeded")
    assert info.value.details == {"limit": 2}
    beta = [await core.begin(who["beta"]) for _ in range(3)]  # the sidecar's default, 3 here
    with pytest.raises(RateLimited):
        await core.begin(who["beta"])
    # no policy: only the sidecar-wide cap and the pool share apply
    anonymous = await core.begin(Caller("anonymous"))
    # the share (6) is full now: alpha's begin fails with 503, and costs it nothing
    await core.transactions.rollback(alpha.pop(), "alpha")
    extra = await core.begin(Caller("anonymous"))
    with pytest.raises(Unavailable) as busy:
        await core.begin(who["alpha"])
    refused(busy.value, 503, "too_many_transactions")
    assert core.transactions.owned("alpha") == 1
    await core.transactions.rollback(extra, "anonymous")
    alpha.append(await core.begin(who["alpha"]))
    for tx_id in alpha:
        await core.transactions.commit(tx_id, "alpha")
    for tx_id in beta:
        await core.transactions.rollback(tx_id, "beta")
    await core.transactions.rollback(anonymous, "anonymous")
    assert core.transactions.owned("alpha") == core.transactions.owned("beta") == 0
    # ended by the reaper: counted off as well
    idle = await core.begin(who["alpha"])
    await asyncio.sleep(0.4)
    assert await core.transactions.reap() == 1
    assert core.transactions.owned("alpha") == 0
    assert idle not in core.transactions._open


async def quick(work: Any) -> ProxyError:
    """Run ``work``; it must fail within a second; the error."""
    started = time.perf_counter()
    with pytest.raises(ProxyError) as info:
        await asyncio.wait_for(work, 3.0)
    assert time.perf_counter() - started < 1.0
    return info.value


async def test_embedded_writes_do_not_queue_behind_an_idle_transaction(
    sqlite_core: Core, caplog: pytest.LogCaptureFixture
) -> None:
    core = sqlite_core
    backend = core.backend()
    assert isinstance(backend, SqliteBackend)
    await core.create("c", {"_id": "seed", "n": 0})
    reader = await core.begin(Caller("svc"))
    async with core.transactions.use(reader, "svc") as tx:
        await core.count("c", None, tx)
    await core.create("c", {"_id": "reads_hold_nothing"})  # no write yet: no write lock
    await core.transactions.rollback(reader, "svc")
    holder = await core.begin(Caller("svc"))
    async with core.transactions.use(holder, "svc") as tx:
        await core.replace_or_update("c", "seed", {"$inc": {"n": 1}}, target=tx)
    # idle now, holding the writer
    refused(await quick(core.create("c", {"_id": "plain"})), 503, "writer_busy")
    refused(await quick(core.run_batch(BATCH)), 503, "writer_busy")

    async def produce(tx: Any) -> StoredReply:
        await core.create("c", {"_id": "idem"}, tx)
        return StoredReply(201, b"{}", {})

    refused(await quick(core.idempotent("k", "fp", produce)), 503, "writer_busy")
    second = await core.begin(Caller("svc"))
    with pytest.raises(Unavailable) as info:
        async with core.transactions.use(second, "svc") as tx:
            await asyncio.wait_for(core.create("c", {"_id": "second"}, tx), 3.0)
    refused(info.value, 503, "writer_busy")
    with caplog.at_level(logging.DEBUG, logger="proxy"):
        await asyncio.wait_for(core.maintain(), 3.0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    # the holder ends; the refused transaction is still usable and goes next
    await core.transactions.commit(holder, "svc")
    async with core.transactions.use(second, "svc") as tx:
        await core.create("c", {"_id": "second"}, tx)
    await core.transactions.commit(second, "svc")
    await core.create("c", {"_id": "after"})
    await core.maintain()
    page = await core.find("c", core.find_spec({"sort": "_id"}, from_url=True))
    docs = [orjson.loads(raw) for raw in page.items]
    assert [d["_id"] for d in docs] == ["after", "reads_hold_nothing", "second", "seed"]
    assert docs[-1]["n"] == 1 and docs[-1]["_version"] == 2
    assert backend._interactive_writers == 0


async def test_embedded_writer_is_given_back_on_every_ending(sqlite_core: Core) -> None:
    core = sqlite_core
    backend = core.backend()
    assert isinstance(backend, SqliteBackend)
    await core.create("c", {"_id": "s", "v": "text"})

    async def holding() -> str:
        tx_id = await core.begin(Caller("svc"))
        async with core.transactions.use(tx_id, "svc") as tx:
            await core.create("c", {}, tx)
        return tx_id

    await core.transactions.rollback(await holding(), "svc")
    await core.transactions.commit(await holding(), "svc")
    failing = await holding()
    with pytest.raises(ProxyError):
        async with core.transactions.use(failing, "svc") as tx:
            await core.replace_or_update("c", "s", {"$inc": {"v": 1}}, target=tx)
    await holding()
    await asyncio.sleep(0.4)
    assert await core.transactions.reap() == 1  # the idle one expired
    await holding()
    await core.transactions.close_all()
    assert backend._interactive_writers == 0
    assert len(core.transactions) == 0
    started = time.perf_counter()
    await core.create("c", {"_id": "free"})
    assert time.perf_counter() - started < 1.0
    assert await core.count("c", None) == 3  # s, the committed one, free
