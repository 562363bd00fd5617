"""Read replicas, consistency tokens, circuit breakers and pool behaviour under faults,
against a private PostgreSQL primary and a real streaming replica of it."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from proxy import context
from proxy.backends.base import TxKind
from proxy.backends.postgres import PostgresBackend
from proxy.backends.postgres.pool import EndpointSet
from proxy.config import Config, DatabaseConfig, Limits, PoolSettings, ReplicaConfig
from proxy.context import RequestContext
from proxy.errors import NotFound, PoolExhausted, ProxyError, Unavailable
from proxy.pipeline.core import Core
from proxy.resilience.breaker import BreakerSettings
from proxy.resilience.routing import parse_lsn
from tests.faultproxy import FaultProxy
from tests.replica import Replica

pytestmark = pytest.mark.integration
FAST_BREAKER = BreakerSettings(
    consecutive_failures=3, base_open_seconds=0.5, max_open_seconds=2.0, min_calls_in_window=1000
)


def db_name(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


async def open_backend(
    primary_dsn: str,
    replicas: list[tuple[str, int]],
    *,
    limits: Limits | None = None,
    pool: PoolSettings | None = None,
    preference: str = "secondary",
    breaker: BreakerSettings = FAST_BREAKER,
) -> PostgresBackend:
    limits = limits or Limits()
    cfg = DatabaseConfig(
        name="main",
        type="postgresql",
        connection_string=primary_dsn,
        pool_settings=pool or PoolSettings(min_connections=1, max_connections=4, timeout_seconds=2),
        read_preference=preference,
        replicas=tuple(ReplicaConfig(h, p) for h, p in replicas),
    )
    endpoints = EndpointSet(cfg, limits, breaker=breaker, health_interval=0.1, max_lag_seconds=5.0)
    backend = PostgresBackend(cfg, limits, schema=f"r_{uuid.uuid4().hex[:10]}", endpoints=endpoints)
    await backend.start()
    return backend


async def drop(backend: PostgresBackend) -> None:
    async with backend._conn() as conn:
        await conn.execute("SET statement_timeout = 0")  # tests may have set a tiny one
        await conn.execute(f'DROP SCHEMA IF EXISTS "{backend.schema}" CASCADE')
    await backend.close()


def core_of(backend: PostgresBackend) -> Core:
    return Core(Config(), {"main": backend}, "main")


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.fixture
async def routed(
    primary_dsn: str, replica: Replica
) -> AsyncIterator[tuple[PostgresBackend, Replica]]:
    backend = await open_backend(primary_dsn, [("127.0.0.1", replica.port)])
    rep = backend.endpoints.replicas[0]
    await wait_for(lambda: rep.state.replayed_lsn is not None)
    try:
        yield backend, replica
    finally:
        await asyncio.to_thread(replica.reset)
        await drop(backend)


async def test_reads_go_to_the_replica_and_writes_to_the_primary(
    routed: tuple[PostgresBackend, Replica],
) -> None:
    backend, _ = routed
    core = core_of(backend)
    await core.create("c", {"_id": "a", "n": 1})
    primary, rep = backend.endpoints.primary, backend.endpoints.replicas[0]
    await asyncio.sleep(0.3)  # let a measurement see the replica caught up enough
    writes = primary.statements
    token = parse_lsn(context.write_token.get() or "0/0")
    await wait_for(lambda: (rep.state.replayed_lsn or 0) >= token)
    before = rep.statements
    for _ in range(20):
        await core.count("c", None)
    assert rep.statements - before == 20
    assert primary.statements == writes  # no read went to the primary
    served = rep.statements
    await core.delete("c", "a")  # a delete is a write: the primary's, even with replicas
    with pytest.raises(NotFound):
        await core.delete("c", "a")
    assert rep.statements == served
    snapshot = backend.connections()["endpoints"]
    assert [e["role"] for e in snapshot] == ["primary", "replica"]
    assert snapshot[1]["breaker"]["state"] == "closed"


async def test_consistency_tokens_never_read_stale_with_replay_paused(
    routed: tuple[PostgresBackend, Replica],
) -> None:
    backend, replica = routed
    core = core_of(backend)
    await core.create("c", {"_id": "k", "n": 0})
    await asyncio.to_thread(replica.pause_replay)
    stale = 0
    served_by_replica_before = backend.endpoints.replicas[0].statements
    for i in range(1, 1001):
        context.write_token.set(None)
        result = await core.replace_or_update("c", "k", {"$set": {"n": i}})
        token = context.write_token.get()
        assert token is not None and result.version == i + 1
        reset = context.current.set(RequestContext(min_lsn=parse_lsn(token)))
        try:
            got = orjson.loads((await core.get("c", "k")).body)
        finally:
            context.current.reset(reset)
        stale += got["n"] != i
    assert stale == 0
    # the paused replica could serve none of them
    assert backend.endpoints.replicas[0].statements == served_by_replica_before
    await asyncio.to_thread(replica.resume_replay)
    # once it catches up, token reads may use it again
    token = context.write_token.get()
    assert token is not None
    rep = backend.endpoints.replicas[0]
    await wait_for(lambda: (rep.state.replayed_lsn or 0) >= parse_lsn(token))
    reset = context.current.set(RequestContext(min_lsn=parse_lsn(token)))
    try:
        got = orjson.loads((await core.get("c", "k")).body)
    finally:
        context.current.reset(reset)
    assert got["n"] == 1000 and rep.statements > served_by_replica_before


async def test_replica_stopped_under_load_then_back(
    routed: tuple[PostgresBackend, Replica],
) -> None:
    backend, replica = routed
    core = core_of(backend)
    await core.create("c", {"_id": "x"})
    rep = backend.endpoints.replicas[0]
    failures = 0
    stop_task = asyncio.create_task(asyncio.to_thread(replica.stop, "immediate"))
    sent_while_open = 0
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        before = rep.statements
        # open with time left before a probe: nothing may reach the replica now (judged
        # BEFORE the call: the call that trips the breaker was rightly sent while closed)
        shut = rep.breaker.state.value == "open" and rep.breaker.retry_after() > 0.05
        try:
            await core.count("c", None)
        except ProxyError:
            failures += 1
        if shut and rep.statements > before:
            sent_while_open += 1
        await asyncio.sleep(0.01)
    await stop_task
    assert failures <= 2
    assert rep.breaker.trips >= 1 or not rep.state.healthy
    assert sent_while_open == 0
    # restart: back in rotation within the breaker's open period plus a health interval
    await asyncio.to_thread(replica.start)
    started = time.monotonic()
    served = rep.statements
    while rep.statements == served:
        assert time.monotonic() - started < 2.0 + 0.5 + 3.0
        await core.count("c", None)
        await asyncio.sleep(0.05)


async def test_terminated_idle_connections_are_replaced_without_errors(primary_dsn: str) -> None:
    backend = await open_backend(primary_dsn, [], pool=PoolSettings(4, 4, 2))
    try:
        core = core_of(backend)
        await core.create("c", {"_id": "a"})
        await asyncio.gather(*(core.count("c", None) for _ in range(8)))  # fill the pool
        admin = await asyncpg.connect(primary_dsn)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'dbproxy' AND datname = $1 AND state = 'idle'",
                db_name(primary_dsn),
            )
        finally:
            await admin.close()
        assert killed >= 1
        await asyncio.sleep(0.2)
        results = await asyncio.gather(
            *(core.count("c", None) for _ in range(10)),
            *(core.create("c", {"n": i}) for i in range(5)),
            *(core.get("c", "a") for _ in range(10)),
            return_exceptions=True,
        )
        assert [r for r in results if isinstance(r, BaseException)] == []
    finally:
        await drop(backend)


async def test_hung_primary_fails_fast_then_recovers(primary_dsn: str) -> None:
    primary_port = int(primary_dsn.rsplit(":", 1)[1].split("/", 1)[0])
    proxy = FaultProxy("127.0.0.1", primary_port)
    await proxy.start()
    dsn = primary_dsn.replace(f"127.0.0.1:{primary_port}", f"127.0.0.1:{proxy.port}")
    limits = Limits(statement_timeout_seconds=0.3)  # client gives up at 1.3 s
    slow_reopen = BreakerSettings(
        consecutive_failures=3,
        base_open_seconds=3.0,
        max_open_seconds=3.0,
        min_calls_in_window=1000,
    )
    backend = await open_backend(
        dsn, [], limits=limits, pool=PoolSettings(2, 4, 0.5), breaker=slow_reopen
    )
    try:
        core = core_of(backend)
        await core.create("c", {"_id": "a"})
        proxy.blackhole = True
        # concurrent reads, each on its own connection (creates would share one batch)
        errors = await asyncio.gather(
            *(core.count("c", None) for _ in range(6)), return_exceptions=True
        )
        assert all(isinstance(e, ProxyError) for e in errors)
        assert backend.endpoints.primary.breaker.state.value == "open"
        breaker = backend.endpoints.primary.breaker
        took = []
        for _ in range(20):
            # refused by the open breaker, not by the pool's or the statement's timeout
            # (0.5 s, 1.3 s); once the open period is over a half-open probe may go through
            # and wait like any request, so only the refusals while open are timed
            refusing = not breaker.would_allow()
            started = time.perf_counter()
            with pytest.raises(Unavailable) as info:
                await core.create("c", {"n": 0})
            if refusing:
                took.append(time.perf_counter() - started)
            assert info.value.code == "database_unavailable" and info.value.retry_after
        assert took and max(took) < 0.25, took
        proxy.blackhole = False
        proxy.reset_all()  # the stuck connections are gone; new ones work
        deadline = time.monotonic() + 10.0
        while True:
            try:
                await core.create("c", {"n": 1})
                break
            except ProxyError:
                assert time.monotonic() < deadline, "did not recover"
                await asyncio.sleep(0.1)
        assert backend.endpoints.primary.breaker.state.value == "closed"
    finally:
        proxy.blackhole = False
        await drop(backend)
        await proxy.stop()


async def test_a_batch_waiting_behind_transactions_stuck_on_a_silent_server_is_told_so(
    primary_dsn: str,
) -> None:
    """Transactions hold the whole share and their statements hang on a server that stopped
    answering: a batch waiting for a slot hears that the database is not answering, not that
    transactions are too many (found by the frozen-server deadline test)."""
    primary_port = int(primary_dsn.rsplit(":", 1)[1].split("/", 1)[0])
    proxy = FaultProxy("127.0.0.1", primary_port)
    await proxy.start()
    dsn = primary_dsn.replace(f"127.0.0.1:{primary_port}", f"127.0.0.1:{proxy.port}")
    limits = Limits(statement_timeout_seconds=5.0)
    backend = await open_backend(dsn, [], limits=limits, pool=PoolSettings(1, 4, 1.0))
    held = []
    try:
        share = backend.transaction_share
        assert share.limit == 3
        held = [await backend.begin("read_committed", TxKind.BATCH) for _ in range(share.limit)]
        # healthy: the share is full and the server answers, so it is the honest refusal
        with pytest.raises(Unavailable) as busy:
            await backend.begin("read_committed", TxKind.BATCH)
        assert busy.value.code == "too_many_transactions"
        proxy.blackhole = True
        stuck = [asyncio.create_task(tx._fetch("SELECT 1")) for tx in held]
        await asyncio.sleep(0.6)  # longer than the endpoint set's stall time
        started = time.perf_counter()
        with pytest.raises(Unavailable) as silent:
            await backend.begin("read_committed", TxKind.BATCH)
        assert silent.value.code == "database_unavailable", silent.value
        assert silent.value.retry_after
        assert time.perf_counter() - started < 1.5
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
    finally:
        proxy.blackhole = False
        proxy.reset_all()
        for tx in held:
            with contextlib.suppress(Exception):
                await tx.rollback()
        await drop(backend)
        await proxy.stop()


async def test_pool_saturation_is_bounded_and_recovers(primary_dsn: str) -> None:
    backend = await open_backend(primary_dsn, [], pool=PoolSettings(2, 2, 0.3))
    try:
        core = core_of(backend)
        await core.create("slow", {"_id": "seed"})
        async with backend._conn() as conn:  # enough rows that a regex scan takes a while
            await conn.execute(
                f'INSERT INTO "{backend.schema}".slow (_id, doc) SELECT g::text, '
                "jsonb_build_object('_id', g::text, 's', repeat('ab', 100)) "
                "FROM generate_series(1, 60000) g"
            )
        slow = {"s": {"$regex": "(a|b)*c$"}}
        started = time.perf_counter()
        one = await core.count("slow", slow)
        single = time.perf_counter() - started
        assert one == 0 and single > 0.05
        started = time.perf_counter()
        results = await asyncio.gather(
            *(core.count("slow", slow) for _ in range(20)), return_exceptions=True
        )
        elapsed = time.perf_counter() - started
        exhausted = [r for r in results if isinstance(r, PoolExhausted)]
        ok = [r for r in results if r == 0]
        assert len(exhausted) + len(ok) == 20, results
        assert exhausted and ok
        assert all(e.retry_after for e in exhausted)
        # nobody waited much longer than the acquire timeout for a connection
        assert elapsed < 0.3 + single * (len(ok) + 2) + 1.0
        assert backend.waiting == 0
        for _ in range(20):  # full recovery after the burst
            assert await core.count("slow", {"_id": "seed"}) == 1
    finally:
        await drop(backend)
