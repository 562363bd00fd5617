"""Deadlines, timeouts and rate-limit costs against the real ``dbproxy serve`` (issue 13, items
9-11): a frozen PostgreSQL (SIGSTOP), per-service statement timeouts in batches and
interactive transactions, timed-out reads run once, and batch charging."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.e2e.conftest import Server
from tests.pgcluster import binaries_missing, private_cluster

pytestmark = pytest.mark.e2e

DEADLINE = 2.0  # the configured statement timeout of these tests: every request's deadline
SLACK = 1.5  # what a request may take beyond it (the client-side grace, and machine noise)


def coll() -> str:
    return "dl_" + uuid.uuid4().hex[:8]


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, Any, Any]:
    async with session.request(method, url, **kw) as resp:
        body = await resp.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = body.decode(errors="replace")
        return resp.status, data, resp.headers.copy()


def code_of(data: Any) -> str | None:
    return data["error"]["code"] if isinstance(data, dict) and "error" in data else None


@dataclass
class Outcome:
    kind: str
    started: float
    took: float
    status: int
    code: str | None
    retry_after: str | None
    ids: tuple[str, ...] = ()


# ---- item 9: a frozen PostgreSQL ---------------------------------------------------------


async def _stream(
    s: aiohttp.ClientSession, base: str, url: str, seed: str, stop: asyncio.Event, out: list[Any]
) -> None:
    # "listed": a find of a declared, indexed shape, which concurrent callers share
    # (list-query coalescing): a caller that joins a batch stuck on the frozen server, or
    # waits behind one, must still be answered by its own deadline
    kinds = ["get", "create", "query", "batch", "listed"]
    i = 0
    while not stop.is_set():
        kind = kinds[i % len(kinds)]
        i += 1
        new_id = uuid.uuid4().hex
        ids: tuple[str, ...] = ()
        if kind == "get":
            req: tuple[str, str, dict[str, Any]] = ("GET", f"{base}/{seed}", {})
        elif kind == "create":
            ids = (new_id,)
            req = ("POST", base, {"json": {"_id": new_id, "n": i}})
        elif kind == "query":
            req = ("POST", f"{base}/query", {"json": {"filter": {"n": {"$gte": 0}}, "limit": 5}})
        elif kind == "listed":
            body = {"filter": {"grp": i % 3, "n": {"$gte": i % 7}}, "sort": "n", "limit": 5}
            req = ("POST", f"{base}_d/query", {"json": body})
        else:
            ids = (new_id,)
            ops = [
                {"op": "create", "collection": base.rsplit("/", 1)[1], "document": {"_id": new_id}},
                {"op": "get", "collection": base.rsplit("/", 1)[1], "id": seed},
            ]
            req = ("POST", f"{url}/transaction", {"json": {"operations": ops}})
        started = time.monotonic()
        try:
            st, data, headers = await call(s, req[0], req[1], **req[2])
        except (TimeoutError, aiohttp.ClientError) as exc:
            st, data, headers = 0, repr(exc), {}
        took = time.monotonic() - started
        out.append(Outcome(kind, started, took, st, code_of(data), headers.get("Retry-After"), ids))
        if st >= 500 or st == 0:
            await asyncio.sleep(0.02)  # fast refusals: do not spin


async def _wave(s: aiohttp.ClientSession, base: str, delay: float, out: list[Any]) -> None:
    await asyncio.sleep(delay)

    async def one(k: int) -> None:
        body = {"filter": {"grp": k % 3, "n": {"$gte": k}}, "sort": "n", "limit": 5}
        started = time.monotonic()
        try:
            st, data, headers = await call(s, "POST", f"{base}_d/query", json=body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            st, data, headers = 0, repr(exc), {}
        took = time.monotonic() - started
        out.append(Outcome("wave", started, took, st, code_of(data), headers.get("Retry-After")))

    await asyncio.gather(*(one(k) for k in range(24)))


async def _breaker_watch(
    s: aiohttp.ClientSession, url: str, stop: asyncio.Event, seen: list[tuple[float, str]]
) -> None:
    while not stop.is_set():
        try:
            st, data, _ = await call(s, "GET", f"{url}/connections")
            if st == 200:
                state = data["main"]["endpoints"][0]["breaker"]["state"]
                seen.append((time.monotonic(), state))
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(0.05)


def _declared(collection: str) -> dict[str, Any]:
    """A migration declaring ``collection``'s (grp, n) as integers, indexed together."""
    schema = {
        "name": collection,
        "fields": [
            {"name": "grp", "type": "integer", "required": True},
            {"name": "n", "type": "integer", "required": True},
        ],
    }
    index = {"name": collection + "_grp_n", "fields": ["grp", "n"]}
    ops = [
        {"op": "create_collection", "collection": collection, "schema": schema},
        {"op": "create_index", "collection": collection, "index": index},
    ]
    return {"id": "declare-" + collection, "name": "declared", "script": {"operations": ops}}


