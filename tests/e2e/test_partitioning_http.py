"""Partitioned collections through the real ``dbproxy serve`` process (issue 21): declared
by a migration, written and read over HTTP with the codes, GET by id given the partition
key, partitions in ``GET /api/db/schema/{c}`` and ``/api/db/stats``, and the embedded
store's refusal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e
# this suite's own ports (a range no other test picks: ephemeral ports are elsewhere)
_PORTS = iter(range(19150, 19200))
REGIONS = {"strategy": "list", "key": "region", "values": {"eu": ["eu"], "us": ["us"]}}


def _serve(args: list[str], tmp: Path) -> Server:
    for port in _PORTS:  # pragma: no branch - returns or raises
        log = tmp / f"dbproxy-{port}.log"
        cmd = [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), *args]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
        server = Server(f"http://127.0.0.1:{port}", proc, log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(server.url + "/api/db/health", timeout=1):
                    return server
            except urllib.error.HTTPError:
                return server
            except OSError:
                time.sleep(0.1)
        server.stop()
        if "address already in use" not in server.output().lower():
            raise RuntimeError(f"dbproxy did not start:\n{server.output()}")
    raise RuntimeError("no free port in this suite's range")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def start(*args: str) -> Server:
        servers.append(_serve(list(args), tmp_path))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


async def call(s: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with s.request(method, url, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


def create(coll: str, part: dict[str, Any]) -> dict[str, Any]:
    op = {"op": "create_collection", "collection": coll, "schema": {"partitioning": part}}
    return {"id": f"{coll}-part", "version": 1, "script": {"operations": [op]}}


async def test_partitioned_collection_over_http(serve: Any, pg_dsn: str) -> None:
    server = serve("--database", pg_dsn)
    url = f"{server.url}/api/db"
    coll = f"p{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as s:
        st, record = await call(s, "POST", f"{url}/migrations", json=create(coll, REGIONS))
        assert st == 201 and record["status"] == "completed", record
        for i, region in enumerate(["eu", "eu", "us"]):
            st, doc = await call(
                s, "POST", f"{url}/{coll}", json={"_id": f"d{i}", "region": region}
            )
            assert st == 201, doc
        st, body = await call(s, "POST", f"{url}/{coll}", json={"_id": "nokey"})
        assert st == 400 and body["error"]["code"] == "partition_key_missing", body
        st, body = await call(s, "POST", f"{url}/{coll}", json={"region": "apac"})
        assert st == 400 and body["error"]["code"] == "partition_key_out_of_range", body
        st, body = await call(s, "POST", f"{url}/{coll}", json={"_id": "d0", "region": "us"})
        assert st == 409 and body["error"]["code"] == "duplicate_id", body

        # by id: with the key (query or header) one partition is read; without, all
        st, doc = await call(s, "GET", f"{url}/{coll}/d2?partition_key=us")
        assert st == 200 and doc["region"] == "us"
        st, doc = await call(s, "GET", f"{url}/{coll}/d2", headers={"X-Partition-Key": "us"})
        assert st == 200 and doc["_id"] == "d2"
        st, body = await call(s, "GET", f"{url}/{coll}/d2", headers={"X-Partition-Key": "eu"})
        assert st == 404 and body["error"]["code"] == "not_found"
        st, doc = await call(s, "GET", f"{url}/{coll}/d2")
        assert st == 200 and doc["region"] == "us"
        # a key change moves the document; the query still finds it by the key
        st, doc = await call(s, "PATCH", f"{url}/{coll}/d2", json={"region": "eu"})
        assert st == 200 and doc["_version"] == 2
        st, page = await call(s, "POST", f"{url}/{coll}/query", json={"filter": {"region": "eu"}})
        assert st == 200 and sorted(d["_id"] for d in page["items"]) == ["d0", "d1", "d2"]

        st, schema = await call(s, "GET", f"{url}/schema/{coll}")
        assert st == 200, schema
        assert schema["schema"]["partitioning"]["strategy"] == "list"
        parts = {p["name"]: p for p in schema["partitions"]}
        assert set(parts) == {"eu", "us"}
        assert parts["eu"]["bounds"] == "FOR VALUES IN ('eu')"
        assert parts["eu"]["rows_estimate"] == 3 and parts["us"]["rows_estimate"] == 0
        assert parts["eu"]["table_bytes"] > 0 and schema["estimated_count"] == 3
        st, stats = await call(s, "GET", f"{url}/stats")
        (tables,) = stats["databases"].values()
        about = tables[coll]
        assert about["rows_estimate"] == 3 and set(about["partitions"]) == {"eu", "us"}
        assert about["partitions"]["eu"]["rows_estimate"] == 3
        assert about["partitions"]["eu"]["table_bytes"] > 0


async def test_embedded_store_refuses_partitioning(serve: Any, tmp_path: Path) -> None:
    server = serve("--data-dir", str(tmp_path / "store"))
    url = f"{server.url}/api/db"
    async with aiohttp.ClientSession() as s:
        st, body = await call(s, "POST", f"{url}/migrations", json=create("regions", REGIONS))
        assert st == 400 and body["error"]["code"] == "unsupported_by_backend", body
        st, body = await call(s, "GET", f"{url}/schema/regions")
        assert st == 200 and body["declared"] is False  # nothing was stored
    assert os.path.isdir(tmp_path / "store")
