"""Transactions may not starve anyone (issue 13, items 2 and 14): per-service caps on open
interactive transactions, a share of every pool kept for plain requests, and, on the
embedded store, plain writes that never wait long behind an idle transaction."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.policy import hash_token
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

OPS = "[read, list, count, create, update, delete, transaction]"


async def call(
    s: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, Any, Any, float]:
    started = time.perf_counter()
    async with s.request(method, url, timeout=aiohttp.ClientTimeout(total=20), **kw) as resp:
        body = await resp.json(content_type=None)
        return resp.status, body, resp.headers.copy(), time.perf_counter() - started


def coll() -> str:
    return "txcap_" + uuid.uuid4().hex[:8]


def policies(tmp_path: Path, caps: dict[str, int | None]) -> Path:
    """One policy per service (token ``<name>-token``), every collection and transactions."""
    d = tmp_path / f"policies-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    for name, cap in caps.items():
        limits = f"limits: {{max_open_transactions: {cap}}}\n" if cap is not None else ""
        (d / f"{name}.yaml").write_text(
            f"service: {name}\n"
            f"identity: {{tokens: ['{hash_token(name + '-token')}']}}\n"
            f"grants: [{{collections: ['*'], operations: {OPS}}}]\n" + limits
        )
    return d


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}-token"}


async def begin(s: aiohttp.ClientSession, url: str, who: str) -> tuple[int, Any, Any, float]:
    return await call(
        s, "POST", f"{url}/api/db/transaction", json={"action": "begin"}, headers=auth(who)
    )


async def end(s: aiohttp.ClientSession, url: str, who: str, tx_id: str, action: str) -> None:
    st, body, _, _ = await call(
        s,
        "POST",
        f"{url}/api/db/transaction",
        json={"action": action, "transaction_id": tx_id},
        headers=auth(who),
    )
    assert st == 200, body


def refused(result: tuple[int, Any, Any, float], status: int, code: str) -> None:
    st, body, headers, took = result
    assert (st, body["error"]["code"]) == (status, code), body
    assert int(headers["Retry-After"]) >= 1
    assert took < 2.0  # refused at once, not after waiting for a connection


async def plain_traffic(s: aiohttp.ClientSession, url: str, who: str, n: int) -> list[float]:
    """n creates and n reads by ``who``; every one must succeed; their latencies."""
    base = f"{url}/api/db/{coll()}"
    took: list[float] = []
    for i in range(n):
        st, doc, _, t = await call(s, "POST", base, json={"i": i}, headers=auth(who))
        assert st == 201, doc
        took.append(t)
        st, got, _, t = await call(s, "GET", f"{base}/{doc['_id']}", headers=auth(who))
        assert st == 200 and got["i"] == i, got
        took.append(t)
    return took


async def test_one_service_cannot_starve_the_postgres_pool(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> None:
    """Pool of 4: transactions may hold 3 of its connections. alpha (cap 2) holds 2 and is
    refused a third with 429; gamma takes the last transaction connection; then begins are
    503 too_many_transactions; beta's plain reads and writes never wait."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "databases:\n  - name: main\n    type: postgresql\n"
        f"    connection_string: {pg_dsn}\n"
        "    pool_settings: {min_connections: 1, max_connections: 4, timeout_seconds: 5}\n"
    )
    pdir = policies(tmp_path, {"alpha": 2, "beta": None, "gamma": None})
    server = launch("--config", str(cfg), "--policies", str(pdir))
    url = server.url
    async with aiohttp.ClientSession() as s:
        held: list[tuple[str, str]] = []
        for _ in range(2):
            st, body, _, _ = await begin(s, url, "alpha")
            assert st == 201, body
            held.append(("alpha", body["transaction_id"]))
        refused(await begin(s, url, "alpha"), 429, "transaction_limit_exceeded")
        st, body, _, _ = await begin(s, url, "gamma")
        assert st == 201, body
        held.append(("gamma", body["transaction_id"]))
        # the transaction share (3 of 4) is taken: the last connection is for plain requests
        refused(await begin(s, url, "gamma"), 503, "too_many_transactions")
        refused(await begin(s, url, "beta"), 503, "too_many_transactions")
        took = await plain_traffic(s, url, "beta", 25)
        assert max(took) < 1.0, took  # a timed-out pool wait would be 5 s
        # the holders may still use theirs, and a freed slot is usable again
        who, tx_id = held.pop(0)
        await end(s, url, who, tx_id, "commit")
        st, body, _, _ = await begin(s, url, "beta")
        assert st == 201, body
        held.append(("beta", body["transaction_id"]))
        for who, tx_id in held:
            await end(s, url, who, tx_id, "rollback")