@pytest.mark.skipif(binaries_missing() is not None, reason=str(binaries_missing()))
async def test_frozen_postgres_every_request_meets_its_deadline(
    launch: Callable[..., Server], tmp_path: Path
) -> None:
    with private_cluster() as cluster:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(
            f"limits: {{statement_timeout_seconds: {DEADLINE}}}\n"
            "databases:\n  - name: main\n    type: postgresql\n"
            f"    connection_string: {cluster.dsn()}\n"
            "    pool_settings: {min_connections: 2, max_connections: 6, timeout_seconds: 5}\n"
        )
        server = launch("--config", str(cfg))
        url = f"{server.url}/api/db"
        name = coll()
        base = f"{url}/{name}"
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            st, _, _ = await call(s, "POST", base, json={"_id": "seed", "n": 0})
            assert st == 201
            st, data, _ = await call(s, "POST", f"{url}/migrations", json=_declared(name + "_d"))
            assert st in (200, 201), data
            docs = [{"grp": k % 3, "n": k} for k in range(60)]
            st, _, _ = await call(s, "POST", f"{base}_d", json=docs)
            assert st == 201
            stop, watch_stop = asyncio.Event(), asyncio.Event()
            outcomes: list[Outcome] = []
            states: list[tuple[float, str]] = []
            watcher = asyncio.create_task(_breaker_watch(s, url, watch_stop, states))
            streams = [
                asyncio.create_task(_stream(s, base, url, "seed", stop, outcomes)) for _ in range(8)
            ]
            await asyncio.sleep(1.0)
            frozen_at = time.monotonic()
            cluster.freeze()
            try:
                # two waves of 24 concurrent declared finds: the first stuck in batches on
                # the frozen server, the second arriving while they are (queued behind them)
                waves = [
                    asyncio.create_task(_wave(s, base, delay, outcomes)) for delay in (0.1, 0.6)
                ]
                await asyncio.sleep(7.0)
                await asyncio.gather(*waves)
            finally:
                cluster.thaw()
            thawed_at = time.monotonic()
            # service comes back: a GET and a create succeed again within 15 s
            recovered = None
            while time.monotonic() < thawed_at + 15:
                got = await call(s, "GET", f"{base}/seed")
                made = await call(s, "POST", base, json={"n": 1})
                if got[0] == 200 and made[0] == 201:
                    recovered = time.monotonic() - thawed_at
                    break
                await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*streams)
            watch_stop.set()
            await watcher
            assert recovered is not None, "service did not recover after the thaw"

        # every request, whenever it ran, ended within its deadline plus a small slack
        slow = [o for o in outcomes if o.took > DEADLINE + SLACK]
        assert not slow, slow[:5]
        during = [o for o in outcomes if frozen_at <= o.started + o.took and o.started < thawed_at]
        assert len(during) > 20
        listed = [o for o in during if o.kind in ("listed", "wave")]
        assert len(listed) > 48 and all(o.status in (200, 503, 504) for o in listed), listed[:5]
        waves = [o for o in outcomes if o.kind == "wave"]
        longest = max(o.took for o in waves)
        print(f"waves: {Counter((o.status, o.code) for o in waves)}, max {longest:.2f} s")
        honest = {
            (503, "database_unavailable"),
            (504, "database_timeout"),
            (502, "commit_outcome_unknown"),
        }
        for o in outcomes:
            if o.status >= 400:
                assert (o.status, o.code) in honest, o
                if o.status == 502:
                    assert o.kind in ("create", "batch"), o  # only a write can be unknown
                if o.status == 503:
                    assert o.retry_after is not None and int(o.retry_after) >= 1, o
        # the breaker opened within about 2 s of the freeze ...
        opened = [t for t, state in states if state == "open" and t >= frozen_at]
        assert opened, states[-5:]
        assert opened[0] - frozen_at < 2.5, opened[0] - frozen_at
        # ... and from then on refusals were immediate: fast 503s with Retry-After
        fast = [
            o
            for o in outcomes
            if opened[0] <= o.started < thawed_at and o.status == 503 and o.took < 0.25
        ]
        assert len(fast) >= 20, len(fast)
        # the codes told the truth: a 201 is durable, a definite failure wrote nothing
        conn = await asyncpg.connect(cluster.dsn())
        try:
            stored = {r[0] for r in await conn.fetch(f'SELECT _id FROM dbproxy."{name}"')}
        finally:
            await conn.close()
        for o in outcomes:
            for doc_id in o.ids:
                if o.status in (200, 201):
                    assert doc_id in stored, o
                elif o.status in (503, 504):
                    assert doc_id not in stored, o
        print(
            f"freeze: {len(during)} requests, breaker open after "
            f"{opened[0] - frozen_at:.2f} s, max {max(o.took for o in outcomes):.2f} s, "
            f"recovered {recovered:.2f} s after thaw; "
            f"{Counter((o.status, o.code) for o in during).most_common()}"
        )


