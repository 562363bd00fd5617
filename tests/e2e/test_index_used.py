"""``index_used`` of the query stats: the first runs of a statement shape have their plan
looked up (EXPLAIN, in the background), fast or slow, and its pattern says whether the plan
used an index."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e


async def _patterns(s: aiohttp.ClientSession, server: Server, name: str) -> list[dict[str, Any]]:
    async with s.get(f"{server.url}/api/db/performance") as r:
        perf = await r.json()
    return [p for p in perf["top_patterns"] if p["collection"] == name]


async def test_index_used_is_noted_for_fast_queries(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "limits: {slow_query_ms: 10000}\n"  # nothing here is slow: first sight alone
        f"databases:\n  - name: main\n    type: postgresql\n    connection_string: {pg_dsn}\n"
    )
    server = launch("--config", str(cfg))
    big, small = "iu_" + uuid.uuid4().hex[:8], "iv_" + uuid.uuid4().hex[:8]
    async with aiohttp.ClientSession() as s:
        for name in (big, small):
            async with s.post(f"{server.url}/api/db/{name}", json={"_id": "p", "n": -1}) as r:
                assert r.status == 201
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(
                f'INSERT INTO dbproxy."{big}" (_id, doc, _version) SELECT g::text, '
                "jsonb_build_object('_id', g::text, 'n', g, '_version', 1), 1 "
                "FROM generate_series(1, 20000) g"
            )
            await conn.execute(f'ANALYZE dbproxy."{big}"')
        finally:
            await conn.close()
        # two shapes on two tables; the planner decides what each uses (EXPLAIN says which)
        for name, flt in ((big, {"n": 1234}), (small, {"n": {"$gt": 0}})):
            for _ in range(3):
                async with s.get(
                    f"{server.url}/api/db/{name}", params={"filter": json.dumps(flt)}
                ) as r:
                    assert r.status == 200
            await asyncio.sleep(1.2)  # one first-sight EXPLAIN per second
        seen: dict[str, Any] = {}
        for _ in range(30):
            seen = {n: await _patterns(s, server, n) for n in (big, small)}
            finds = {
                n: [p for p in ps if p["operation"] == "find" and p["index_used"] is not None]
                for n, ps in seen.items()
            }
            if all(finds.values()):
                break
            await asyncio.sleep(0.2)
    for name in (big, small):
        assert finds[name], seen  # noted although nothing was slow
        noted = finds[name][0]
        assert noted["index_used"] is ("Index" in noted["plan"]), noted  # what the plan says


async def test_index_used_on_the_embedded_store(
    launch: Callable[..., Server], tmp_path: Path
) -> None:
    server = launch("--data-dir", str(tmp_path / "data"))
    name = "iw_" + uuid.uuid4().hex[:8]
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            async with s.post(f"{server.url}/api/db/{name}", json={"_id": f"d{i}", "n": i}) as r:
                assert r.status == 201
        for _ in range(3):
            flt = json.dumps({"n": {"$gt": 1}})
            async with s.get(f"{server.url}/api/db/{name}", params={"filter": flt}) as r:
                assert r.status == 200
        finds: list[dict[str, Any]] = []
        for _ in range(30):
            ps = await _patterns(s, server, name)
            finds = [p for p in ps if p["operation"] == "find" and p["index_used"] is not None]
            if finds:
                break
            await asyncio.sleep(0.2)
    assert finds, "no plan noted"
    assert finds[0]["index_used"] is (
        "INDEX" in finds[0]["plan"] or "PRIMARY KEY" in finds[0]["plan"]
    )
