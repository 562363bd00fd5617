"""The central collector against the real PostgreSQL: batches from several pushers merge
exactly, rollups survive restarts, bad tokens and malformed batches store nothing, the fleet
view and /metrics are right; the real ``dbproxy collector`` process starts and stops."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.http.collector import CollectorSettings, build_collector_app
from proxy.observe.buckets import NUM_BUCKETS, percentile
from proxy.observe.pusher import BATCHES_PATH, StatsPusher
from proxy.observe.stats import StatsRecorder
from tests.conftest import PG_ADMIN_DSN

pytestmark = [
    pytest.mark.integration,
    # proxy.http.app.envelope stores the request id under a str key; aiohttp >= 3.13 warns
    # once per process about it, which the warnings-as-errors setting would turn into a 500
    pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning"),
]

TOKEN = "push-token-123"
T0 = 1_700_000_000.0


def _with_db(dsn: str, name: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{name}"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def collector_db() -> Iterator[str]:
    """A fresh database for one test, dropped after it."""
    name = f"dbproxy_collector_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_db(PG_ADMIN_DSN, name)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@asynccontextmanager
async def running_collector(dsn: str, token: str | None = TOKEN) -> AsyncIterator[str]:
    app = build_collector_app(CollectorSettings(database_url=dsn, token=token))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as r:
        return r.status, await r.json()


async def post_batch(
    http: aiohttp.ClientSession, base: str, body: Any, token: str | None = TOKEN
) -> tuple[int, Any, str | None]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = io.BytesIO(body if isinstance(body, bytes) else orjson.dumps(body))
    async with http.post(base + BATCHES_PATH, data=data, headers=headers) as r:
        return r.status, await r.json(), r.headers.get("X-Request-Id")


async def table_counts(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            table: await conn.fetchval(f"SELECT count(*) FROM dbproxy_collector.{table}")
            for table in ("batches", "instances", "rollups", "slow_queries")
        }
    finally:
        await conn.close()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def workload(rec: StatsRecorder, clock: Clock, seed: int, rounds: int) -> None:
    """A scripted mix: shared and own patterns, errors, slow operations."""
    for i in range(rounds):
        clock.now += 0.01
        rec.record("users", "find", 0.5 + (i * seed) % 40, 2, "find users {}", True, None)
        rec.record("users", "get", 1.0 + i % 3, 1, "get users", i % 5 != 0, "not_found")
        rec.record(f"own{seed}", "insert", 3.0, 1, f"insert own{seed}", True, None)
        if i % 25 == 0:
            rec.record("orders", "aggregate", 250.0 + seed, 10, "aggregate orders", True, None)


def merged_local(batches: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """What the collector should hold per (operation, collection), from the batches sent."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for batch in batches:
        for p in batch["patterns"]:
            row = out.setdefault(
                (p["operation"], p["collection"]),
                {"calls": 0, "errors": 0, "documents": 0, "buckets": [0] * NUM_BUCKETS, "max": 0},
            )
            row["calls"] += p["calls"]
            row["errors"] += sum(p["errors"].values())
            row["documents"] += p["documents"]
            row["max"] = max(row["max"], p["max_ms"])
            for i, n in p["buckets"]:
                row["buckets"][i] += n
    return out