# ---- item 10: the service's statement timeout, everywhere; a timeout is never retried ----

CAP = 0.5  # the service's statement timeout (the global one stays 5 s)


def _capped_policy(tmp_path: Path, rate: str = "") -> Path:
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    (d / "slow.yaml").write_text(
        "service: slow\n"
        "grants:\n"
        "  - collections: ['*']\n"
        "    operations: [read, list, count, create, update, delete, transaction]\n"
        f"limits:\n  statement_timeout_seconds: {CAP}\n{rate}"
    )
    return d


async def _locked(dsn: str, table: str) -> asyncpg.Connection:
    """A session holding ACCESS EXCLUSIVE on the table: every statement on it waits."""
    conn = await asyncpg.connect(dsn)
    tx = conn.transaction()
    await tx.start()
    await conn.execute(f'LOCK TABLE dbproxy."{table}" IN ACCESS EXCLUSIVE MODE')
    return conn


async def _waiters(dsn: str, table: str, stop: asyncio.Event, seen: set[tuple[int, Any]]) -> None:
    """Every execution that waited on the lock: (backend pid, statement start); the EXPLAIN
    that dbproxy runs in the background for a slow statement is not one."""
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            rows = await conn.fetch(
                "SELECT pid, query_start FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND query LIKE $1 AND query NOT LIKE 'EXPLAIN%'",
                f'%."{table}"%',
            )
            seen.update((r[0], r[1]) for r in rows)
            await asyncio.sleep(0.02)
    finally:
        await conn.close()


