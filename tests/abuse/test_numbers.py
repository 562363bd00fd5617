"""Abuse: numbers outside the stored range over HTTP (issue 13, item 6), on PostgreSQL and on
the embedded store. An integer past 64 bits or a number past double range is 400
``number_out_of_range`` with nothing written; an update whose result leaves the range is
refused; a document stored with such a number (around dbproxy) stays readable, no 5xx."""

from __future__ import annotations

import json
import math
import re
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.backends.sqlite import DATA_FILE, table_name
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

HUGE = "123456789012345678901234567890"


def _int(literal: str) -> int | float:
    n = int(literal) if len(literal) <= 21 else None
    return n if n is not None and -(2**63) <= n < 2**64 else float(literal)


async def call(s: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    """(status, body) with the body read as orjson reads JSON, but past double range as inf."""
    async with s.request(method, url, **kw) as resp:
        body = await resp.read()
        return resp.status, json.loads(body, parse_int=_int) if body else None


def out_of_range(status: int, data: Any) -> None:
    assert status == 400, data
    assert data["error"]["code"] == "number_out_of_range", data
    assert data["error"]["message"] and data["error"]["request_id"]


@pytest.fixture(params=["postgresql", "embedded"])
def server(
    request: pytest.FixtureRequest, launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> tuple[Server, Callable[[str, str, str], Any]]:
    """A server and a way to write a document's JSON text straight into its store."""
    if request.param == "postgresql":
        srv = launch("--database", pg_dsn)

        async def store(collection: str, doc_id: str, text: str) -> None:
            conn = await asyncpg.connect(pg_dsn)
            try:
                sql = f'UPDATE dbproxy."{collection}" SET doc = $1::jsonb WHERE _id = $2'
                assert await conn.execute(sql, text, doc_id) == "UPDATE 1"
            finally:
                await conn.close()

        return srv, store
    data_dir = tmp_path / "data"
    srv = launch("--data-dir", str(data_dir))

    async def store_embedded(collection: str, doc_id: str, text: str) -> None:
        conn = sqlite3.connect(data_dir / DATA_FILE, timeout=10)
        try:
            with conn:
                sql = f"UPDATE {table_name(collection)} SET doc = ? WHERE _id = ?"
                assert conn.execute(sql, (text, doc_id)).rowcount == 1
        finally:
            conn.close()

    return srv, store_embedded


async def test_numbers_outside_the_range_are_refused_or_readable(
    server: tuple[Server, Callable[[str, str, str], Any]],
) -> None:
    srv, store = server
    base = f"{srv.url}/api/db/n_{uuid.uuid4().hex[:8]}"
    js = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        # inputs: nothing is silently changed, nothing is written
        for body in (
            f'{{"_id": "x", "n": {HUGE}}}',
            '{"_id": "x", "n": 9223372036854775808}',
            '{"_id": "x", "n": -9223372036854775809}',
            '{"_id": "x", "n": 1e400}',
            f'[{{"_id": "x", "deep": {{"a": [{HUGE}]}}}}]',
        ):
            out_of_range(*await call(s, "POST", base, data=body, headers=js))
        st, page = await call(s, "GET", base)
        assert st == 200 and page["items"] == []
        out_of_range(*await call(s, "GET", base, params={"filter": f'{{"n": {HUGE}}}'}))

        # update results: refused in the statement, the document unchanged
        st, made = await call(s, "POST", base, json={"_id": "a", "n": 2, "i": 2**63 - 1})
        assert st == 201, made
        st, got = await call(s, "PUT", f"{base}/a", json={"$mul": {"n": 1e308}})
        out_of_range(st, got)
        st, got = await call(s, "PUT", f"{base}/a", json={"$mul": {"n": 1e300}})
        assert st == 200 and got["n"] == 2e300
        out_of_range(*await call(s, "PUT", f"{base}/a", json={"$mul": {"n": 1e300}}))
        out_of_range(*await call(s, "PUT", f"{base}/a", json={"$inc": {"i": 1}}))
        out_of_range(
            *await call(s, "PUT", f"{base}/a", data=f'{{"$set": {{"n": {HUGE}}}}}', headers=js)
        )
        st, got = await call(s, "GET", f"{base}/a?fields=n,i")
        assert st == 200 and got == {"_id": "a", "_version": 2, "n": 2e300, "i": 2**63 - 1}

        # a document stored with out-of-range numbers: every read path answers
        legacy = f'{{"_id": "a", "_version": 2, "n": 2e308, "h": {HUGE}, "w": 1}}'
        await store(base.rsplit("/", 1)[1], "a", legacy)
        st, raw = await call(s, "GET", f"{base}/a")
        assert st == 200 and raw["n"] == math.inf and raw["h"] == float(HUGE)
        for url, method, kw in (
            (f"{base}/a?fields=n,h", "GET", {}),
            (f"{base}?fields=n,h", "GET", {}),
            (f"{base}/query", "POST", {"json": {"fields": ["n", "h"], "filter": {"w": 1}}}),
        ):
            st, got = await call(s, method, url, **kw)
            assert st == 200, (url, got)
            item = got["items"][0] if "items" in got else got
            assert item["n"] == math.inf and item["h"] == float(HUGE), (url, item)
        literal = re.compile(rb'"n":\s*(-?[0-9.eE+]+)')
        texts = []
        for url in (f"{base}/a", f"{base}/a?fields=n", f"{base}?fields=n"):
            async with s.get(url) as resp:
                found = literal.search(await resp.read())
                assert resp.status == 200 and found is not None
                texts.append(found.group(1))
        assert texts[0] == texts[1] == texts[2]  # sent digit for digit as stored
        st, got = await call(s, "GET", f"{base}/count")
        assert st == 200 and got["count"] == 1
        out_of_range(*await call(s, "PUT", f"{base}/a", json={"$inc": {"n": 1}}))
        st, got = await call(s, "PUT", f"{base}/a", json={"$set": {"w": 2}})
        assert st == 200 and got["n"] == math.inf and got["h"] == float(HUGE)