class CapturingPusher(StatsPusher):
    """A pusher that also keeps a copy of every batch it drained (for the expected sums)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[dict[str, Any]] = []

    def collect(self) -> None:
        before = self.buffered
        super().collect()
        if self.buffered > before:
            self.batches.append(orjson.loads(self._buffer[-1]))


def three_pushers(url: str) -> tuple[list[CapturingPusher], list[tuple[StatsRecorder, Clock]]]:
    recorders = []
    pushers = []
    for service, instance in (("svc-a", "pod-1:1"), ("svc-a", "pod-2:1"), ("svc-b", "pod-3:1")):
        clock = Clock()
        rec = StatsRecorder(service, clock, instance=instance)
        recorders.append((rec, clock))
        pushers.append(CapturingPusher(url, TOKEN, rec, timeout=5.0))
    return pushers, recorders


async def push_rounds(
    pushers: list[CapturingPusher], recorders: list[tuple[StatsRecorder, Clock]], rounds: int
) -> None:
    for r in range(rounds):
        for seed, (rec, clock) in enumerate(recorders, start=1):
            workload(rec, clock, seed + r, 60)
        await asyncio.gather(*(p.flush() for p in pushers))  # concurrent pushes
    for p in pushers:
        assert p.buffered == 0 and p.failures == 0


# ---- merging ---------------------------------------------------------------------------


async def test_three_pushers_merge_exactly(collector_db: str, http: aiohttp.ClientSession) -> None:
    async with running_collector(collector_db) as url:
        pushers, recorders = three_pushers(url)
        try:
            await push_rounds(pushers, recorders, 4)
        finally:
            for p in pushers:
                await p.close()
        status, view = await get_json(http, url + "/api/db/performance?scope=fleet&top=100")
    assert status == 200
    batches = [b for p in pushers for b in p.batches]
    expected = merged_local(batches)

    got = {(o["operation"], o["collection"]): o for o in view["operations"]}
    assert set(got) == set(expected)
    for key, want in expected.items():
        row = got[key]
        assert (row["calls"], row["errors"], row["documents"]) == (
            want["calls"],
            want["errors"],
            want["documents"],
        ), key
        for q, name in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
            assert row[name] == pytest.approx(percentile(want["buckets"], q, want["max"]), abs=1e-3)
    assert got[("get", "users")]["services"] == 2
    assert got[("insert", "own1")]["services"] == 1

    # lifetime totals of the recorders are exactly what the fleet holds, per service
    local_calls: dict[str, int] = {}
    for rec, _ in recorders:
        totals = rec.totals()["collections"]
        calls = sum(op["calls"] for ops in totals.values() for op in ops.values())
        local_calls[rec.service] = local_calls.get(rec.service, 0) + calls
    services = {s["service"]: s for s in view["services"]}
    assert {s: services[s]["calls"] for s in services} == local_calls
    assert services["svc-a"]["instances"] == 2 and services["svc-b"]["instances"] == 1
    assert services["svc-a"]["batches"] == 8

    patterns = view["top_patterns"]
    assert [p["total_ms"] for p in patterns] == sorted(
        (p["total_ms"] for p in patterns), reverse=True
    )
    shared = next(p for p in patterns if p["pattern"] == "get users")
    assert shared["services"] == ["svc-a", "svc-b"]
    slow_sent = sum(len(b["slow"]) for b in batches)
    assert slow_sent > 0 and len(view["slow_queries"]) == min(slow_sent, 50)
    assert all(s["execution_time_ms"] > 200 for s in view["slow_queries"])


async def test_rollups_survive_a_restart_and_duplicates_count_once(
    collector_db: str, http: aiohttp.ClientSession
) -> None:
    clock = Clock()
    rec = StatsRecorder("svc-a", clock, instance="pod-1:1")
    workload(rec, clock, 1, 100)
    batch = rec.drain_batch()
    assert batch is not None
    async with running_collector(collector_db) as url:
        status, body, _ = await post_batch(http, url, batch)
        assert (status, body["duplicate"]) == (202, False)
        _, before = await get_json(http, url + "/api/db/performance")
    async with running_collector(collector_db) as url:  # a new app on the same database
        _, after = await get_json(http, url + "/api/db/performance")
        assert after == before
        status, body, _ = await post_batch(http, url, batch)  # a retry after a lost answer
        assert (status, body["duplicate"]) == (202, True)
        _, again = await get_json(http, url + "/api/db/performance")
        assert again["operations"] == before["operations"]
        workload(rec, clock, 1, 100)
        assert (await post_batch(http, url, rec.drain_batch()))[0] == 202
        _, doubled = await get_json(http, url + "/api/db/performance")
    calls = {(o["operation"], o["collection"]): o["calls"] for o in before["operations"]}
    assert {(o["operation"], o["collection"]): o["calls"] for o in doubled["operations"]} == {
        k: 2 * v for k, v in calls.items()
    }


# ---- refusals --------------------------------------------------------------------------


def a_batch() -> dict[str, Any]:
    rec = StatsRecorder("svc-a", Clock(), instance="pod-1:1", slow_threshold_ms=1)
    rec.record("users", "find", 5.0, 1, "find users {}", True, None)
    rec.record("users", "get", 2.0, 0, "get users", False, "not_found")
    batch = rec.drain_batch()
    assert batch is not None
    return batch


def _assert_envelope(status: int, body: Any, rid: str | None, want_status: int, code: str) -> None:
    assert status == want_status
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["request_id"] == rid


async def test_bad_token_is_401_and_stores_nothing(
    collector_db: str, http: aiohttp.ClientSession
) -> None:
    async with running_collector(collector_db) as url:
        for token in (None, "wrong", TOKEN + "x", ""):
            status, body, rid = await post_batch(http, url, a_batch(), token=token)
            _assert_envelope(status, body, rid, 401, "unauthorized")
        headers = {"Authorization": f"Basic {TOKEN}"}
        async with http.post(
            url + BATCHES_PATH, data=orjson.dumps(a_batch()), headers=headers
        ) as r:
            assert r.status == 401
        assert await table_counts(collector_db) == {
            "batches": 0,
            "instances": 0,
            "rollups": 0,
            "slow_queries": 0,
        }
        assert (await post_batch(http, url, a_batch()))[0] == 202


def _malformed() -> list[tuple[str, Any]]:
    def edit(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        batch = a_batch()
        change(batch)
        return batch

    def second_pattern(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
        return lambda b: b["patterns"][1].__setitem__(key, value)

    many = a_batch()
    many["patterns"] = [dict(many["patterns"][0], pattern=f"p{i}") for i in range(10_001)]
    return [
        ("not json", b"{nope"),
        ("array", [a_batch()]),
        ("version", edit(lambda b: b.__setitem__("version", 2))),
        ("missing key", edit(lambda b: b.pop("instance"))),
        ("extra key", edit(lambda b: b.__setitem__("extra", 1))),
        ("bad service", edit(lambda b: b.__setitem__("service", "no spaces allowed"))),
        ("time order", edit(lambda b: b.__setitem__("started_at", b["ended_at"] + 1))),
        ("calls bool", edit(second_pattern("calls", True))),
        ("calls negative", edit(second_pattern("calls", -1))),
        ("calls float", edit(second_pattern("calls", 1.5))),
        ("bucket sum", edit(second_pattern("buckets", [[3, 5]]))),
        ("bucket index", edit(second_pattern("buckets", [[NUM_BUCKETS, 1]]))),
        ("bucket order", edit(second_pattern("buckets", [[5, 1], [4, 1]]))),
        ("errors > calls", edit(second_pattern("errors", {"not_found": 2}))),
        ("error code", edit(second_pattern("errors", {"Not Found": 1}))),
        ("collection", edit(second_pattern("collection", "users; drop table"))),
        ("pattern long", edit(second_pattern("pattern", "x" * 501))),
        ("total nan", edit(second_pattern("total_ms", "NaN"))),
        ("max > total", edit(second_pattern("max_ms", 1e9))),
        ("duplicate", edit(lambda b: b["patterns"].append(dict(b["patterns"][0])))),
        ("slow shape", edit(lambda b: b["slow"][0].__setitem__("success", "yes"))),
        ("slow id", edit(lambda b: b["slow"][0].__setitem__("query_id", "../x"))),
        ("too many", many),
    ]


async def test_malformed_batches_are_400_and_store_nothing(
    collector_db: str, http: aiohttp.ClientSession
) -> None:
    async with running_collector(collector_db) as url:
        for name, body in _malformed():
            status, reply, rid = await post_batch(http, url, body)
            code = "invalid_json" if name == "not json" else "invalid_batch"
            _assert_envelope(status, reply, rid, 400, code)
            if code == "invalid_batch":
                assert reply["error"]["details"]["problems"], name
        assert await table_counts(collector_db) == {
            "batches": 0,
            "instances": 0,
            "rollups": 0,
            "slow_queries": 0,
        }
        async with http.get(url + "/metrics") as r:
            text = await r.text()
    rejected = {
        s.labels["reason"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "dbproxy_collector_batches_rejected"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert rejected["invalid"] == len(_malformed())


async def test_oversized_body_is_413(collector_db: str, http: aiohttp.ClientSession) -> None:
    app = build_collector_app(
        CollectorSettings(database_url=collector_db, token=None, max_body_bytes=1000)
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        batch = a_batch()
        batch["patterns"][0]["pattern"] = "x" * 400
        batch["patterns"][1]["pattern"] = "y" * 400
        status, body, rid = await post_batch(http, url, batch, token=None)
        _assert_envelope(status, body, rid, 413, "payload_too_large")
    finally:
        await server.close()


# ---- views -------------------------------------------------------------------------------


async def test_metrics_and_health(collector_db: str, http: aiohttp.ClientSession) -> None:
    async with running_collector(collector_db) as url:
        pushers, recorders = three_pushers(url)
        try:
            await push_rounds(pushers, recorders, 2)
        finally:
            for p in pushers:
                await p.close()
        await post_batch(http, url, a_batch(), token="bad")
        async with http.get(url + "/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
        status, health = await get_json(http, url + "/api/db/health")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "dbproxy_collector_batches_accepted",
        "dbproxy_collector_batches_rejected",
        "dbproxy_collector_batches_duplicate",
        "dbproxy_collector_services_seen",
        "dbproxy_collector_instances_seen",
        "dbproxy_collector_ingest_seconds",
    ):
        assert name in families, name

    def value(family: str, sample: str, **labels: str) -> float:
        for s in families[family].samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
        raise AssertionError(sample)

    accepted = value(
        "dbproxy_collector_batches_accepted", "dbproxy_collector_batches_accepted_total"
    )
    assert accepted == 6
    assert (
        value(
            "dbproxy_collector_batches_rejected",
            "dbproxy_collector_batches_rejected_total",
            reason="unauthorized",
        )
        == 1
    )
    assert value("dbproxy_collector_services_seen", "dbproxy_collector_services_seen") == 2
    assert value("dbproxy_collector_instances_seen", "dbproxy_collector_instances_seen") == 3
    assert status == 200
    assert health["status"] == "ready"
    assert health["databases"]["collector"]["status"] == "up"


async def test_services_gauge_is_loaded_at_start(
    collector_db: str, http: aiohttp.ClientSession
) -> None:
    async with running_collector(collector_db) as url:
        assert (await post_batch(http, url, a_batch()))[0] == 202
    async with running_collector(collector_db) as url:
        for _ in range(50):  # the refresh runs right after start
            async with http.get(url + "/metrics") as r:
                text = await r.text()
            if "dbproxy_collector_services_seen 1.0" in text:
                break
            await asyncio.sleep(0.05)
        assert "dbproxy_collector_services_seen 1.0" in text


async def test_performance_parameters(collector_db: str, http: aiohttp.ClientSession) -> None:
    async with running_collector(collector_db) as url:
        assert (await post_batch(http, url, a_batch()))[0] == 202
        status, view = await get_json(http, url + "/api/db/performance?service=svc-a&top=1")
        assert status == 200 and len(view["top_patterns"]) == 1
        status, view = await get_json(http, url + "/api/db/performance?service=svc-z")
        assert status == 200 and view["operations"] == [] and view["services"] == []
        for query in ("scope=local", "top=x", "top=1000", "service=a%20b", "bogus=1"):
            status, body = await get_json(http, url + "/api/db/performance?" + query)
            assert status == 400, query
            assert body["error"]["code"] in ("invalid_parameter", "unknown_parameter")


async def test_database_down_is_503_and_the_pusher_keeps_the_batch(
    http: aiohttp.ClientSession,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dsn = f"postgresql://postgres@127.0.0.1:{port}/nowhere"
    async with running_collector(dsn) as url:
        status, health = await get_json(http, url + "/api/db/health")
        assert status == 503 and health["databases"]["collector"]["status"] == "down"
        status, body, _ = await post_batch(http, url, a_batch())
        assert (status, body["error"]["code"]) == (503, "database_unavailable")
        rec = StatsRecorder("svc-a", Clock(), instance="pod-1:1")
        rec.record("users", "find", 1.0, 1, "find users", True, None)
        pusher = StatsPusher(url, TOKEN, rec)
        await pusher.flush()
        assert (pusher.failures, pusher.buffered) == (1, 1)
        await pusher.close(final_flush=False)


# ---- the real process ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(dsn: str, tmp: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = _free_port()
    log = tmp / f"collector-{port}.log"
    cmd = [sys.executable, "-m", "proxy.cli", "collector", "--port", str(port), "--database", dsn]
    env = {**os.environ, "DBPROXY_COLLECTOR_TOKEN": TOKEN}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    return proc, f"http://127.0.0.1:{port}", log


async def _wait_ready(
    http: aiohttp.ClientSession, proc: subprocess.Popen[bytes], url: str, log: Path
) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            async with http.get(url + "/api/db/health") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"collector did not become ready:\n{log.read_text()}")


async def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(proc.wait, 15)


async def test_collector_process_restart_keeps_rollups(
    collector_db: str, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rec = StatsRecorder("svc-a", Clock(), instance="pod-1:1")
    for i in range(30):
        rec.record("users", "find", 1.0 + i, 1, "find users {}", True, None)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        proc, url, log = _start(collector_db, tmp_path)
        procs.append(proc)
        await _wait_ready(http, proc, url, log)
        pusher = StatsPusher(url, TOKEN, rec, timeout=5.0)
        await pusher.flush()
        await pusher.close()
        assert pusher.sent == 1
        assert await _stop(proc) == 0
        assert TOKEN not in log.read_text()  # the token never reaches the log

        proc, url, log = _start(collector_db, tmp_path)
        procs.append(proc)
        await _wait_ready(http, proc, url, log)
        status, view = await get_json(http, url + "/api/db/performance?scope=fleet")
        assert status == 200
        assert view["operations"][0]["calls"] == 30
        status, _body, _ = await post_batch(http, url, a_batch(), token="nope")
        assert status == 401
        assert await _stop(proc) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_collector_without_database_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DBPROXY_DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "collector", "--port", str(_free_port())],
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert b"--database" in result.stderr
