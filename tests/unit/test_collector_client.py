"""The stats pusher: a dead or silent collector never slows recording or the event loop,
the buffer stays bounded and drops are counted; a live one gets every batch, oldest first."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.observe.pusher import BATCHES_PATH, StatsPusher
from proxy.observe.stats import StatsRecorder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_recorder() -> StatsRecorder:
    return StatsRecorder("orders-svc", instance="pod-1:1")


def record_some(rec: StatsRecorder, n: int = 10) -> None:
    for i in range(n):
        rec.record("users", "find", 1.0 + i, 1, "find users {}", True, None)


@pytest.fixture
async def blackhole() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.close()
    for writer in writers:
        writer.close()
    await server.wait_closed()


class FakeCollector:
    """Answers each push with the next status of ``script`` (then 202), keeping bodies."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)
        self.received: list[dict[str, Any]] = []
        self.authorization: list[str | None] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.authorization.append(request.headers.get("Authorization"))
        status = self.script.pop(0) if self.script else 202
        if status == 202:
            self.received.append(orjson.loads(await request.read()))
        return web.json_response({}, status=status)


@pytest.fixture
async def fake_collector() -> AsyncIterator[tuple[str, FakeCollector]]:
    collector = FakeCollector([])
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post(BATCHES_PATH, collector.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")), collector
    await server.close()


# ---- collector down ---------------------------------------------------------------------


async def test_nothing_listening_buffer_bounded_drops_counted() -> None:
    rec = new_recorder()
    pusher = StatsPusher(f"http://127.0.0.1:{free_port()}", "t", rec, max_buffered_batches=3)
    try:
        for _ in range(10):
            record_some(rec)
            await pusher.flush()
        assert pusher.buffered == 3
        assert pusher.dropped == 7
        assert pusher.failures == 10
        assert pusher.sent == 0
    finally:
        await pusher.close(final_flush=False)


async def test_blackholed_collector_times_out_and_drops_oldest(blackhole: str) -> None:
    rec = new_recorder()
    pusher = StatsPusher(blackhole, "t", rec, max_buffered_batches=2, timeout=0.2)
    try:
        for _ in range(5):
            record_some(rec)
            started = time.perf_counter()
            await pusher.flush()
            assert time.perf_counter() - started < 1.0  # one attempt per round, bounded
        assert (pusher.buffered, pusher.dropped, pusher.failures) == (2, 3, 5)
    finally:
        started = time.perf_counter()
        await pusher.close()  # one last bounded attempt
        assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("target", ["refused", "blackhole"])
async def test_background_pusher_never_slows_recording(blackhole: str, target: str) -> None:
    url = blackhole if target == "blackhole" else f"http://127.0.0.1:{free_port()}"
    rec = new_recorder()
    pusher = StatsPusher(url, "t", rec, interval=0.02, max_buffered_batches=5, timeout=0.1)
    await pusher.start()
    durations: list[float] = []
    lags: list[float] = []
    try:
        deadline = time.perf_counter() + 1.5
        while time.perf_counter() < deadline:
            for i in range(200):
                started = time.perf_counter()
                rec.record("users", "get", 0.3, 1, f"get users {i % 7}", True, None)
                durations.append(time.perf_counter() - started)
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - before - 0.005)
    finally:
        await pusher.close(final_flush=False)
    assert pusher.sent == 0
    assert pusher.failures >= 3
    assert pusher.buffered <= 5
    assert pusher.dropped >= 1
    durations.sort()
    assert durations[int(len(durations) * 0.99)] < 0.0005  # record() never waits on I/O
    # the loop stays free while pushes hang: a push that blocked it would delay every
    # turn by its 0.1 s timeout; a busy machine only delays a few turns
    lags.sort()
    assert lags[len(lags) // 2] < 0.05


# ---- collector up ---------------------------------------------------------------------


async def test_outage_then_recovery_delivers_in_order(
    fake_collector: tuple[str, FakeCollector],
) -> None:
    url, collector = fake_collector
    collector.script = [503, 503, 503]
    rec = new_recorder()
    pusher = StatsPusher(url, "sekret", rec, max_buffered_batches=10)
    try:
        for _ in range(3):
            record_some(rec)
            await pusher.flush()
        assert (pusher.failures, pusher.buffered, pusher.sent) == (3, 3, 0)
        record_some(rec)
        await pusher.flush()
    finally:
        await pusher.close()
    assert pusher.sent == 4 and pusher.buffered == 0 and pusher.dropped == 0
    starts = [b["started_at"] for b in collector.received]
    assert starts == sorted(starts)
    assert sum(p["calls"] for b in collector.received for p in b["patterns"]) == 40
    assert set(collector.authorization) == {"Bearer sekret"}


async def test_rejected_batch_is_discarded_unauthorized_kept(
    fake_collector: tuple[str, FakeCollector],
) -> None:
    url, collector = fake_collector
    collector.script = [401, 400]
    rec = new_recorder()
    pusher = StatsPusher(url, None, rec)
    try:
        record_some(rec)
        await pusher.flush()  # 401: kept
        assert (pusher.failures, pusher.buffered) == (1, 1)
        await pusher.flush()  # 400: discarded, not retried
        assert (pusher.rejected, pusher.buffered) == (1, 0)
        record_some(rec)
        await pusher.flush()
        assert pusher.sent == 1
    finally:
        await pusher.close()
    assert collector.authorization[0] is None
    assert len(collector.received) == 1


async def test_close_ships_what_is_left(fake_collector: tuple[str, FakeCollector]) -> None:
    url, collector = fake_collector
    rec = new_recorder()
    pusher = StatsPusher(url, "t", rec, interval=60)
    await pusher.start()
    record_some(rec, 5)
    await pusher.close()
    assert pusher.sent == 1
    assert collector.received[0]["patterns"][0]["calls"] == 5


async def test_large_batch_is_sent_without_warnings(
    fake_collector: tuple[str, FakeCollector],
) -> None:
    url, collector = fake_collector
    rec = StatsRecorder("orders-svc", instance="pod-1:1", max_patterns=3000)
    for i in range(3000):
        rec.record("users", "find", 1.0, 1, f"find users {i:04d} " + "x" * 480, True, None)
    pusher = StatsPusher(url, "t", rec)
    try:
        pusher.collect()
        assert len(pusher._buffer[0]) > 1 << 20
        await pusher.push()
    finally:
        await pusher.close()
    assert pusher.sent == 1
    assert len(collector.received[0]["patterns"]) == 3000
