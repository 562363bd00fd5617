"""Policies over HTTP: identity modes, hot reload under load, and global rate limits shared
through Redis by several sidecar processes (with Redis frozen, too)."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.policy import hash_token
from tests.e2e.conftest import Server, free_port, start_server
from tests.redis_server import PrivateRedis

pytestmark = pytest.mark.e2e
POLICIES = Path(__file__).resolve().parents[2] / "policies"
BILLING = {"Authorization": "Bearer billing-dev-token", "X-Tenant-Id": "t1"}


async def call(s: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any, Any]:
    async with s.request(method, url, **kw) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers.copy()


def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    shutil.copytree(POLICIES, d)
    return d


async def test_token_mode(launch: Callable[..., Server], pg_dsn: str, tmp_path: Path) -> None:
    server = launch("--database", pg_dsn, "--policies", str(policy_dir(tmp_path)))
    url = f"{server.url}/api/db"
    async with aiohttp.ClientSession() as s:
        st, err, _ = await call(s, "GET", f"{url}/invoices")
        assert st == 401 and err["error"]["code"] == "missing_token"
        st, err, _ = await call(s, "GET", f"{url}/invoices", headers={"Authorization": "Bearer x"})
        assert st == 401 and err["error"]["code"] == "invalid_token"
        st, doc, _ = await call(
            s, "POST", f"{url}/invoices", headers=BILLING, json={"tenant_id": "t1", "amount": 3}
        )
        assert st == 201
        st, page, _ = await call(s, "GET", f"{url}/invoices", headers=BILLING)
        assert st == 200 and [d["_id"] for d in page["items"]] == [doc["_id"]]
        st, err, _ = await call(s, "DELETE", f"{url}/sessions/x", headers=BILLING)
        assert st == 403 and err["error"]["details"]["missing"] == {
            "operation": "delete",
            "collection": "sessions",
        }
        st, health, _ = await call(s, "GET", f"{url}/health")  # liveness needs no token
        assert st == 200 and health["policies"]["mode"] == "token"
    assert "billing-dev-token" not in server.output()


async def test_sidecar_mode(launch: Callable[..., Server], pg_dsn: str, tmp_path: Path) -> None:
    server = launch(
        "--database", pg_dsn, "--policies", str(policy_dir(tmp_path)), "--service", "users"
    )
    async with aiohttp.ClientSession() as s:
        st, _, _ = await call(s, "POST", f"{server.url}/api/db/sessions", json={"u": 1})
        assert st == 201
        st, err, _ = await call(s, "GET", f"{server.url}/api/db/invoices")
        assert st == 403 and err["error"]["code"] == "permission_denied"


def test_refuses_public_address_without_token_mode(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ},
    )
    assert proc.returncode == 2 and "refusing to listen" in proc.stderr


def test_policy_check_command(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "policy", "check", str(POLICIES)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0 and "4 services" in ok.stdout
    bad = policy_dir(tmp_path)
    (bad / "billing.yaml").write_text("service: billing\ngrants: []\nbogus: 1\n")
    (bad / "x.yaml").write_text("service: y\n")
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "policy", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "billing.yaml" in out.stderr and "x.yaml" in out.stderr and "bogus" in out.stderr


async def test_reload_under_load_never_mixes(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> None:
    pdir = policy_dir(tmp_path)
    billing = pdir / "billing.yaml"  # a rate high enough that only policy changes matter here
    billing.write_text(
        billing.read_text().replace(
            "rate: {per_second: 50, burst: 100}", "rate: {per_second: 100000, burst: 100000}"
        )
    )
    server = launch("--database", pg_dsn, "--policies", str(pdir))
    url = f"{server.url}/api/db/invoices"
    # each worker sends one request at a time, so its own sequence is in send order
    per_worker: list[list[int]] = [[] for _ in range(8)]
    stop = asyncio.Event()

    async def load(s: aiohttp.ClientSession, seen: list[int]) -> None:
        while not stop.is_set():
            async with s.get(url, headers=BILLING) as resp:
                seen.append(resp.status)

    async with aiohttp.ClientSession() as s:
        workers = [asyncio.create_task(load(s, seen)) for seen in per_worker]
        await asyncio.sleep(0.3)
        # 1. a broken file: the previous policies stay in force
        (pdir / "zz-broken.yaml").write_text("service: [\n")
        server.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        _, health, _ = await call(s, "GET", f"{server.url}/api/db/health")
        assert health["policies"]["reload_error"]
        assert all(set(seen) == {200} for seen in per_worker)
        # 2. a good change: billing loses "list" on invoices
        (pdir / "zz-broken.yaml").unlink()
        text = billing.read_text()
        billing.write_text(
            text.replace(
                "operations: [read, list, count, create, update, delete, transaction]",
                "operations: [read, count, create, update, delete, transaction]",
            )
        )
        server.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*workers)
    for seen in per_worker:
        assert set(seen) <= {200, 403}, set(seen)  # never 401/500: no empty or broken set
        flips = sum(1 for a, b in itertools.pairwise(seen) if a != b)
        assert flips == 1 and seen[0] == 200 and seen[-1] == 403, seen  # old, then new, once
    assert sum(len(seen) for seen in per_worker) > 50


# ---- global rate limits through Redis -------------------------------------------------


def limited_policies(tmp_path: Path, fail_mode: str) -> Path:
    d = tmp_path / f"limited-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    (d / "meter.yaml").write_text(
        "service: meter\n"
        f"identity: {{tokens: ['{hash_token('meter-token')}']}}\n"
        "grants: [{collections: [readings], operations: [read, list, count, create]}]\n"
        "limits:\n"
        "  rate: {per_second: 0.001, burst: 100}\n"
        f"  redis_failure: {fail_mode}\n"
    )
    return d


async def test_four_sidecars_share_one_global_limit(
    pg_dsn: str, tmp_path: Path, private_redis: PrivateRedis
) -> None:
    redis_url = private_redis.url
    pdir = limited_policies(tmp_path, "fail_open")
    # a generous Redis timeout: this test is about atomicity, not about a slow Redis
    args = [
        "--database",
        pg_dsn,
        "--policies",
        str(pdir),
        "--redis",
        redis_url,
        "--redis-timeout",
        "2",
    ]
    servers = await asyncio.gather(
        *(asyncio.to_thread(start_server, args, tmp_path) for _ in range(4))
    )
    try:
        headers = {"Authorization": "Bearer meter-token"}
        async with aiohttp.ClientSession() as s:
            gate = asyncio.Semaphore(16)

            async def hit(i: int) -> int:
                server = servers[i % 4]
                async with gate, s.get(f"{server.url}/api/db/readings/count", headers=headers) as r:
                    return r.status

            statuses = await asyncio.gather(*(hit(i) for i in range(160)))
        assert statuses.count(200) == 100 and statuses.count(429) == 60
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize(("mode", "status"), [("fail_open", 200), ("fail_closed", 503)])
async def test_frozen_redis_decides_fast_by_policy(
    pg_dsn: str, tmp_path: Path, private_redis: PrivateRedis, mode: str, status: int
) -> None:
    redis_url, redis_proc = private_redis.url, private_redis.proc
    pdir = limited_policies(tmp_path, mode)
    server = await asyncio.to_thread(
        start_server,
        ["--database", pg_dsn, "--policies", str(pdir), "--redis", redis_url],
        tmp_path,
    )
    try:
        headers = {"Authorization": "Bearer meter-token"}
        url = f"{server.url}/api/db/readings/count"
        async with aiohttp.ClientSession() as s:
            st, _, _ = await call(s, "GET", url, headers=headers)
            assert st == 200
            os.kill(redis_proc.pid, signal.SIGSTOP)
            try:
                took = []
                for _ in range(5):
                    started = time.perf_counter()
                    st, body, _ = await call(s, "GET", url, headers=headers)
                    took.append(time.perf_counter() - started)
                    assert st == status, body
            finally:
                os.kill(redis_proc.pid, signal.SIGCONT)
        # the limiter gives up after 50 ms; the rest is one HTTP round trip and the query
        assert max(took) < 0.25, took
    finally:
        server.stop()
