"""The GET-by-id shortcut in front of the router (``app.fast_get``) answers exactly what the
router answers: same status, body and headers, with and without policies, for found,
missing, hidden (row rule), forbidden, malformed and unauthenticated requests. The same
request with a dummy query string (``?_=1``, ignored by the handler) takes the router."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
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