async def test_one_service_cannot_hold_every_embedded_transaction(
    launch: Callable[..., Server], tmp_path: Path
) -> None:
    """On the embedded store the per-service cap holds the same way, and transactions that
    only read never get in the way of another service's writes."""
    pdir = policies(tmp_path, {"alpha": 2, "beta": None})
    server = launch("--data-dir", str(tmp_path / "data"), "--policies", str(pdir))
    url = server.url
    name = coll()
    async with aiohttp.ClientSession() as s:
        st, _, _, _ = await call(
            s, "POST", f"{url}/api/db/{name}", json={"_id": "seed"}, headers=auth("beta")
        )
        assert st == 201
        held = []
        for _ in range(2):
            st, body, _, _ = await begin(s, url, "alpha")
            assert st == 201, body
            tx_id = body["transaction_id"]
            hdr = {**auth("alpha"), "X-Transaction-Id": tx_id}
            st, _, _, _ = await call(s, "GET", f"{url}/api/db/{name}/seed", headers=hdr)
            assert st == 200
            held.append(tx_id)
        refused(await begin(s, url, "alpha"), 429, "transaction_limit_exceeded")
        took = await plain_traffic(s, url, "beta", 25)
        assert max(took) < 1.0, took
        for tx_id in held:
            await end(s, url, "alpha", tx_id, "rollback")


@pytest.mark.parametrize("ending", ["commit", "rollback"])
async def test_embedded_plain_writes_do_not_wait_behind_an_idle_transaction(
    launch: Callable[..., Server], tmp_path: Path, ending: str
) -> None:
    """A transaction that wrote holds SQLite's one write lock until it ends: meanwhile a
    plain write is refused within a second (503 writer_busy, Retry-After) instead of waiting
    30 s for the idle timeout; afterwards everything is consistent."""
    server = launch("--data-dir", str(tmp_path / "data"))
    base = f"{server.url}/api/db/{coll()}"
    tx_url = f"{server.url}/api/db/transaction"
    async with aiohttp.ClientSession() as s, aiohttp.ClientSession() as other:
        st, _, _, _ = await call(s, "POST", base, json={"_id": "seed", "n": 0})
        assert st == 201
        st, begun, _, _ = await call(s, "POST", tx_url, json={"action": "begin"})
        tx_id = begun["transaction_id"]
        hdr = {"X-Transaction-Id": tx_id}
        # before its first write the transaction holds no write lock
        st, doc, _, took = await call(other, "POST", base, json={"_id": "before"})
        assert st == 201 and took < 1.0, doc
        st, _, _, _ = await call(s, "POST", base, json={"_id": "in_tx"}, headers=hdr)
        assert st == 201
        st, _, _, _ = await call(s, "PUT", f"{base}/seed", json={"$inc": {"n": 1}}, headers=hdr)
        assert st == 200
        # now it is idle, holding the writer: other writes are told so at once
        for body in ({"_id": "during"}, [{"_id": "bulk1"}, {"_id": "bulk2"}]):
            refused(await call(other, "POST", base, json=body), 503, "writer_busy")
        refused(await call(other, "PATCH", f"{base}/seed", json={"n": 5}), 503, "writer_busy")
        st, doc, _, took = await call(other, "GET", f"{base}/seed")  # reads are not blocked
        assert st == 200 and doc["n"] == 0 and took < 1.0
        # the holder itself goes on writing and ends
        st, _, _, _ = await call(s, "PUT", f"{base}/seed", json={"$inc": {"n": 1}}, headers=hdr)
        assert st == 200
        st, _, _, _ = await call(
            s, "POST", tx_url, json={"action": ending, "transaction_id": tx_id}
        )
        assert st == 200
        st, doc, _, took = await call(other, "POST", base, json={"_id": "after"})
        assert st == 201 and took < 1.0, doc
        st, page, _, _ = await call(other, "GET", base, params={"sort": "_id"})
        ids = [d["_id"] for d in page["items"]]
        committed = ending == "commit"
        assert ids == sorted(["after", "before", "seed"] + (["in_tx"] if committed else []))
        st, doc, _, _ = await call(other, "GET", f"{base}/seed")
        assert doc["n"] == (2 if committed else 0) and doc["_version"] == (3 if committed else 1)
    server.stop()
    log = server.output()
    assert "housekeeping" not in log and "Traceback" not in log, log
