"""SQL- and operator-injection corpus against the running sidecar; a canary table must survive."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import pytest

from proxy.backends.base import COLLECTION_RE
from proxy.backends.sqlite import DATA_FILE, table_name
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

SQL_PAYLOADS = [
    "'; DROP TABLE {canary}; --",
    '"; DROP TABLE {canary}; --',
    "x') OR 1=1 --",
    "1; DELETE FROM {canary}",
    "$1",
    "$$; DROP TABLE {canary}; $$",
    "') UNION SELECT secret FROM {canary} --",
    "\\'; TRUNCATE {canary}; --",
    "a\"b'c`d",
    "{canary}",
    "public.{canary}",
    "doc->>'x'",
    "pg_sleep(5)",
    "*/ DROP TABLE {canary} /*",
    "-- comment",
    "a.b'; DROP TABLE {canary};--.c",
    "é💥\u202e",
]
# words of driver or SQL text that an error answer must never carry (an answer may name
# the embedded store, "the SQLite store", but not its driver or its errors)
DRIVER_WORDS = ("select", "sqlstate", "asyncpg", "sqlite3", "sqlite_", "operationalerror")
OPERATOR_PAYLOADS: list[Any] = [
    {"$where": "sleep(1000)"},
    {"name": {"$where": "1"}},
    {"name": {"$function": {"body": "x", "args": [], "lang": "js"}}},
    {"$expr": {"$eq": ["$a", "$b"]}},
    {"name": {"$accumulator": {}}},
    {"name": {"$gt": {"$where": "1"}}},
    {"name": {"$in": [{"$where": "1"}]}},
    {"name": {"$regex": "a", "$options": "'; DROP TABLE x; --"}},
    {"name": {"$type": "'; DROP TABLE x; --"}},
    {"$or": {"name": 1}},
    {"name": {"$elemMatch": {"$where": "1"}}},
    {"name": {"$not": {"$function": {}}}},
    {"a.$where": 1},
]


@pytest.fixture
async def canary(pg_dsn: str) -> Any:
    name = "canary_" + uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute(f"CREATE TABLE public.{name} (secret text)")
    await conn.execute(f"INSERT INTO public.{name} VALUES ('intact')")
    yield name, conn
    await conn.execute(f"DROP TABLE IF EXISTS public.{name}")
    await conn.close()


async def test_injection_corpus(pg_server: Server, canary: Any) -> None:
    name, conn = canary
    coll = "inj_" + uuid.uuid4().hex[:8]
    await run_corpus(pg_server.url, coll, name)
    assert await conn.fetchval(f"SELECT secret FROM public.{name}") == "intact"
    assert await conn.fetchval(f"SELECT count(*) FROM public.{name}") == 1
    stored = await conn.fetchval(f'SELECT count(*) FROM dbproxy."{coll}"')
    assert stored == 1 + len(SQL_PAYLOADS)


async def test_injection_corpus_embedded(launch: Callable[..., Server], tmp_path: Path) -> None:
    """The same corpus against the embedded store; the canary lives in its SQLite file."""
    data = tmp_path / "data"
    server = launch("--data-dir", str(data))
    async with (  # a first write: the file exists, in WAL mode
        aiohttp.ClientSession() as s,
        s.post(f"{server.url}/api/db/warmup", json={"x": 1}) as resp,
    ):
        assert resp.status == 201
    path = data / DATA_FILE
    name = "canary_" + uuid.uuid4().hex[:8]
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        with conn:
            conn.execute(f"CREATE TABLE {name} (secret TEXT)")
            conn.execute(f"INSERT INTO {name} VALUES ('intact')")
        coll = "inj_" + uuid.uuid4().hex[:8]
        await run_corpus(server.url, coll, name)
        assert conn.execute(f"SELECT secret FROM {name}").fetchall() == [("intact",)]
        stored = conn.execute(f"SELECT count(*) FROM {table_name(coll)}").fetchone()[0]
        assert stored == 1 + len(SQL_PAYLOADS)


async def run_corpus(url: str, coll: str, name: str) -> None:
    """Every payload against every place a client can put text; ``name`` is the canary."""
    base = f"{url}/api/db/{coll}"
    statuses: list[tuple[str, int]] = []

    async with aiohttp.ClientSession() as s:
        payload = ""

        async def hit(what: str, method: str, url: str, **kw: Any) -> tuple[int, Any]:
            async with s.request(method, url, **kw) as resp:
                body = await resp.json(content_type=None)
                statuses.append((what, resp.status))
                assert resp.status < 500, (what, resp.status, body)
                if resp.status >= 400:
                    # the message may quote the client's own input back, never driver or SQL text
                    text = json.dumps(body, ensure_ascii=False).replace(payload, "").lower()
                    assert not any(word in text for word in DRIVER_WORDS), (what, body)
                return resp.status, body

        st, _ = await hit("seed", "POST", base, json={"_id": "seed", "name": "ann"})
        assert st == 201
        for raw in SQL_PAYLOADS:
            p = payload = raw.format(canary=name)
            # a payload as a value is just data: stored and matched verbatim
            st, created = await hit("value", "POST", base, json={"name": p})
            assert st == 201 and created["name"] == p
            st, page = await hit(
                "filter-value", "POST", f"{base}/query", json={"filter": {"name": p}}
            )
            assert st == 200 and [d["name"] for d in page["items"]] == [p]
            # as a collection name: rejected before any I/O (unless it is a plain valid name,
            # which then lives in the sidecar's own namespace, apart from the canary)
            st, _ = await hit(
                "collection", "POST", f"{url}/api/db/{quote(p, safe='')}", json={"a": 1}
            )
            assert 400 <= st < 500 or COLLECTION_RE.fullmatch(p)
            # as an id: looked up verbatim, not found
            st, _ = await hit("id", "GET", f"{base}/{quote(p, safe='')}")
            assert st in (400, 404)
            # as a field name in a filter, a sort key, a projection, an update path
            await hit("filter-field", "POST", f"{base}/query", json={"filter": {p: 1}})
            await hit("sort", "GET", base, params={"sort": p})
            await hit("fields", "GET", base, params={"fields": p})
            await hit("update-path", "PUT", f"{base}/seed", json={"$set": {p: 1}})
            await hit("regex", "POST", f"{base}/query", json={"filter": {"name": {"$regex": p}}})
        for flt in OPERATOR_PAYLOADS:
            st, body = await hit("operator", "POST", f"{base}/query", json={"filter": flt})
            assert st == 400, (flt, body)

    assert len(statuses) == 1 + 9 * len(SQL_PAYLOADS) + len(OPERATOR_PAYLOADS)
