"""The GET-by-id shortcut in front of the router (``fast_path.Shortcuts``) answers exactly what the
router answers: same status, body and headers, with and without policies, for found,
missing, hidden (row rule), forbidden, malformed and unauthenticated requests. The same
request with a dummy query string (``?_=1``, ignored by the handler) takes the router."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e
POLICIES = Path(__file__).resolve().parents[2] / "policies"
TOKEN = {"Authorization": "Bearer billing-dev-token"}
SKIP = {"date", "server"}  # per-response headers


async def both(
    s: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[tuple[int, bytes, dict[str, str]], tuple[int, bytes, dict[str, str]]]:
    out = []
    for suffix in ("", "?_=1"):
        hdrs = {**headers, "X-Request-Id": "fixed-request-id"}
        async with s.get(url + suffix, headers=hdrs) as r:
            body = await r.read()
            kept = {k.lower(): v for k, v in r.headers.items() if k.lower() not in SKIP}
            out.append((r.status, body, kept))
    return out[0], out[1]


async def fast_path_count(s: aiohttp.ClientSession, server: Server) -> float:
    async with s.get(f"{server.url}/metrics") as r:
        text = await r.text()
    for fam in text_string_to_metric_families(text):
        if fam.name == "dbproxy_fast_path_requests":
            return float(fam.samples[0].value)
    raise AssertionError("no dbproxy_fast_path_requests in /metrics")


def corpus(base: str, coll: str) -> list[str]:
    return [
        f"{base}/{coll}/d1",  # found
        f"{base}/{coll}/nope",  # missing
        f"{base}/{coll}/{'x' * 600}",  # id too long
        f"{base}/1bad/d1",  # invalid collection name
        f"{base}/{'c' * 80}/d1",  # collection name too long
        f"{base}/health/x",  # a reserved-looking collection
        f"{base}/{coll}/d1.json",
    ]


async def test_fast_path_matches_the_router_open(
    launch: Callable[..., Server], pg_dsn: str
) -> None:
    server = launch("--database", pg_dsn)
    coll = "fp_" + uuid.uuid4().hex[:6]
    base = f"{server.url}/api/db"
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/{coll}", json={"_id": "d1", "n": 1}) as r:
            assert r.status == 201
        taken = await fast_path_count(s, server)
        seen = set()
        for url in corpus(base, coll):
            fast, routed = await both(s, url, {})
            assert fast == routed, url
            seen.add(fast[0])
        assert seen >= {200, 404, 400}
        # every request without a query string took the shortcut, none of the others
        assert await fast_path_count(s, server) - taken == len(corpus(base, coll))
    # and the shortcut was taken: the server counted these as "get" operations either way
    assert "Traceback" not in server.output()


async def test_fast_path_matches_the_router_with_policies(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    server = launch("--database", pg_dsn, "--policies", str(policies))
    base = f"{server.url}/api/db"
    # tenants of this test alone: other tests list the invoices of theirs
    billing = {**TOKEN, "X-Tenant-Id": "fp-" + uuid.uuid4().hex[:8]}
    other = {**TOKEN, "X-Tenant-Id": "fp-" + uuid.uuid4().hex[:8]}
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{base}/invoices",
            headers=billing,
            json={"tenant_id": billing["X-Tenant-Id"], "amount": 3},
        ) as r:
            assert r.status == 201
            mine = (await r.json())["_id"]
        async with s.post(
            f"{base}/invoices", headers=other, json={"tenant_id": other["X-Tenant-Id"], "amount": 4}
        ) as r:
            assert r.status == 201
            theirs = (await r.json())["_id"]
        cases = [
            (f"{base}/invoices/{mine}", billing),  # found
            (f"{base}/invoices/{theirs}", billing),  # outside the row rule: not found
            (f"{base}/invoices/{mine}", TOKEN),  # no tenant header
            (f"{base}/sessions/x", billing),  # not granted: 403
            (f"{base}/invoices/{mine}", {}),  # no token: 401
            (f"{base}/invoices/{mine}", {"Authorization": "Bearer wrong"}),  # 401
            (f"{base}/users/u1", billing),  # field rule on users
        ]
        taken = await fast_path_count(s, server)
        statuses = set()
        for url, headers in cases:
            fast, routed = await both(s, url, headers)
            assert fast == routed, (url, headers, fast, routed)
            statuses.add(fast[0])
        assert statuses >= {200, 401, 403, 404}
        assert await fast_path_count(s, server) - taken == len(cases)


# ---- POST /api/db/{collection}/query ------------------------------------------------------


async def both_query(
    s: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[tuple[int, bytes, dict[str, str]], tuple[int, bytes, dict[str, str]]]:
    """The same query through the shortcut and (with a dummy query string) the router."""
    out = []
    for suffix in ("", "?_=1"):
        hdrs = {**headers, "X-Request-Id": "fixed-request-id", "Content-Type": "application/json"}
        async with s.post(url + suffix, data=body, headers=hdrs) as r:
            got = await r.read()
            kept = {k.lower(): v for k, v in r.headers.items() if k.lower() not in SKIP}
            out.append((r.status, got, kept))
    return out[0], out[1]


async def fast_query_count(s: aiohttp.ClientSession, server: Server) -> float:
    async with s.get(f"{server.url}/metrics") as r:
        text = await r.text()
    for fam in text_string_to_metric_families(text):
        if fam.name == "dbproxy_fast_path_queries":
            return float(fam.samples[0].value)
    raise AssertionError("no dbproxy_fast_path_queries in /metrics")


def query_corpus(coll: str) -> list[tuple[str, bytes]]:
    q = orjson.dumps
    return [
        (coll, q({"filter": {"n": {"$gte": 2}}, "sort": "-n", "limit": 2})),  # a page, next
        (coll, q({"filter": {"n": 1}, "fields": "n"})),  # projection
        (coll, q({"filter": {"n": 99}})),  # nothing
        (coll, q({"filter": {"n": {"$bogus": 1}}})),  # bad operator: 400
        (coll, q({"sort": "n", "limit": 0})),  # bad limit
        (coll, q({"next": "not-a-cursor"})),  # bad cursor
        (coll, q({"unknown": 1})),  # unknown field
        (coll, b"[1, 2]"),  # not an object
        (coll, b"{not json"),  # malformed
        (coll, b""),  # no body
        ("1bad", q({})),  # invalid collection name
        ("c" * 80, q({})),  # collection name too long
        ("health", q({})),  # a reserved-looking collection
    ]


async def test_query_fast_path_matches_the_router_open(
    launch: Callable[..., Server], pg_dsn: str
) -> None:
    server = launch("--database", pg_dsn)
    coll = "fq_" + uuid.uuid4().hex[:6]
    base = f"{server.url}/api/db"
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            async with s.post(f"{base}/{coll}", json={"_id": f"d{i}", "n": i}) as r:
                assert r.status == 201
        taken = await fast_query_count(s, server)
        seen = set()
        for c, body in query_corpus(coll):
            fast, routed = await both_query(s, f"{base}/{c}/query", body, {})
            assert fast == routed, (c, body)
            seen.add(fast[0])
        assert seen >= {200, 400}
        first, _ = await both_query(s, f"{base}/{coll}/query", query_corpus(coll)[0][1], {})
        nxt = orjson.loads(first[1])["next"]
        assert nxt is not None
        page2 = orjson.dumps({"filter": {"n": {"$gte": 2}}, "sort": "-n", "limit": 2, "next": nxt})
        fast, routed = await both_query(s, f"{base}/{coll}/query", page2, {})
        assert fast == routed and [d["n"] for d in orjson.loads(fast[1])["items"]] == [2]
        # every request without a query string took the shortcut, none of the others
        assert await fast_query_count(s, server) - taken == len(query_corpus(coll)) + 2
    assert "Traceback" not in server.output()


async def test_query_fast_path_matches_the_router_with_policies(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    server = launch("--database", pg_dsn, "--policies", str(policies))
    base = f"{server.url}/api/db"
    billing = {**TOKEN, "X-Tenant-Id": "fq-" + uuid.uuid4().hex[:8]}
    other = {**TOKEN, "X-Tenant-Id": "fq-" + uuid.uuid4().hex[:8]}
    async with aiohttp.ClientSession() as s:
        for who, amount in ((billing, 3), (other, 4)):
            doc = {"tenant_id": who["X-Tenant-Id"], "amount": amount}
            async with s.post(f"{base}/invoices", headers=who, json=doc) as r:
                assert r.status == 201
        mine = orjson.dumps({"filter": {"amount": {"$gte": 0}}, "sort": "amount", "limit": 5})
        cases = [
            ("invoices", mine, billing),  # the row rule keeps the other tenant's out
            ("invoices", mine, TOKEN),  # no tenant header
            ("sessions", mine, billing),  # not granted: 403
            ("invoices", mine, {}),  # no token: 401
            ("invoices", mine, {"Authorization": "Bearer wrong"}),  # 401
            ("users", orjson.dumps({"filter": {"password_hash": "x"}}), billing),  # field rule
            ("users", orjson.dumps({"fields": "name,address"}), billing),  # field rule
        ]
        taken = await fast_query_count(s, server)
        statuses = set()
        for c, body, headers in cases:
            fast, routed = await both_query(s, f"{base}/{c}/query", body, headers)
            assert fast == routed, (c, body, headers, fast, routed)
            statuses.add(fast[0])
        assert statuses >= {200, 401, 403}
        got = orjson.loads((await both_query(s, f"{base}/invoices/query", mine, billing))[0][1])
        assert [d["amount"] for d in got["items"]] == [3]
        assert await fast_query_count(s, server) - taken == len(cases) + 1