async def _slow_service(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> tuple[Server, str, str]:
    server = launch(
        "--database", pg_dsn, "--policies", str(_capped_policy(tmp_path)), "--service", "slow"
    )
    name = coll()
    async with aiohttp.ClientSession() as s:
        st, _, _ = await call(s, "POST", f"{server.url}/api/db/{name}", json={"_id": "a"})
        assert st == 201
    return server, f"{server.url}/api/db", name


async def test_service_timeout_cuts_a_slow_statement_in_a_batch(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> None:
    _, url, name = await _slow_service(launch, pg_dsn, tmp_path)
    holder = await _locked(pg_dsn, name)
    try:
        ops = [{"op": "get", "collection": name, "id": "a"}]
        async with aiohttp.ClientSession() as s:
            started = time.monotonic()
            batch = asyncio.ensure_future(
                call(s, "POST", f"{url}/transaction", json={"operations": ops})
            )
            done, _ = await asyncio.wait({batch}, timeout=3.0)  # the lock is held 3 s
            await holder.close()
            st, data, _ = await batch
            took = time.monotonic() - started
    finally:
        await holder.close()
    assert (st, code_of(data)) == (504, "statement_timeout"), (st, data)
    assert done and took < CAP + 1.0, took


async def test_service_timeout_cuts_a_slow_statement_in_an_interactive_transaction(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> None:
    _, url, name = await _slow_service(launch, pg_dsn, tmp_path)
    async with aiohttp.ClientSession() as s:
        st, began, _ = await call(s, "POST", f"{url}/transaction", json={"action": "begin"})
        assert st == 201
        tx = {"X-Transaction-Id": began["transaction_id"]}
        holder = await _locked(pg_dsn, name)
        try:
            started = time.monotonic()
            read = asyncio.ensure_future(call(s, "GET", f"{url}/{name}/a", headers=tx))
            done, _ = await asyncio.wait({read}, timeout=3.0)
            await holder.close()
            st, data, _ = await read
            took = time.monotonic() - started
        finally:
            await holder.close()
        assert (st, code_of(data)) == (504, "statement_timeout"), (st, data)
        assert done and took < CAP + 1.0, took
        # the statement aborted the transaction, which is over now
        st, data, _ = await call(s, "GET", f"{url}/{name}/a", headers=tx)
        assert st == 409 and code_of(data) == "transaction_closed", data


async def test_a_timed_out_read_runs_exactly_once(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> None:
    _, url, name = await _slow_service(launch, pg_dsn, tmp_path)
    holder = await _locked(pg_dsn, name)
    stop = asyncio.Event()
    seen: set[tuple[int, Any]] = set()
    watcher = asyncio.create_task(_waiters(pg_dsn, name, stop, seen))
    try:
        async with aiohttp.ClientSession() as s:
            started = time.monotonic()
            st, data, _ = await call(s, "GET", f"{url}/{name}", params={"limit": "5"})
            took = time.monotonic() - started
            await asyncio.sleep(1.5)  # time for a retry to show up, had there been one
    finally:
        stop.set()
        await watcher
        await holder.close()
    assert (st, code_of(data)) == (504, "statement_timeout"), (st, data)
    assert len(seen) == 1, seen  # PostgreSQL saw the statement once
    assert took < CAP + 1.0, took


# ---- item 11: a batch is charged once; a cost over the burst is a 400 that names it -------


async def test_batches_are_charged_once_and_impossible_costs_say_so(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> None:
    rate = "  rate: {per_second: 50, burst: 10}\n"
    policies = _capped_policy(tmp_path, rate)
    server = launch("--database", pg_dsn, "--policies", str(policies), "--service", "slow")
    url = f"{server.url}/api/db"
    name = coll()

    def batch(n: int) -> dict[str, Any]:
        return {"operations": [{"op": "create", "collection": name, "document": {}}] * n}

    async with aiohttp.ClientSession() as s:
        # 8 of a burst of 10: passes (it was charged 16 and refused with 429)
        st, data, _ = await call(s, "POST", f"{url}/transaction", json=batch(8))
        assert st == 200 and len(data["results"]) == 8, data
        await asyncio.sleep(0.3)  # the bucket refills (50 a second)
        st, data, _ = await call(
            s, "POST", f"{url}/transaction", json=batch(8), headers={"Idempotency-Key": "k1"}
        )
        assert st == 200 and len(data["results"]) == 8, data
        await asyncio.sleep(0.3)
        # more than the burst can ever hold: 400 naming the limit, no Retry-After
        for method, path, body in (
            ("POST", f"{url}/transaction", batch(11)),
            ("POST", f"{url}/{name}", [{}] * 11),
        ):
            st, data, headers = await call(s, method, path, json=body)
            assert (st, code_of(data)) == (400, "cost_exceeds_limit"), data
            assert data["error"]["details"] == {"limit": "rate", "burst": 10, "cost": 11}
            assert "Retry-After" not in headers
        st, data, _ = await call(s, "GET", f"{url}/{name}/count")
        assert st == 200 and data["count"] == 16, data  # nothing of the refused ones
