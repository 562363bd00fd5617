"""Deadlines, timeouts and rate-limit costs against the real ``dbproxy serve`` (issue 13, items
9-11): a frozen PostgreSQL (SIGSTOP), per-service statement timeouts in batches and
interactive transactions, timed-out reads run once, and batch charging."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
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
    kinds = ["get", "create", "query", "batch"]
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
                await asyncio.sleep(7.0)
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
            f"recovered {recovered:.2f} s after thaw"
        )
