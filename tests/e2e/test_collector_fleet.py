"""Three real sidecar processes push their stats to a real `dbproxy collector` process; the
fleet view adds up exactly; a collector that is down costs the sidecars nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import PG_ADMIN_DSN
from tests.e2e.conftest import Server, free_port, start_server

pytestmark = pytest.mark.e2e
TOKEN = "fleet-test-token"


@pytest.fixture
async def collector(tmp_path: Path) -> AsyncIterator[str]:
    name = f"dbproxy_fleet_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    port = free_port()
    log = (tmp_path / "collector.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "collector", "--port", str(port), "--database", dsn],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "DBPROXY_COLLECTOR_TOKEN": TOKEN},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                try:
                    async with s.get(f"{url}/api/db/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        log.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def fleet(url: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{url}/api/db/performance", params={"scope": "fleet", "top": "100"}) as r,
    ):
        assert r.status == 200
        view: dict[str, Any] = await r.json()
        return view


async def test_three_sidecars_merge_in_the_collector(
    collector: str, pg_dsn: str, tmp_path: Path
) -> None:
    coll = "fleet_" + uuid.uuid4().hex[:6]
    env = {"DBPROXY_COLLECTOR_TOKEN": TOKEN}
    args = ["--database", pg_dsn, "--collector", collector]
    sidecars: list[Server] = await asyncio.gather(
        *(asyncio.to_thread(start_server, args, tmp_path, env) for _ in range(3))
    )
    try:
        async with aiohttp.ClientSession() as s:
            for i, sidecar in enumerate(sidecars):
                for j in range(5 * (i + 1)):  # 5, 10 and 15 creates
                    async with s.post(f"{sidecar.url}/api/db/{coll}", json={"i": i, "j": j}) as r:
                        assert r.status == 201
                for _ in range(i + 1):  # 1, 2 and 3 misses
                    async with s.get(f"{sidecar.url}/api/db/{coll}/nope") as r:
                        assert r.status == 404
        deadline = time.monotonic() + 15
        while True:
            ops = {
                (o["operation"], o["collection"]): o for o in (await fleet(collector))["operations"]
            }
            inserts = ops.get(("insert", coll), {}).get("calls", 0)
            gets = ops.get(("get", coll), {})
            if inserts == 30 and gets.get("calls") == 6:
                break
            assert time.monotonic() < deadline, ops
            await asyncio.sleep(0.5)
        assert gets["errors"] == 6
    finally:
        for sidecar in sidecars:
            assert sidecar.stop() == 0


async def test_collector_down_costs_the_sidecar_nothing(pg_dsn: str, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sidecar = await asyncio.to_thread(
        start_server, ["--database", pg_dsn, "--collector", dead], tmp_path
    )
    try:
        coll = "fleet_" + uuid.uuid4().hex[:6]
        async with aiohttp.ClientSession() as s:
            for i in range(200):
                async with s.post(f"{sidecar.url}/api/db/{coll}", json={"i": i}) as r:
                    assert r.status == 201
            await asyncio.sleep(2.5)  # at least one push attempt failed meanwhile
            async with s.get(f"{sidecar.url}/metrics") as r:
                text = await r.text()
        failures = [
            line
            for line in text.splitlines()
            if line.startswith('dbproxy_stats_batches_total{outcome="failures"}')
        ]
        assert failures and float(failures[0].split()[-1]) >= 1
    finally:
        assert sidecar.stop() == 0
